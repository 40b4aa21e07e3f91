"""Accuracy against the accumulator budget: digits MLP 64-64-64-10 and digits CNN, 6-bit PTQ.

For each model: the default before (``accumulator_bits=None``: weights rounded to
nearest, automatic table widths, min-max calibration) and after (``"auto"``:
``compile_torch_model(model, x, n_bits=6)``), then one row per ``accumulator_bits`` P
and table width T in the regime ``"auto"`` picks from (activation codes no wider than
the table, mse calibration): PBS, complexity, the widest accumulator, the table widths
and test accuracy. Circuits are compiled; with ``--keygen`` the default MLP is also
keyed (key generation time and evaluation key size). Accuracy is ``fhe="disable"``,
which equals ``simulate`` bit for bit (tests/quant/test_axe_auto.py,
tests/quant/test_axe.py, tests/conv/test_conv_fhe.py).
Writes ``benchmarks/results/accumulator.json`` and ``accumulator.md``.

Run: python benchmarks/accumulator.py [--bits 6 7 8 9 10 11 12] [--tables 4 5] [--keygen]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import digits_split, write_results
from digits_cnn import digits_images, train_cnn
from digits_mlp import train_mlp
from tqdm.auto import tqdm

from fhe_quant.errors import FHEQuantError
from fhe_quant.torch import compile_torch_model

RESULTS = Path(__file__).parent / "results"


BEFORE = {"accumulator_bits": None}  # the default before "auto"
AFTER: dict[str, Any] = {}  # the default


def measure(model: Any, data: tuple, setting: dict[str, Any], keygen: bool) -> dict[str, Any]:
    x_train, x_test, _, y_test = data
    start = time.perf_counter()
    try:
        qm = compile_torch_model(model, x_train, **{"n_bits": 6, **setting})
    except FHEQuantError as exc:
        return {**setting, "error": str(exc)}
    seconds = time.perf_counter() - start
    stats = qm.statistics
    layers = stats["layers"]
    row = {
        **setting,
        "config": qm.quantized.config.to_dict(),
        "accuracy": float(np.mean(qm.forward(x_test, fhe="disable").argmax(1) == y_test)),
        "pbs_count": stats["pbs_count"],
        "pbs_per_precision": {str(k): v for k, v in stats["pbs_per_precision"].items()},
        "complexity": stats["complexity"],
        "max_accumulator_bits": max(layer["accumulator_bits"] for layer in layers),
        "accumulator_bits_per_layer": [layer["accumulator_bits"] for layer in layers],
        "table_input_bits": sorted(
            {
                layer["table_input_bits"]
                for layer in layers
                if "lookups" in layer and "table_input_bits" in layer
            }
        ),
        "max_bit_width": stats["max_bit_width"],
        "quantize_and_compile_seconds": seconds,
    }
    if keygen:
        row["keygen_seconds"] = qm.keygen()
        row["evaluation_key_megabytes"] = (
            qm.circuit.statistics["size_of_bootstrap_keys"]
            + qm.circuit.statistics["size_of_keyswitch_keys"]
        ) / 1e6
        row["load_after_keygen"] = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    return row


def _settings(bits: list[int], tables: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = [dict(BEFORE), dict(AFTER)]
    for t in tables:
        n_bits = {"inputs": 6, "weights": 6, "activations": min(6, t), "outputs": 6}
        rows += [
            {"n_bits": n_bits, "accumulator_bits": p, "rounding_bits": t, "calibration": "mse"}
            for p in bits
        ]
    return rows


def run(bits: list[int], tables: list[int], keygen: bool) -> list[dict[str, Any]]:
    mlp_data = digits_split()
    cnn_data = digits_images()
    models = {
        "digits MLP 64-64-64-10": (train_mlp(mlp_data[0], mlp_data[2], epochs=30), mlp_data),
        "digits CNN conv8-pool-72-10": (train_cnn(cnn_data[0], cnn_data[2]), cnn_data),
    }
    rows = []
    jobs = [(name, s) for name in models for s in _settings(bits, tables)]
    for name, setting in tqdm(jobs, desc="accumulator benchmark"):
        model, data = models[name]
        with torch.no_grad():
            float_acc = float(
                np.mean(
                    model(torch.as_tensor(data[1], dtype=torch.float32)).argmax(1).numpy()
                    == data[3]
                )
            )
        key = keygen and setting == AFTER and name.startswith("digits MLP")
        row = measure(model, data, setting, key)
        rows.append({"model": name, "float_accuracy": float_acc, **row})
    return rows


def table(rows: list[dict[str, Any]], load: str) -> str:
    lines = [
        f"Load average at the start: {load}. Accuracy: fhe='disable' (== simulate) on the "
        "25% test split; n_bits=6 (P/T rows: 6-bit inputs and weights, activation codes "
        "min(6, T) bits, mse calibration, as under accumulator_bits='auto').",
        "",
        "| model | accumulator_bits | table bits | float | accuracy | PBS | complexity "
        "| acc bits per layer | tables |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("accumulator_bits", "default") is None:
            p, t = "none (default before)", "auto"
        elif "accumulator_bits" not in r:
            p, t = "default (auto)", "auto"
        else:
            p, t = r["accumulator_bits"], r["rounding_bits"]
        if "error" in r:
            lines.append(
                f"| {r['model']} | {p} | {t} | {r['float_accuracy']:.4f} | error: "
                f"{r['error'][:80]} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {p} | {t} | {r['float_accuracy']:.4f} | {r['accuracy']:.4f} "
            f"| {r['pbs_count']} | {r['complexity']:.3g} "
            f"| {r['accumulator_bits_per_layer']} | {r['table_input_bits']} |"
        )
    keyed = [r for r in rows if "keygen_seconds" in r]
    for r in keyed:
        lines += [
            "",
            f"Keyed: {r['model']}, default: key generation {r['keygen_seconds']:.1f} s, "
            f"evaluation keys {r['evaluation_key_megabytes']:.0f} MB (load after: "
            f"{r['load_after_keygen']}).",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[6, 7, 8, 9, 10, 11, 12])
    parser.add_argument("--tables", type=int, nargs="+", default=[4, 5])
    parser.add_argument("--keygen", action="store_true", help="key the default MLP")
    args = parser.parse_args()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    torch.set_num_threads(1)
    rows = run(args.bits, args.tables, args.keygen)
    write_results(RESULTS / "accumulator.json", rows)
    text = table(rows, load)
    (RESULTS / "accumulator.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
