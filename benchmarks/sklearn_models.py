"""Every scikit-learn estimator family, at its default bits: float vs simulated metric,
PBS count, widest integer, and the encrypted latency measured on a few samples.

Classifiers run on breast_cancer, regressors on diabetes (70/30 split, features
standardized on the training part). Perceptrons get one hidden layer of 16 neurons to
stay small; every other parameter is the estimator's default (tree models: their
FHE-friendly defaults; ``p_error=None``: Concrete's default error probability for the
whole circuit, 1e-5). A row whose tables read more than 6 bits is not executed (key
generation alone takes minutes there); it says so.

Usage::

    python benchmarks/sklearn_models.py [--samples 2] [--only Tree]
    python benchmarks/sklearn_models.py --linear-scaling [--samples 3]

Writes ``benchmarks/results/sklearn_models.json`` and prints a markdown table.

``--linear-scaling`` (issue 14: linear models at any feature count): LogisticRegression on
``make_classification(2000, n_features, random_state=0)`` (70/30, standardized) at 10,
100 and 500 features, at the default 8 bits and with narrower inputs and weights; each
row: accuracy (float, ``disable``), the proven width of the encrypted sum, Concrete's
``complexity`` and the LWE dimension it chose (no lookup: the one key's dimension is the
cost), and the measured encrypted latency. The last rows compile circuits that only add
0 to 8-bit (and 4-bit) encrypted inputs: the smallest LWE dimension any circuit reading
such inputs can have. Writes ``benchmarks/results/linear_scaling.json`` and ``.md``.

Measured beside it (LogisticRegression, 8 bits, load average 29, median of 3 runs):
without lookups the server's time is mostly expanding the compressed input ciphertexts
(``compress_input_ciphertexts``, on by default): at 10 / 100 / 500 features the run took
0.010 / 0.114 / 0.155 s compressed against 0.0016 / 0.062 / 0.065 s without, for inputs
of 2.7 KB against 1.0 MB at 100 features; encryption (~0.08 s at 100) is the same.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from _common import measure_execute, write_results
from sklearn.base import is_classifier
from sklearn.datasets import load_breast_cancer, load_diabetes
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

import fhe_quant.sklearn as fs
from fhe_quant.report import estimate_latency

OUT = Path(__file__).parent / "results" / "sklearn_models.json"
#: Widest table input executed: key generation for 7-bit tables takes minutes.
MAX_EXECUTED_TABLE_BITS = 6


def _split(loader: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def _cases() -> list[tuple[str, Any]]:
    mlp = {"hidden_layer_sizes": (16,), "max_iter": 2000, "random_state": 0}
    trees = {"random_state": 0}
    return [
        ("LinearRegression", fs.LinearRegression()),
        ("Ridge", fs.Ridge()),
        ("Lasso", fs.Lasso()),
        ("ElasticNet", fs.ElasticNet(alpha=0.1)),
        ("LinearSVR", fs.LinearSVR(random_state=0, max_iter=10000)),
        ("SGDRegressor", fs.SGDRegressor(random_state=0)),
        ("PoissonRegressor", fs.PoissonRegressor()),
        ("GammaRegressor", fs.GammaRegressor()),
        ("TweedieRegressor", fs.TweedieRegressor()),
        ("LogisticRegression", fs.LogisticRegression()),
        ("LinearSVC", fs.LinearSVC()),
        ("SGDClassifier", fs.SGDClassifier(random_state=0)),
        ("MLPClassifier", fs.MLPClassifier(**mlp)),
        ("MLPRegressor", fs.MLPRegressor(**mlp)),
        ("DecisionTreeClassifier", fs.DecisionTreeClassifier(**trees)),
        ("DecisionTreeClassifier n_bits=6", fs.DecisionTreeClassifier(n_bits=6, **trees)),
        ("DecisionTreeRegressor", fs.DecisionTreeRegressor(**trees)),
        ("RandomForestClassifier", fs.RandomForestClassifier(**trees)),
        ("RandomForestRegressor", fs.RandomForestRegressor(**trees)),
        ("ExtraTreesClassifier", fs.ExtraTreesClassifier(**trees)),
        ("ExtraTreesRegressor", fs.ExtraTreesRegressor(**trees)),
        ("GradientBoostingClassifier", fs.GradientBoostingClassifier(**trees)),
        ("GradientBoostingRegressor", fs.GradientBoostingRegressor(**trees)),
    ]


def _row(name: str, model: Any, data: dict[str, Any], samples: int) -> dict[str, Any]:
    dataset = "breast_cancer" if is_classifier(model) else "diabetes"
    x_train, x_test, y_train, y_test = data[dataset]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(x_train, y_train)
    start = time.perf_counter()
    model.compile(x_train)
    compile_seconds = time.perf_counter() - start
    module = model.quantized_module_
    stats = module.statistics
    table_bits = max((w for w in module.program.lookups_by_width() if w > 1), default=0)
    start = time.perf_counter()
    simulated = model.predict(x_test, fhe="simulate")
    simulate_seconds = (time.perf_counter() - start) / len(x_test)
    row: dict[str, Any] = {
        "model": name,
        "dataset": dataset,
        "metric": model._metric,
        "n_bits": model.n_bits,
        "float": float(model.sklearn_model_.score(x_test, y_test)),
        "simulated": float(model._score(y_test, simulated)),
        "pbs_count": stats["pbs_count"],
        "pbs_per_precision": {str(k): v for k, v in stats["pbs_per_precision"].items()},
        "max_bit_width": stats["max_bit_width"],
        "widest_table_bits": table_bits,
        "estimated_latency_seconds": estimate_latency(stats["complexity"]),
        "compile_seconds": compile_seconds,
        "simulate_seconds_per_sample": simulate_seconds,
    }
    if table_bits > MAX_EXECUTED_TABLE_BITS:
        row["execute"] = f"skipped: {table_bits}-bit tables (key generation takes minutes)"
    else:
        row.update(measure_execute(module, x_test, samples))
    # NOTE: the machine is shared; latencies grow with the load average.
    row["load_average_1min"] = os.getloadavg()[0]
    return row


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | data | metric | float | simulated | PBS | max bits | table bits | "
        "estimated s/sample | execute s/sample (load) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        latency = (
            f"{r['execute_seconds_per_sample']:.3f} ({r['load_average_1min']:.1f})"
            if "execute_seconds_per_sample" in r
            else r.get("execute", "-")
        )
        lines.append(
            f"| {r['model']} | {r['dataset']} | {r['metric']} | {r['float']:.4f} | "
            f"{r['simulated']:.4f} | {r['pbs_count']} | {r['max_bit_width']} | "
            f"{r['widest_table_bits']} | {r['estimated_latency_seconds']:.3f} | {latency} |"
        )
    return "\n".join(lines)


#: Linear-scaling rows: feature counts, and the n_bits settings compared at each.
LINEAR_FEATURES = (10, 100, 500)
LINEAR_BITS: tuple[Any, ...] = (8, {"inputs": 6, "weights": 6}, {"inputs": 4, "weights": 4})


def _lwe_dimension(circuit: Any) -> int:
    from fhe_quant.fhe import key_parameters

    keys = key_parameters(circuit)
    if keys:
        return max(key.input_lwe_dimension for key in keys)
    info = json.loads(circuit.server.client_specs.program_info.serialize())
    return max(int(k["params"]["lweDimension"]) for k in info["keyset"]["lweSecretKeys"])


def _linear_row(n_features: int, n_bits: Any, samples: int) -> dict[str, Any]:
    from sklearn.datasets import make_classification

    x, y = make_classification(2000, n_features, random_state=0)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    model = fs.LogisticRegression(n_bits=n_bits).fit(x_train, y_train)
    model.compile(x_train)
    module = model.quantized_module_
    stats = module.statistics
    row = {
        "n_features": n_features,
        "n_bits": n_bits,
        "float": float(model.sklearn_model_.score(x_test, y_test)),
        "disable": float((model.predict(x_test) == y_test).mean()),
        "sum_bits": max(layer["accumulator_bits"] for layer in stats["layers"]),
        "complexity": stats["complexity"],
        "lwe_dimension": _lwe_dimension(module.fhe_circuit.circuit),
        **measure_execute(module, x_test, samples),
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(row), flush=True)
    return row


def _floor_row(n_features: int, bits: int) -> dict[str, Any]:
    from concrete import fhe

    inputset = [np.full((1, n_features), v) for v in (0, 2**bits - 1)]
    circuit = fhe.Compiler(lambda x: x + 0, {"x": "encrypted"}).compile(
        inputset, configuration=fhe.Configuration(global_p_error=1e-5)
    )
    return {
        "n_features": n_features,
        "n_bits": f"inputs only ({bits} bits)",
        "sum_bits": bits,
        "complexity": float(circuit.complexity),
        "lwe_dimension": _lwe_dimension(circuit),
        "load_average_1min": os.getloadavg()[0],
    }


def _linear_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| features | n_bits | float | disable | sum bits | complexity | LWE dim | "
        "execute s/sample (load) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        accuracy = f"{r['float']:.4f} | {r['disable']:.4f}" if "float" in r else "- | -"
        latency = r.get("execute_seconds_per_sample")
        latency = "-" if latency is None else f"{latency:.4f} ({r['load_average_1min']:.1f})"
        lines.append(
            f"| {r['n_features']} | {r['n_bits']} | {accuracy} | {r['sum_bits']} | "
            f"{r['complexity']:.4g} | {r['lwe_dimension']} | {latency} |"
        )
    return "\n".join(lines)


def linear_scaling(samples: int) -> None:
    rows = [_linear_row(n, b, samples) for n in LINEAR_FEATURES for b in LINEAR_BITS]
    rows += [_floor_row(100, bits) for bits in (8, 4)]
    out = OUT.with_name("linear_scaling.json")
    write_results(out, rows)
    out.with_suffix(".md").write_text(_linear_table(rows) + "\n")
    print(_linear_table(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--linear-scaling", action="store_true", help="see the docstring")
    parser.add_argument("--samples", type=int, default=2, help="encrypted samples per model")
    parser.add_argument("--only", default="", help="run the models whose name contains this")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if args.linear_scaling:
        linear_scaling(args.samples)
        return
    data = {"breast_cancer": _split(load_breast_cancer), "diabetes": _split(load_diabetes)}
    rows = []
    for name, model in _cases():
        if args.only not in name:
            continue
        rows.append(_row(name, model, data, args.samples))
        print(_table(rows[-1:]).splitlines()[-1], flush=True)
    write_results(args.out, rows)
    print()
    print(_table(rows))


if __name__ == "__main__":
    main()
