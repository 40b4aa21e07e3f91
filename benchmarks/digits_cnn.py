"""Digits CNN (Conv 1->8 3x3, ReLU, AvgPool 2, Linear 72->10) post-training quantized.

For each ``n_bits`` and weight-scale granularity (per output channel, or one per layer):
float / quantized (``disable``) / simulated test accuracy, PBS count, max bit width,
compile time, key-generation time and encrypted latency per sample. Writes
``benchmarks/results/digits_cnn.json`` and prints a Markdown table.

Pixels are scaled to [0, 1] (a convolution's input scale is shared by every pixel of a
channel, so per-pixel standardization would waste codes on outliers).

Run: python benchmarks/digits_cnn.py [--bits 4 5 6] [--granularity channel tensor]
     [--rounding exact|approximate] [--execute-samples 1] [--execute-max-bits 6]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from _common import measure_execute, write_results
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from fhe_quant.errors import CompilationError
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

RESULTS = Path(__file__).parent / "results"


def digits_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits as 1x8x8 images in [0, 1], split 75/25 with random_state=0."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).reshape(-1, 1, 8, 8)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    return x_train, x_test, y_train, y_test


def train_cnn(x: np.ndarray, y: np.ndarray, epochs: int = 30, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(8 * 3 * 3, 10),
    )
    fit(model, x, y, epochs=epochs, seed=seed, verbose=False)
    return model.eval()


def run(
    bits: list[int],
    granularities: list[str],
    rounding: str,
    execute_samples: int,
    execute_max_bits: int,
) -> list[dict]:
    x_train, x_test, y_train, y_test = digits_images()
    model = train_cnn(x_train, y_train)
    rows = []
    for n_bits in bits:
        for granularity in granularities:
            key = {"n_bits": n_bits, "weights": granularity, "rounding": rounding}
            try:
                qm = compile_torch_model(
                    model,
                    x_train,
                    n_bits=n_bits,
                    per_channel=granularity == "channel",
                    rounding=rounding,
                )
            except CompilationError as exc:
                rows.append({**key, "error": str(exc)})
                print(json.dumps(rows[-1]), flush=True)
                continue
            report = qm.report(x_test, y_test, fhe="simulate")
            stats = qm.statistics
            row = {
                **key,
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
                "complexity": stats["complexity"],
                "estimated_latency_seconds": report.estimated_latency_seconds,
            }
            widest_table = max(stats["pbs_per_precision"], default=0)
            if execute_samples and widest_table <= execute_max_bits:
                row.update(measure_execute(qm, x_test, execute_samples))
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    head = (
        "| rounding | n_bits | weights | float | disable | simulate | PBS | max bits | table in "
        "| keygen s | latency s |"
    )
    lines = [head, "|---" * 11 + "|"]
    for r in rows:
        if "error" in r:
            where = f"| {r['rounding']} | {r['n_bits']} | {r['weights']} "
            lines.append(f"{where}| compile failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['rounding']} | {r['n_bits']} | {r['weights']} | {r['float_accuracy']:.4f} "
            f"| {r['disable_accuracy']:.4f} | {r['simulate_accuracy']:.4f} | {r['pbs_count']} "
            f"| {r['max_bit_width']} | {r['table_input_bits'][:-1]} "
            f"| {r.get('keygen_seconds', float('nan')):.1f} "
            f"| {r.get('execute_seconds_per_sample', float('nan')):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[4, 5, 6])
    parser.add_argument(
        "--granularity", nargs="+", default=["channel", "tensor"], choices=["channel", "tensor"]
    )
    parser.add_argument("--rounding", default="exact", choices=["exact", "approximate"])
    parser.add_argument("--execute-samples", type=int, default=1)
    parser.add_argument(
        "--execute-max-bits",
        type=int,
        default=6,
        help="skip the encrypted run of models whose widest table input exceeds this",
    )
    parser.add_argument("--out", default=str(RESULTS / "digits_cnn.json"))
    args = parser.parse_args()
    rows = run(
        args.bits, args.granularity, args.rounding, args.execute_samples, args.execute_max_bits
    )
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"rows": []}

    def key(r: dict) -> tuple:
        return (r["rounding"], r["n_bits"], r["weights"])

    fresh = {key(r) for r in rows}
    merged = sorted([r for r in previous["rows"] if key(r) not in fresh] + rows, key=key)
    write_results(out, merged)
    print(table(merged))


if __name__ == "__main__":
    main()
