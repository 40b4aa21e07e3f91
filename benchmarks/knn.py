"""KNeighborsClassifier under encryption: accuracy and cost on iris and wine.

For each data set (70/30 split, standardized on the training part, all training points
stored): float accuracy (scikit-learn), simulated accuracy, planned lookups by width,
Concrete's PBS count, stored points, key generation time and the encrypted latency per
sample on 2 samples (checked equal to ``fhe="disable"``). Writes
``benchmarks/results/knn.json`` and prints a markdown table.

Usage: ``python benchmarks/knn.py [--stored N] [--samples 2] [--no-execute]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from _common import measure_execute, write_results
from sklearn.datasets import load_iris, load_wine
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier as SkKNN
from sklearn.preprocessing import StandardScaler

import fhe_quant.sklearn as fs

LOADERS = {"iris": load_iris, "wine": load_wine}


def split(name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = LOADERS[name](return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def run(name: str, stored: int | None, samples: int, execute: bool) -> dict:
    x_train, x_test, y_train, y_test = split(name)
    if stored is not None:
        x_train, y_train = x_train[:stored], y_train[:stored]
    float_acc = float(SkKNN().fit(x_train, y_train).score(x_test, y_test))
    model = fs.KNeighborsClassifier(p_error=1e-9).fit(x_train, y_train)
    start = time.perf_counter()
    model.compile(x_train)
    compile_s = time.perf_counter() - start
    module = model.quantized_module_
    program = module.program
    start = time.perf_counter()
    simulated = model.predict(x_test, fhe="simulate")
    simulate_s = (time.perf_counter() - start) / len(x_test)
    row = {
        "dataset": name,
        "stored_points": len(program.points),
        "n_features": program.points.shape[1],
        "n_neighbors": program.k,
        "n_bits": model.n_bits,
        "level_bits": program.level_bits,
        "shift": program.shift,
        "distance_bits": program.width,
        "compare_table_bits": program.value_bits,
        "float_accuracy": float_acc,
        "quantized_accuracy": float(np.mean(model.predict(x_test) == y_test)),
        "simulated_accuracy": float(np.mean(simulated == y_test)),
        "pbs_count": module.statistics["pbs_count"],
        "planned_lookups_by_width": {
            str(k): v for k, v in sorted(program.lookups_by_width().items())
        },
        "max_bit_width": module.statistics["max_bit_width"],
        "compile_seconds": compile_s,
        "simulate_seconds_per_sample": simulate_s,
    }
    print(f"{name}: compiled and simulated ({compile_s:.0f} s compile)", flush=True)
    if execute:
        row.update(measure_execute(module, x_test, samples))
        print(f"{name}: executed {samples} samples", flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--stored", type=int, default=None, help="stored points (default all)")
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--no-execute", action="store_true")
    parser.add_argument("--datasets", nargs="+", default=list(LOADERS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "knn.json")
    args = parser.parse_args()
    rows = [run(name, args.stored, args.samples, not args.no_execute) for name in args.datasets]
    write_results(args.out, rows)
    print(
        "| data | stored | k | float acc | simulated acc | PBS | table bits | keygen s "
        "| execute s/sample |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        keygen = f"{r['keygen_seconds']:.1f}" if "keygen_seconds" in r else "-"
        latency = (
            f"{r['execute_seconds_per_sample']:.1f}" if "execute_seconds_per_sample" in r else "-"
        )
        print(
            f"| {r['dataset']} | {r['stored_points']} | {r['n_neighbors']} "
            f"| {r['float_accuracy']:.3f} | {r['simulated_accuracy']:.3f} | {r['pbs_count']} "
            f"| {r['planned_lookups_by_width']} | {keygen} | {latency} |"
        )


if __name__ == "__main__":
    main()
