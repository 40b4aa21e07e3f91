"""Digits MLP (64-64-10, ReLU) post-training quantized at several bit widths.

For each ``n_bits``: float / quantized (``disable``) / simulated test accuracy, PBS
count, max bit width, compile time, key-generation time and encrypted latency per
sample. Writes ``benchmarks/results/digits_mlp.json`` and prints a Markdown table.

Run: python benchmarks/digits_mlp.py [--bits 3 4 5 6] [--execute-samples 2]
     [--rounding exact|approximate]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from _common import digits_mlp, digits_split, measure_execute, write_results

from fhe_quant.errors import CompilationError
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

RESULTS = Path(__file__).parent / "results"


def train_mlp(x: np.ndarray, y: np.ndarray, epochs: int = 40, seed: int = 0) -> torch.nn.Module:
    model = digits_mlp(seed)
    fit(model, x, y, epochs=epochs, seed=seed, verbose=False)
    return model.eval()


def run(bits: list[int], execute_samples: int, rounding: str) -> list[dict]:
    x_train, x_test, y_train, y_test = digits_split()
    model = train_mlp(x_train, y_train)
    rows = []
    for n_bits in bits:
        try:
            qm = compile_torch_model(model, x_train, n_bits=n_bits, rounding=rounding)
        except CompilationError as exc:
            print(json.dumps({"n_bits": n_bits, "rounding": rounding, "error": str(exc)}))
            rows.append({"n_bits": n_bits, "rounding": rounding, "error": str(exc)})
            continue
        report = qm.report(x_test, y_test, fhe="simulate")
        stats = qm.statistics
        row = {
            "n_bits": n_bits,
            "rounding": rounding,
            "float_accuracy": report.scores["float"],
            "full_tables_accuracy": report.scores["quantized (full tables)"],
            "disable_accuracy": report.scores["quantized"],
            "simulate_accuracy": report.scores["simulate"],
            "pbs_count": stats["pbs_count"],
            "pbs_per_precision": {str(k): v for k, v in stats["pbs_per_precision"].items()},
            "max_bit_width": stats["max_bit_width"],
            "table_input_bits": [layer.get("table_input_bits") for layer in stats["layers"]],
            "accumulator_bits": [layer["accumulator_bits"] for layer in stats["layers"]],
            "compile_seconds": stats["compile_seconds"],
            "evaluation_key_megabytes": (
                qm.circuit.statistics["size_of_bootstrap_keys"]
                + qm.circuit.statistics["size_of_keyswitch_keys"]
            )
            / 1e6,
            "complexity": stats["complexity"],
            "estimated_latency_seconds": report.estimated_latency_seconds,
        }
        if execute_samples:
            row.update(measure_execute(qm, x_test, execute_samples))
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| rounding | n_bits | float | disable | simulate | PBS | max bits | table in "
        "| keys MB | compile s | keygen s | latency s |"
    )
    lines = [head, "|---" * 12 + "|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['rounding']} | {r['n_bits']} | compile failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['rounding']} | {r['n_bits']} | {r['float_accuracy']:.4f} "
            f"| {r['disable_accuracy']:.4f} | {r['simulate_accuracy']:.4f} | {r['pbs_count']} "
            f"| {r['max_bit_width']} | {r['table_input_bits'][0]} "
            f"| {r['evaluation_key_megabytes']:.0f} | {r['compile_seconds']:.1f} "
            f"| {r.get('keygen_seconds', float('nan')):.1f} "
            f"| {r.get('execute_seconds_per_sample', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[3, 4, 5, 6])
    parser.add_argument("--execute-samples", type=int, default=2)
    parser.add_argument("--rounding", default="exact", choices=["exact", "approximate"])
    parser.add_argument("--out", default=str(RESULTS / "digits_mlp.json"))
    args = parser.parse_args()
    rows = run(args.bits, args.execute_samples, args.rounding)
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}
    keep = [
        r
        for r in previous["rows"]
        if (r["n_bits"], r["rounding"]) not in {(x["n_bits"], x["rounding"]) for x in rows}
    ]
    merged = sorted(keep + rows, key=lambda r: (r["rounding"], r["n_bits"]))
    write_results(out, merged)
    print(table(merged))


if __name__ == "__main__":
    main()
