"""XGBoost and LightGBM through the tree lowering: accuracy against the library's own
prediction (issue 17 part 1), before and after the threshold grid, in one run.

Data as the test suite's (``tests/sklearn/conftest.py``): 70/30 split,
``random_state=0``, features standardized on the training part. Each model at
``n_bits=6`` and at the wrapper's default ``n_bits``: the library's score, ours in
clear (the exact integer program, which the tests prove equal to ``simulate``), and
for the defaults Concrete's complexity and evaluation key size (compiled, never keyed).

``--before DIR`` runs the same rows first on the fhe_quant package found in ``DIR``, in a
subprocess (see ``benchmarks/trees.py``).

Usage::

    python benchmarks/boosting.py [--before DIR]

Writes ``benchmarks/results/boosting.json`` and ``boosting.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from sklearn.datasets import load_breast_cancer, load_diabetes, load_wine
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

RESULTS = Path(__file__).parent / "results"
CASES = [
    ("LGBMClassifier", "breast_cancer"),
    ("XGBClassifier", "breast_cancer"),
    ("XGBRegressor", "diabetes"),
    ("LGBMRegressor", "diabetes"),
    ("XGBClassifier", "wine"),
    ("LGBMClassifier", "wine"),
]
LOADERS = {"breast_cancer": load_breast_cancer, "diabetes": load_diabetes, "wine": load_wine}


def _split(data: str) -> tuple[Any, Any, Any, Any]:
    x, y = LOADERS[data](return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def _row(code: str, name: str, data: str, n_bits: Any) -> dict[str, Any]:
    import fhe_quant.sklearn as fs
    from fhe_quant.cost import estimate_cost

    x_train, x_test, y_train, y_test = _split(data)
    kwargs = {} if n_bits == "default" else {"n_bits": n_bits}
    model = getattr(fs, name)(random_state=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train, y_train)
        ours = float(model.score(x_test, y_test))
        theirs = float(model.sklearn_model_.score(x_test, y_test))
        estimate = None
        if n_bits == "default":
            model.compile(x_train)
            estimate = estimate_cost(model)
    module = model.quantized_module_
    row = {
        "code": code,
        "model": name,
        "data": data,
        "n_bits": n_bits,
        "metric": "accuracy" if hasattr(model, "classes_") else "r2",
        "library": theirs,
        "ours": ours,
        "grid_bits": module.program.input_bits,
        "leaf_bits": int(module.program.output_step.acc_bits),
        "lookups_by_width": {str(k): v for k, v in module.program.lookups_by_width().items()},
        "complexity": None if estimate is None else estimate.complexity,
        "key_gb": None if estimate is None else estimate.key_bytes / 1e9,
        "load_average_1min": os.getloadavg()[0],
    }
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def rows(code: str) -> list[dict[str, Any]]:
    return [_row(code, name, data, n_bits) for name, data in CASES for n_bits in (6, "default")]


def _table(all_rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| code | model | data | n_bits | grid/leaf bits | metric | library | ours | gap "
        "| complexity | keys GB | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in all_rows:
        complexity = "" if r["complexity"] is None else f"{r['complexity']:.3g}"
        keys = "" if r["key_gb"] is None else f"{r['key_gb']:.2f}"
        lines.append(
            f"| {r['code']} | {r['model']} | {r['data']} | {r['n_bits']} | "
            f"{r['grid_bits']}/{r['leaf_bits']} | {r['metric']} | {r['library']:.4f} | "
            f"{r['ours']:.4f} | {r['ours'] - r['library']:+.4f} | {complexity} | {keys} | "
            f"{r['load_average_1min']:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--before", help="a directory holding the previous fhe_quant package")
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rows:
        print(json.dumps(rows(args.rows)))
        return
    from _common import rows_from_checkout, write_results

    all_rows = (rows_from_checkout(__file__, args.before) if args.before else []) + rows("after")
    write_results(RESULTS / "boosting.json", all_rows)
    lines = _table(all_rows)
    (RESULTS / "boosting.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
