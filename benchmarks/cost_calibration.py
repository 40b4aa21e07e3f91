"""Calibrate the cost model (fhe_quant/cost.py) on measured encrypted runs.

Circuits: one lookup tensor of 2- to 6-bit tables (32 lookups; a 7-bit accumulator
rounded exactly to 4 bits gives the price of a dropped bit), and a few real models:
two digits MLPs (64-32-10, PTQ 4 bits and rounding to 4 / 5 bits), a decision tree
(wine, 5 bits), a random forest (breast cancer, 4 bits). For each: Concrete's
``complexity`` and key sizes (no keys needed), then key generation and the mean
encrypted latency of a few samples. Circuits whose evaluation keys would exceed 1 GB
are not keyed. Key generations run one at a time.

Fits (non-negative, relative least squares; fhe_quant/cost.py)::

    seconds per sample = a * complexity + b * bootstrap key traffic + c
    key generation     = d * bootstrap key work + e * keyswitch key bytes + f

on these runs and on the encrypted runs of ``benchmarks/results/side_by_side.json`` (both
sides: Concrete ML's circuits use other parameters, which the fit must cover too), but
only on runs measured at a load average <= ``--max-load``: under load (six helpers on 2
cores) the same circuit runs 2-5x slower. It also fits the relative lookup price by
width (complexity per lookup of the single-width circuits, normalised to a 4-bit
lookup), and writes estimate against measurement for every run, with its load.

Usage::

    python benchmarks/cost_calibration.py [--samples 3] [--reuse] [--max-load 3] [--write]

``--reuse`` fits the runs already in ``results/cost_calibration.json`` instead of
measuring again; ``--refigure`` also recompiles their circuits (no keys) to read their
figures again, e.g. the keys' decomposition levels that the first format lacked.
Writes ``benchmarks/results/cost_calibration.json`` and ``.md``; ``--write`` also
rewrites the shipped model ``fhe_quant/data/cost_model.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import digits_split, write_results
from concrete import fhe
from sklearn.datasets import load_breast_cancer, load_wine
from sklearn.model_selection import train_test_split
from tqdm.auto import tqdm

import fhe_quant.sklearn as fs
from fhe_quant.cost import CostModel, circuit_figures, cost_features, fit_linear
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

RESULTS = Path(__file__).parent / "results"
SHIPPED = Path(__file__).parent.parent / "fhe_quant" / "data" / "cost_model.json"
MAX_KEY_BYTES = 1_200_000_000
SIDE_BY_SIDE = RESULTS / "side_by_side.json"
LATENCY_FEATURES = ("complexity", "bootstrap_key_traffic")
KEYGEN_FEATURES = ("bootstrap_key_work", "keyswitch_key_bytes")
CPUS = os.cpu_count() or 2
N_LOOKUPS = 32


def _table_circuit(width: int, drop: int = 0) -> tuple[Any, np.ndarray]:
    """``N_LOOKUPS`` lookups on ``width``-bit values (``drop`` bits rounded off first)."""
    total = width + drop
    rng = np.random.default_rng(width)
    table = fhe.LookupTable(list(rng.integers(0, 2**width, size=2**width)))

    def f(x: Any) -> Any:
        x = fhe.hint(x, bit_width=total)
        if drop:
            x = fhe.round_bit_pattern(x, lsbs_to_remove=drop)
            x = fhe.hint(x, bit_width=total)
            x = x >> drop
        return fhe.hint(table[x], bit_width=width)

    limit = 2**total - 2**drop if drop else 2**total
    inputset = [rng.integers(0, max(limit // 2, 1), size=N_LOOKUPS) for _ in range(8)]
    inputset.append(np.full(N_LOOKUPS, limit - 1))
    circuit = fhe.Compiler(f, {"x": "encrypted"}).compile(inputset)
    return circuit, np.stack(inputset[:4])


def _digits_mlp(rounding_bits: int) -> tuple[Any, np.ndarray]:
    x_train, x_test, y_train, _ = digits_split()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fit(net, x_train, y_train, epochs=10, verbose=False)
    qm = compile_torch_model(net, x_train, n_bits=4, rounding_bits=rounding_bits)
    return qm.circuit, qm.quantize_input(x_test[:4])


def _tree(estimator: Any, loader: Callable) -> tuple[Any, np.ndarray]:
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.3, random_state=0)
    estimator.fit(x_train, y_train)
    qm = estimator.quantized_module_
    qm.compile(x_train)
    return qm.circuit, qm.quantize_input(x_test[:4])


def _cases() -> list[tuple[str, Callable[[], tuple[Any, np.ndarray]]]]:
    cases: list[tuple[str, Callable[[], tuple[Any, np.ndarray]]]] = [
        (f"table {w} bits x{N_LOOKUPS}", lambda w=w: _table_circuit(w)) for w in range(2, 7)
    ]
    cases.append((f"7-bit rounded to 4 x{N_LOOKUPS}", lambda: _table_circuit(4, drop=3)))
    cases += [
        ("digits MLP 64-32-10 4b r4", lambda: _digits_mlp(4)),
        ("digits MLP 64-32-10 4b r5", lambda: _digits_mlp(5)),
        (
            "DecisionTree wine 5b",
            lambda: _tree(fs.DecisionTreeClassifier(n_bits=5, random_state=0), load_wine),
        ),
        (
            "RandomForest bc 4b",
            lambda: _tree(fs.RandomForestClassifier(n_bits=4, random_state=0), load_breast_cancer),
        ),
    ]
    return cases


def _measure(name: str, build: Callable, samples: int) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        circuit, inputs = build()
    row: dict[str, Any] = {"circuit": name, **circuit_figures(circuit)}
    row["pbs_per_parameter"] = [[list(k), n] for k, n in row["pbs_per_parameter"]]
    row["key_bytes"] = row["bootstrap_key_bytes"] + row["keyswitch_key_bytes"]
    if row["key_bytes"] > MAX_KEY_BYTES:
        row["skipped"] = f"evaluation keys {row['key_bytes'] / 1e9:.2f} GB > 1 GB"
        return row
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    circuit.keygen()
    row["keygen_seconds"] = time.perf_counter() - start
    latencies = []
    for i in range(samples):
        sample = inputs[i % len(inputs)].reshape(circuit.graph.input_nodes[0].output.shape)
        start = time.perf_counter()
        circuit.decrypt(circuit.run(circuit.encrypt(sample)))
        latencies.append(time.perf_counter() - start)
    row["execute_seconds_per_sample"] = float(np.mean(latencies))
    row["load_average_1min"] = (load_before + os.getloadavg()[0]) / 2
    circuit.cleanup()
    return row


def refigure(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` with their circuit figures read again from the recompiled circuits (no
    keys): results of the first format lack the keys' decomposition levels. The circuits
    are deterministic; a row whose complexity differs is kept, excluded from the fits."""
    builds = dict(_cases())
    out = []
    for row in rows:
        if row["circuit"] not in builds or "excluded" in row:
            out.append(row)
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            circuit, _ = builds[row["circuit"]]()
        figures = circuit_figures(circuit)
        if figures["complexity"] != row["complexity"]:
            out.append({**row, "excluded": "circuit changed since measured (no key levels)"})
            continue
        figures["pbs_per_parameter"] = [[list(k), n] for k, n in figures["pbs_per_parameter"]]
        out.append({**row, **figures})
    return out


def _prices(rows: list[dict[str, Any]]) -> dict[int, float]:
    """Complexity per lookup by width, relative to a 4-bit lookup; width 1 from the
    rounded circuit (its complexity less its 4-bit lookups, per dropped bit)."""
    per_width = {}
    for w in range(2, 7):
        row = next(r for r in rows if r["circuit"] == f"table {w} bits x{N_LOOKUPS}")
        per_width[w] = row["complexity"] / N_LOOKUPS
    rounded = next(r for r in rows if r["circuit"].startswith("7-bit rounded"))
    per_width[1] = max(rounded["complexity"] / N_LOOKUPS - per_width[4], 1.0) / 3
    base = per_width[4]
    prices = {w: round(v / base, 4) for w, v in sorted(per_width.items())}
    # NOTE: 7- and 8-bit lookups are not keyed here (keys of several GB); measured
    # latencies elsewhere scale 2.4x (6 -> 7 bits) and 3x (7 -> 8).
    prices[7] = round(prices[6] * 2.4, 4)
    prices[8] = round(prices[7] * 3.0, 4)
    return prices


def _concrete_version() -> str:
    from importlib.metadata import version

    return version("concrete-python")


def side_by_side_runs(path: Path = SIDE_BY_SIDE) -> list[dict[str, Any]]:
    """The rows of side_by_side.json, as calibration runs (load: the mean of the load
    averages before and after the model; latency: the mean of the runs after the first,
    which also pays for expanding the keys). A row with one encrypted run is not a
    calibration run: its only time includes the key expansion (the decision tree's
    first run takes 1.2-1.7 s, the next ones 0.43 s)."""
    if not path.exists():
        return []
    runs = []
    for r in json.loads(path.read_text())["rows"]:
        side = "fhe_quant " + r["label"] if r["side"] == "fhe_quant" else r["label"]
        if "execute_seconds_per_sample" not in r:
            why = r.get("keygen_skipped", "not keyed")
            runs.append({**r, "circuit": f"{r['model']} ({side})", "skipped": why})
            continue
        load = (r["load_average_before"] + r["load_average_after"]) / 2
        run = {**r, "circuit": f"{r['model']} ({side})", "load_average_1min": load}
        times = r.get("execute_seconds", [])
        if len(times) >= 2:  # the first run also expands the keys: the estimate is of the rest
            run["execute_seconds_per_sample"] = float(np.mean(times[1:]))
            run["first_run_seconds"] = times[0]
        elif len(times) == 1:
            del run["execute_seconds_per_sample"]
            run["skipped"] = "one encrypted run (its time includes expanding the keys)"
        runs.append(run)
    return runs


def _load_exponent(model: CostModel, loaded: list[dict[str, Any]]) -> float:
    """The exponent ``g`` of ``slowdown = (load / cpus) ** g`` that best fits (log least
    squares) the loaded runs' measured / idle-estimated latency and key generation."""
    xs, ys = [], []
    for r in loaded:
        ratio = max(1.0, r["load_average_1min"] / model.cpus)
        if ratio <= 1.0:
            continue
        xs += [np.log(ratio)] * 2
        ys += [
            np.log(r["execute_seconds_per_sample"] / model.seconds_per_sample(r)),
            np.log(r["keygen_seconds"] / model.keygen_seconds(r)),
        ]
    if not xs:
        return 1.0
    xs_, ys_ = np.array(xs), np.array(ys)
    return round(max(0.0, float(np.sum(xs_ * ys_) / np.sum(xs_ * xs_))), 4)


def calibrate(rows: list[dict[str, Any]], max_load: float) -> CostModel:
    """The cost model fitted on the keyed rows measured at load <= ``max_load`` (and not
    excluded), its load exponent on the keyed rows above it."""
    usable = [r for r in rows if "execute_seconds_per_sample" in r and "excluded" not in r]
    keyed = [r for r in usable if r["load_average_1min"] <= max_load]
    if not keyed:
        raise SystemExit(f"No keyed run at a load average <= {max_load}.")
    features = [cost_features(r) for r in keyed]
    latency = fit_linear(
        features, [r["execute_seconds_per_sample"] for r in keyed], LATENCY_FEATURES
    )
    keygen = fit_linear(features, [r["keygen_seconds"] for r in keyed], KEYGEN_FEATURES)
    load = round(float(np.mean([r["load_average_1min"] for r in keyed])), 2)
    loaded = [r for r in usable if r["load_average_1min"] > max_load]
    measured = (
        f"benchmarks/cost_calibration.py, {len(keyed)} runs at load <= {max_load}, "
        f"load exponent on {len(loaded)} runs above, {datetime.now(UTC):%Y-%m-%d}, "
        f"concrete-python {_concrete_version()}, {CPUS} cpus"
    )
    idle = CostModel(latency, keygen, _prices(rows), load, measured, CPUS)
    return CostModel(
        latency, keygen, _prices(rows), load, measured, CPUS, _load_exponent(idle, loaded)
    )


def _markdown(rows: list[dict[str, Any]], model: CostModel, max_load: float) -> str:
    lines = [
        "| run | PBS | complexity | keys GB | keygen s (est, error) | s/sample (est, error) "
        "| load | used for |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        est = model.seconds_per_sample(r)
        head = f"| {r['circuit']} | {r['pbs_count']} | {r['complexity']:.3g} | "
        head += f"{r['key_bytes'] / 1e9:.2f} | "
        if "execute_seconds_per_sample" not in r:
            why = r.get("skipped") or r.get("keygen_skipped", "not keyed")
            lines.append(head + f"{why} | - ({est:.2f}) | - | no |")
            continue
        load = r["load_average_1min"]
        est = model.seconds_per_sample(r, load)
        kg_est = model.keygen_seconds(r, load)
        kg_err = kg_est / r["keygen_seconds"] - 1
        error = est / r["execute_seconds_per_sample"] - 1
        fitted = "yes" if load <= max_load else "load exponent"
        if "excluded" in r:
            fitted = f"no: {r['excluded']}"
        lines.append(
            head + f"{r['keygen_seconds']:.1f} ({kg_est:.1f}, {kg_err:+.0%}) | "
            f"{r['execute_seconds_per_sample']:.3f} ({est:.3f}, {error:+.0%}) | "
            f"{r['load_average_1min']:.2f} | {fitted} |"
        )
    lat, kg = model.latency, model.keygen
    terms = lambda fit: " + ".join(f"{v:.3e} * {k}" for k, v in fit.coefficients.items())  # noqa: E731
    lines += [
        "",
        f"latency = {terms(lat)} + {lat.intercept:.3f} s "
        f"(worst residual {lat.max_relative_residual:.0%}, {lat.n_runs} runs)",
        f"keygen = {terms(kg)} + {kg.intercept:.2f} s "
        f"(worst residual {kg.max_relative_residual:.0%}, {kg.n_runs} runs)",
        f"fitted on runs at load average <= {max_load} (mean {model.load_average}); above "
        f"it, estimates are multiplied by (load / {model.cpus}) ** {model.load_exponent} "
        "(the exponent fitted on those runs): every estimate in the table is at its run's "
        "load.",
        f"lookup price by width (4 bits = 1): {model.lookup_price}",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="encrypted samples per circuit")
    parser.add_argument("--reuse", action="store_true", help="fit the runs of the JSON")
    parser.add_argument(
        "--refigure", action="store_true", help="--reuse, reading the circuit figures again"
    )
    parser.add_argument("--max-load", type=float, default=3.0, help="fit runs below this")
    parser.add_argument("--write", action="store_true", help="rewrite the shipped model")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if args.reuse or args.refigure:
        rows = json.loads((RESULTS / "cost_calibration.json").read_text())["rows"]
        rows = refigure(rows) if args.refigure else rows
    else:
        rows = []
        for name, build in tqdm(_cases(), desc="calibration", disable=not args.verbose):
            rows.append(_measure(name, build, args.samples))
            print(
                json.dumps({k: v for k, v in rows[-1].items() if k != "pbs_per_parameter"}),
                flush=True,
            )
    runs = rows + side_by_side_runs()
    model = calibrate(runs, args.max_load)
    write_results(RESULTS / "cost_calibration.json", rows)
    table = _markdown(runs, model, args.max_load)
    (RESULTS / "cost_calibration.md").write_text(table + "\n")
    if args.write:
        SHIPPED.write_text(json.dumps(model.to_dict(), indent=2) + "\n")
    print(table)


if __name__ == "__main__":
    main()
