"""fhe_quant beside Concrete ML 1.9 on issue 14's six models, on the same weights and data.

One command, three stages:

1. **prepare** (this environment, once): train or fit each float model with fixed seeds
   and save its weights and data split as ``WORK/NAME.npz`` (kept if present, unless
   ``--retrain``). The digits MLP (64-64-64-10, ReLU) and CNN (Conv 1->8 3x3, ReLU,
   AvgPool 2, Linear 72->10) are trained by a plain torch loop (Adam 1e-3, batch 64,
   30 epochs) on scikit-learn's digits, standardized, 75/25, ``random_state=0``; the
   3-bit QAT rows start from the same float MLP. The RandomForest (20 trees, depth 4,
   breast cancer) and DecisionTree (depth 5, wine) are fitted on 70/30 splits and
   re-fitted identically on the other side (checked node by node); the
   LogisticRegression (make_classification 2000x100, 75/25) ships its coefficients.
2. **ours**: fhe_quant of this checkout (or of ``--checkout DIR``, run in a subprocess
   with ``PYTHONPATH=DIR``) quantizes and compiles each model: ``compile_torch_model(
   n_bits=6)``, ``prepare_qat(net, n_bits=3, X_sample=X_train)`` + the plain loop +
   ``compile_qat_model``, ``from_sklearn(model, X_train, n_bits=6 or 8)``.
3. **Concrete ML**: ``side_by_side_cml.py`` under ``--cml-python`` (a separate venv:
   Concrete ML pins other torch/concrete versions) does the same with Concrete ML's
   ``compile_torch_model(n_bits=6, rounding_threshold_bits=6)``, a Brevitas 3-bit MLP
   (same float start, same loop) with ``compile_brevitas_qat_model(
   rounding_threshold_bits=6)``, and ``from_sklearn_model``.

Every row has: the ``uptime`` line and load average before the model, PBS, the widest
integer, table lookups by input width (read from the concrete graph identically on both
sides), Concrete's ``complexity``, evaluation key bytes, simulated accuracy on the whole
test split, and with real keys (unless ``--skip-keygen``) key generation seconds and the
mean encrypted seconds per sample over ``--samples`` samples; circuits whose evaluation
keys exceed ``--max-key-gb`` (default 2 GB: memory is shared) get no keys, and say so.

Results merge into ``benchmarks/results/side_by_side.json`` (a row is replaced by a new
one of the same side, label and model) and the table ``side_by_side.md``. After merging
other work, ``--side ours --label after`` re-measures fhe_quant only and keeps the
Concrete ML rows.

``--side none --import-rows A.json B.json`` merges the rows of runs written elsewhere
(``--out``), e.g. the two sides measured at the same time.

Usage::

    python benchmarks/side_by_side.py [--side both|ours|cml|none] [--label before]
        [--checkout DIR] [--cml-python /work/cmlvenv/bin/python] [--models ...]
        [--samples 2] [--skip-keygen] [--max-key-gb 2] [--work /tmp/side_by_side]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from side_by_side_cml import (
    MODELS,
    SKLEARN_PARAMS,
    TITLES,
    accuracy,
    circuit_columns,
    fit_sklearn,
    float_torch_model,
    load_average,
    load_state,
    plain_loop,
    timed_runs,
    tree_signature,
    uptime,
)

HERE = Path(__file__).parent
RESULTS = HERE / "results"
TORCH_MODELS = ("mlp_ptq", "cnn_ptq", "mlp_qat")


# ---------------------------------------------------------------- 1. prepare
def _splits() -> dict[str, tuple[np.ndarray, ...]]:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine, make_classification
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    digits = (scaler.transform(x_train), scaler.transform(x_test), y_train, y_test)
    images = (digits[0].reshape(-1, 1, 8, 8), digits[1].reshape(-1, 1, 8, 8), *digits[2:])
    x_lr, y_lr = make_classification(n_samples=2000, n_features=100, random_state=0)
    seventy_thirty = {"test_size": 0.3, "random_state": 0}
    return {
        "mlp_ptq": digits,
        "mlp_qat": digits,
        "cnn_ptq": images,
        "rf": tuple(train_test_split(*load_breast_cancer(return_X_y=True), **seventy_thirty)),
        "dt": tuple(train_test_split(*load_wine(return_X_y=True), **seventy_thirty)),
        "logreg": tuple(train_test_split(x_lr, y_lr, test_size=0.25, random_state=0)),
    }


def _float_arrays(name: str, split: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The float model of ``name`` trained on ``split``, as arrays, and its accuracy."""
    import torch

    if name in TORCH_MODELS:
        model = plain_loop(float_torch_model(name), split["x_train"], split["y_train"])
        with torch.no_grad():
            logits = model(torch.tensor(split["x_test"], dtype=torch.float32)).numpy()
        out = {f"w:{k}": v.detach().numpy() for k, v in model.state_dict().items()}
        out["float_accuracy"] = np.float64(np.mean(logits.argmax(1) == split["y_test"]))
        return out
    from sklearn.linear_model import LogisticRegression

    if name == "logreg":
        model = LogisticRegression(**SKLEARN_PARAMS[name]).fit(split["x_train"], split["y_train"])
        out = {"coef": model.coef_, "intercept": model.intercept_}
    else:
        model = fit_sklearn(name, split)
        out = {"tree_signature": tree_signature(model)}
    out["float_accuracy"] = np.float64(model.score(split["x_test"], split["y_test"]))
    return out


def prepare(work: Path, models: list[str], retrain: bool) -> None:
    """Save ``WORK/NAME.npz`` for every model that has none yet (or all with ``retrain``)."""
    work.mkdir(parents=True, exist_ok=True)
    splits = None
    for name in models:
        path = work / f"{name}.npz"
        if path.exists() and not retrain:
            continue
        splits = splits or _splits()
        keys = ("x_train", "x_test", "y_train", "y_test")
        split = dict(zip(keys, splits[name], strict=True))
        if name == "mlp_qat":  # QAT starts from the PTQ row's float MLP
            prepare(work, ["mlp_ptq"], False)
            saved = np.load(work / "mlp_ptq.npz")
            np.savez(path, **{k: saved[k] for k in saved.files})
            continue
        np.savez(path, **split, **_float_arrays(name, split))


# ---------------------------------------------------------------- 2. ours
def _ours_torch(name: str, saved: Any) -> tuple[Any, Any, Callable, Callable]:
    from fhe_quant.qat import compile_qat_model, prepare_qat
    from fhe_quant.torch import compile_torch_model

    x_train, y_train = saved["x_train"], saved["y_train"]
    net = load_state(float_torch_model(name), saved)
    if name == "mlp_qat":
        qat = prepare_qat(net, n_bits=3, X_sample=x_train)
        qm = compile_qat_model(plain_loop(qat, x_train, y_train), x_train)
    else:
        qm = compile_torch_model(net, x_train, n_bits=6)

    def predict(x: np.ndarray, fhe: str) -> np.ndarray:
        return qm.forward(x, fhe=fhe).argmax(axis=1)

    return qm, qm, predict, lambda x: qm.forward(x, fhe="execute")


def _ours_sklearn(name: str, saved: Any) -> tuple[Any, Any, Callable, Callable]:
    from fhe_quant.sklearn import from_sklearn

    sk = fit_sklearn(name, saved)
    if name != "logreg" and not np.array_equal(tree_signature(sk), saved["tree_signature"]):
        raise RuntimeError(f"{name}: the re-fitted trees differ from the saved ones")
    estimator = from_sklearn(sk, saved["x_train"], n_bits=8 if name == "logreg" else 6)
    estimator.compile(saved["x_train"])

    def predict(x: np.ndarray, fhe: str) -> np.ndarray:
        return estimator.predict(x, fhe=fhe)

    return estimator, estimator.quantized_module_, predict, lambda x: predict(x, "execute")


def _commit() -> str:
    import fhe_quant

    root = Path(fhe_quant.__file__).resolve().parent.parent
    done = subprocess.run(
        ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return f"{root} @ {done.stdout.strip() or '?'}"


def measure_ours(
    name: str,
    work: Path,
    label: str,
    samples: int,
    keygen: bool,
    max_key_bytes: float = float("inf"),
) -> dict:
    """fhe_quant's row for model ``name`` (the fhe_quant first on the path)."""
    from importlib.metadata import version

    saved = np.load(work / f"{name}.npz")
    row: dict[str, Any] = {
        "side": "fhe_quant",
        "label": label,
        "model": name,
        "checkout": _commit(),
        "uptime_before": uptime(),
        "load_average_before": load_average(),
        "concrete_python": version("concrete-python"),
    }
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = _ours_torch if name in TORCH_MODELS else _ours_sklearn
        _, qm, predict, run_one = build(name, saved)
    row["compile_seconds"] = time.perf_counter() - start
    row.update(circuit_columns(qm.circuit))
    layers = qm.statistics["layers"]
    row["accumulator_bits"] = [layer.get("accumulator_bits") for layer in layers]
    row["table_input_bits"] = [layer.get("table_input_bits") for layer in layers]
    x_test, y_test = saved["x_test"], saved["y_test"]
    row["accuracy_simulate"] = accuracy(predict, x_test, y_test, "simulate")
    row["accuracy_disable"] = accuracy(predict, x_test, y_test, "disable")
    row["float_accuracy"] = float(saved["float_accuracy"])
    if keygen and row["key_bytes"] > max_key_bytes:
        row["keygen_skipped"] = f"evaluation keys {row['key_bytes'] / 1e9:.1f} GB > --max-key-gb"
    elif keygen:
        row.update(timed_runs(qm.keygen, run_one, x_test, samples))
    return row


def _json_lines(command: list[str], env: dict[str, str] | None = None) -> list[dict]:
    """Run ``command``, echoing its stderr, and parse the JSON rows it prints."""
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True)
    return [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]


def ours_rows(args: argparse.Namespace) -> list[dict]:
    if args.checkout is None:
        rows = []
        for name in args.models:
            rows.append(
                measure_ours(
                    name,
                    args.work,
                    args.label,
                    args.samples,
                    not args.skip_keygen,
                    args.max_key_gb * 1e9,
                )
            )
            print(json.dumps(rows[-1]), flush=True)
        return rows
    env = {
        **os.environ,
        "PYTHONPATH": str(Path(args.checkout).resolve()),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    command = [
        sys.executable,
        __file__,
        "--side",
        "ours",
        "--rows-only",
        "--label",
        args.label,
        "--work",
        str(args.work),
        "--samples",
        str(args.samples),
        "--models",
        *args.models,
    ]
    return _json_lines(command + _cost_options(args), env)


def cml_rows(args: argparse.Namespace) -> list[dict]:
    command = [
        args.cml_python,
        str(HERE / "side_by_side_cml.py"),
        "--work",
        str(args.work),
        "--samples",
        str(args.samples),
        "--models",
        *args.models,
    ]
    return _json_lines(command + _cost_options(args))


def _cost_options(args: argparse.Namespace) -> list[str]:
    """The options that limit key generation, passed on to a subprocess."""
    return ["--max-key-gb", str(args.max_key_gb)] + (["--skip-keygen"] if args.skip_keygen else [])


# ---------------------------------------------------------------- results
def _read_rows(path: Path) -> list[dict]:
    """The rows of a results JSON, or of a file of JSON lines (a companion's stdout)."""
    text = path.read_text()
    if path.suffix == ".json":
        return json.loads(text)["rows"]
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def merge(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row of the same (side, label, model) as a new one replaced (and
    of new rows alike, only the last).

    Examples:
        >>> old = [{"side": "a", "label": "x", "model": "m", "v": 1},
        ...        {"side": "b", "label": "y", "model": "m", "v": 2}]
        >>> [r["v"] for r in merge(old, [{"side": "a", "label": "x", "model": "m", "v": 3}])]
        [2, 3]
    """
    key = lambda r: (r["side"], r["label"], r["model"])  # noqa: E731
    latest = {key(r): r for r in new}  # of two new rows alike, the later one
    return [r for r in old if key(r) not in latest] + list(latest.values())


def _cell(row: dict, name: str, fmt: str) -> str:
    value = row.get(name)
    return "-" if value is None else format(value, fmt)


def _keygen_cell(row: dict) -> str:
    if "keygen_skipped" in row:
        return "not keyed (keys > --max-key-gb)"
    return _cell(row, "keygen_seconds", ".1f")


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | side | PBS | widest int | lookups by input bits | complexity | keys MB "
        "| keygen s | s/sample | accuracy (sim / float) | load before |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = {name: i for i, name in enumerate(MODELS)}
    for r in sorted(
        rows, key=lambda r: (order.get(r["model"], 99), r["side"] != "fhe_quant", r["label"])
    ):
        widths = ", ".join(f"{k}b:{v}" for k, v in r["lookups_by_input_bits"].items())
        side = r["label"] if r["side"] == "concrete-ml" else f"fhe_quant {r['label']}"
        lines.append(
            f"| {r['model']} | {side} | {r['pbs_count']} | {r['max_bit_width']} | {widths} "
            f"| {r['complexity']:.3g} | {r['key_bytes'] / 1e6:.0f} "
            f"| {_keygen_cell(r)} "
            f"| {_cell(r, 'execute_seconds_per_sample', '.2f')} "
            f"| {r['accuracy_simulate']:.3f} / {r['float_accuracy']:.3f} "
            f"| {r['load_average_before']:.2f} |"
        )
    loads = [r["load_average_before"] for r in rows]
    lines += [
        "",
        f"Load average (1 min) before each model: {min(loads):.1f} to {max(loads):.1f} on "
        f"{os.cpu_count()} cores: latency and key generation are slower by about load / "
        "cores than on an idle machine (see cost_calibration.md); PBS, widths, complexity, "
        "key sizes and accuracy do not depend on the load.",
        "",
        "Models:",
    ] + [f"- `{k}`: {v}" for k, v in TITLES.items()]
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("both", "ours", "cml", "none"), default="both")
    parser.add_argument(
        "--import-rows", nargs="*", type=Path, default=[], help="merge the rows of these JSONs"
    )
    parser.add_argument("--label", default="before", help="the fhe_quant rows' label")
    parser.add_argument("--checkout", default=None, help="measure the fhe_quant of this dir")
    parser.add_argument("--cml-python", default="/work/cmlvenv/bin/python")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--samples", type=int, default=2, help="encrypted samples per model")
    parser.add_argument("--skip-keygen", action="store_true", help="no keys, no latency")
    parser.add_argument(
        "--max-key-gb", type=float, default=2.0, help="no keys for circuits whose keys are larger"
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/side_by_side"))
    parser.add_argument("--retrain", action="store_true", help="train the float models again")
    parser.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS / "side_by_side.json")
    return parser.parse_args(argv)


def main() -> None:
    args = parse()
    if args.rows_only:  # the subprocess of --checkout: rows on stdout, nothing written
        args.checkout = None
        ours_rows(args)
        return
    prepare(args.work, args.models, args.retrain)
    new = [row for path in args.import_rows for row in _read_rows(path)]
    if args.side in ("both", "cml"):
        new += cml_rows(args)
    if args.side in ("both", "ours"):
        new += ours_rows(args)
    old = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    rows = merge(old, new)
    args.out.parent.mkdir(exist_ok=True)
    meta = {"cpus": os.cpu_count(), "command": " ".join(sys.argv)}
    args.out.write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
