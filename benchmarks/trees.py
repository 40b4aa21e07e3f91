"""Tree lowering before and after the threshold grid, in one run (compiled; keys for the
defaults only).

The issue's two models: RandomForest 20 trees depth 4 on breast cancer and a depth-5
DecisionTree on wine (70/30 split, ``random_state=0``), at the estimators' default
``n_bits``, at input grids of 6, 5 and 4 bits, and ``n_bits="auto"``
(``max_accuracy_drop=0.005``, validated on the test split). Each row: accuracy (float and
the exact integer program, which the tests prove equal to ``simulate``), Concrete's
complexity, PBS by table width, evaluation key sizes read from the circuit (Concrete's
size statistic, which the cost model reads, and the keys as sent: serialized with
compression, ``CircuitStatistics.evaluation_key_bytes``), the cost
model's estimated latency and key generation time, and for the defaults the measured key
generation time.

``--before DIR`` runs the same rows first on the fhe_quant package found in ``DIR`` (an
export of the previous commit, e.g. ``git archive HEAD~1 fhe_quant | tar -x -C DIR``), in
a subprocess, so both codes are measured under the same load in one run.

Usage::

    python benchmarks/trees.py [--before DIR]

Writes ``benchmarks/results/trees.json`` and ``trees.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.model_selection import train_test_split

RESULTS = Path(__file__).parent / "results"
#: Concrete ML 1.9's figures on the same models (issue 14), and our targets.
CONCRETE_ML = {
    "RandomForest": {"complexity": 1.43e11, "keys_gb": 0.08, "keygen_s": 5.1},
    "DecisionTree": {"complexity": 2.82e9, "keys_gb": 0.06, "keygen_s": None},
}
TARGET = {"RandomForest": 7.1e10, "DecisionTree": 1.4e9}


def _estimator(name: str, n_bits: Any) -> Any:
    import fhe_quant.sklearn as fs

    kwargs = {} if n_bits == "default" else {"n_bits": n_bits}
    if name == "RandomForest":
        return fs.RandomForestClassifier(random_state=0, **kwargs)
    return fs.DecisionTreeClassifier(max_depth=5, random_state=0, **kwargs)


def _sent_key_gb(module: Any) -> float | None:
    """The evaluation keys as deployed (compressed, serialized), from the circuit's key
    parameters (``None`` with a checkout older than ``CircuitStatistics.keys``)."""
    sent = getattr(module.fhe_circuit.statistics, "evaluation_key_bytes", None)
    return None if sent is None else sent / 1e9


def _row(code: str, name: str, n_bits: Any) -> dict[str, Any]:
    from fhe_quant.cost import estimate_cost

    loader = load_breast_cancer if name == "RandomForest" else load_wine
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    estimator = _estimator(name, n_bits)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if n_bits == "auto":
            # NOTE: validated on the test split (the only held-out data): the chosen
            # accuracy is optimistic by the selection.
            estimator.fit(x_train, y_train, validation=(x_test, y_test), max_accuracy_drop=0.005)
        else:
            estimator.fit(x_train, y_train)
            estimator.compile(x_train)
    module = estimator.quantized_module_
    config = module.quantized.config
    estimate = estimate_cost(estimator)
    row = {
        "code": code,
        "model": name,
        "n_bits": n_bits,
        "grid_bits": module.program.input_bits,
        "leaf_bits": config.leaf_bits or int(module.program.output_step.acc_bits),
        "float": float(estimator.sklearn_model_.score(x_test, y_test)),
        "disable": float((estimator.predict(x_test) == y_test).mean()),
        "complexity": estimate.complexity,
        "pbs_count": estimate.pbs_count,
        "lookups_by_width": {str(k): v for k, v in module.program.lookups_by_width().items()},
        "key_gb": (estimate.bootstrap_key_bytes + estimate.keyswitch_key_bytes) / 1e9,
        "sent_key_gb": _sent_key_gb(module),
        "estimated_seconds": estimate.seconds_per_sample,
        "estimated_keygen_seconds": estimate.keygen_seconds,
        "keygen_seconds": module.keygen() if n_bits == "default" else None,
        "target_complexity": TARGET[name],
        "concrete_ml": CONCRETE_ML[name],
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def rows(code: str) -> list[dict[str, Any]]:
    out = []
    for n_bits in ("default", 6, 5, 4, "auto"):
        for name in ("RandomForest", "DecisionTree"):
            out.append(_row(code, name, n_bits))
    return out


def _table(all_rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| code | model | n_bits | grid/leaf bits | float | disable | complexity (target) "
        "| lookups by width | keys GB (stat) | keys GB (sent) | est. s | est. keygen s "
        "| keygen s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        keygen = "" if r["keygen_seconds"] is None else f"{r['keygen_seconds']:.1f}"
        sent = "" if r.get("sent_key_gb") is None else f"{r['sent_key_gb']:.3f}"
        lines.append(
            f"| {r['code']} | {r['model']} | {r['n_bits']} | {r['grid_bits']}/{r['leaf_bits']} "
            f"| {r['float']:.4f} | {r['disable']:.4f} | {r['complexity']:.3g} "
            f"({r['target_complexity']:.2g}) | {r['lookups_by_width']} | {r['key_gb']:.2f} | "
            f"{sent} | "
            f"{r['estimated_seconds']:.2f} | {r['estimated_keygen_seconds']:.1f} | {keygen} | "
            f"{r['load_average_1min']:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="a directory holding the previous fhe_quant package")
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows:  # the subprocess of --before: rows as JSON on stdout
        print(json.dumps(rows(args.rows)))
        return
    from _common import rows_from_checkout, write_results

    all_rows = (rows_from_checkout(__file__, args.before) if args.before else []) + rows("after")
    write_results(RESULTS / "trees.json", all_rows)
    lines = _table(all_rows)
    (RESULTS / "trees.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
