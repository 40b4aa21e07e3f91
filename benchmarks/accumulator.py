"""Accuracy against the accumulator budget: digits MLP 64-64-64-10 and digits CNN, 6-bit PTQ.

For each model, one row with main's settings (no ``accumulator_bits``, automatic table
width) and one per ``accumulator_bits`` P and table width T: PBS, complexity, the widest
accumulator, the table widths and test accuracy. Circuits are compiled (no key
generation: these have 5-7-bit tables); accuracy is ``fhe="disable"``, which equals
``simulate`` bit for bit (tests/quant/test_axe.py, tests/conv/test_conv_fhe.py).
Writes ``benchmarks/results/accumulator.json`` and ``accumulator.md``.

Run: python benchmarks/accumulator.py [--bits 8 9 10 11 12] [--tables 5 6]
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


def measure(model: Any, data: tuple, setting: dict[str, Any]) -> dict[str, Any]:
    x_train, x_test, _, y_test = data
    start = time.perf_counter()
    try:
        qm = compile_torch_model(model, x_train, n_bits=6, **setting)
    except FHEQuantError as exc:
        return {**setting, "error": str(exc)}
    seconds = time.perf_counter() - start
    stats = qm.statistics
    layers = stats["layers"]
    return {
        **setting,
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


def run(bits: list[int], tables: list[int]) -> list[dict[str, Any]]:
    mlp_data = digits_split()
    cnn_data = digits_images()
    models = {
        "digits MLP 64-64-64-10": (train_mlp(mlp_data[0], mlp_data[2], epochs=30), mlp_data),
        "digits CNN conv8-pool-72-10": (train_cnn(cnn_data[0], cnn_data[2]), cnn_data),
    }
    settings: list[dict[str, Any]] = [{"accumulator_bits": None, "rounding_bits": None}]
    settings += [{"accumulator_bits": p, "rounding_bits": t} for t in tables for p in bits]
    rows = []
    jobs = [(name, s) for name in models for s in settings]
    for name, setting in tqdm(jobs, desc="accumulator benchmark"):
        model, data = models[name]
        with torch.no_grad():
            float_acc = float(
                np.mean(
                    model(torch.as_tensor(data[1], dtype=torch.float32)).argmax(1).numpy()
                    == data[3]
                )
            )
        rows.append({"model": name, "float_accuracy": float_acc, **measure(model, data, setting)})
    return rows


def table(rows: list[dict[str, Any]], load: str) -> str:
    lines = [
        f"Load average at the start: {load}. Accuracy: fhe='disable' (== simulate) on the "
        "25% test split; n_bits=6.",
        "",
        "| model | accumulator_bits | table bits | float | accuracy | PBS | complexity "
        "| max acc bits | tables |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p = "none (main)" if r["accumulator_bits"] is None else r["accumulator_bits"]
        t = "auto" if r["rounding_bits"] is None else r["rounding_bits"]
        if "error" in r:
            lines.append(
                f"| {r['model']} | {p} | {t} | {r['float_accuracy']:.4f} | error: "
                f"{r['error'][:80]} |"
            )
            continue
        lines.append(
            f"| {r['model']} | {p} | {t} | {r['float_accuracy']:.4f} | {r['accuracy']:.4f} "
            f"| {r['pbs_count']} | {r['complexity']:.3g} | {r['max_accumulator_bits']} "
            f"| {r['table_input_bits']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--bits", type=int, nargs="+", default=[8, 9, 10, 11, 12, 13])
    parser.add_argument("--tables", type=int, nargs="+", default=[5, 6])
    args = parser.parse_args()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    torch.set_num_threads(1)
    rows = run(args.bits, args.tables)
    write_results(RESULTS / "accumulator.json", rows)
    text = table(rows, load)
    (RESULTS / "accumulator.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
