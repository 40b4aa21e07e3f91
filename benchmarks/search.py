"""``n_bits="auto"`` against a brute-force grid over the same choices (digits MLP).

The float model: digits, standardized, a 64-64-64-10 ReLU MLP trained 30 epochs with
Adam (1e-3). ``auto``: ``compile_torch_model(net, X_train, n_bits="auto",
max_accuracy_drop=0.01, validation=(X_test, y_test))``, timed. The grid: every
candidate of the same :class:`~fhe_quant.search.SearchSpace`, each scored in clear
(``fhe="disable"``) and, when within the budget, compiled (never keyed); its best is
the passing candidate of least estimated latency. Both use the shipped cost model.

Usage::

    python benchmarks/search.py

Writes ``benchmarks/results/search.json`` and ``search.md``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from _common import digits_split, write_results
from tqdm.auto import tqdm

from fhe_quant.cost import estimate_cost
from fhe_quant.frontends.torch import trace_module
from fhe_quant.model import build_quantized_module
from fhe_quant.passes import simplify
from fhe_quant.report import score
from fhe_quant.search import SearchSpace, supports_accumulator_bits
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

RESULTS = Path(__file__).parent / "results"
DROP = 0.01


def _net(x_train, y_train) -> torch.nn.Module:
    torch.manual_seed(0)
    hidden = [m for _ in range(3) for m in (torch.nn.Linear(64, 64), torch.nn.ReLU())]
    net = torch.nn.Sequential(*hidden, torch.nn.Linear(64, 10))  # the 64-64-64-10
    fit(net, x_train, y_train, epochs=30, lr=1e-3, verbose=False)
    return net


def _grid(net, x_train, x_test, y_test) -> list[dict]:
    graph = simplify(trace_module(net, x_train))
    reference = score(graph(x_test), y_test, "accuracy")
    rows = []
    for c in tqdm(SearchSpace().candidates(supports_accumulator_bits()), desc="grid"):
        module = build_quantized_module(graph, x_train, c.config(True), compile=False)
        metric = score(module.forward(x_test, fhe="disable"), y_test, "accuracy")
        row = {"candidate": repr(c), "metric": metric, "float": reference}
        if metric >= reference - DROP:
            module.compile(x_train)
            estimate = estimate_cost(module)
            row.update(seconds=estimate.seconds_per_sample, complexity=estimate.complexity)
        rows.append(row)
    return rows


def main() -> None:
    x_train, x_test, y_train, y_test = digits_split()
    net = _net(x_train, y_train)
    start = time.perf_counter()
    qm = compile_torch_model(
        net, x_train, n_bits="auto", max_accuracy_drop=DROP, validation=(x_test, y_test)
    )
    search_seconds = time.perf_counter() - start
    load_search = os.getloadavg()[0]
    chosen = next(r for r in qm.search_report_ if r.status == "chosen")
    start = time.perf_counter()
    grid = _grid(net, x_train, x_test, y_test)
    grid_seconds = time.perf_counter() - start
    best = min((r for r in grid if "seconds" in r), key=lambda r: r["seconds"])
    summary = {
        "auto_candidate": repr(chosen.candidate),
        "auto_metric": chosen.metric,
        "auto_estimated_seconds": chosen.estimated_seconds,
        "auto_complexity": chosen.complexity,
        "auto_search_seconds": search_seconds,
        "auto_candidates_scored": sum(r.metric is not None for r in qm.search_report_),
        "auto_candidates_compiled": sum(r.estimated_seconds is not None for r in qm.search_report_),
        "load_average_during_search": load_search,
        "grid_best": best,
        "grid_seconds": grid_seconds,
        "grid_compiled": sum("seconds" in r for r in grid),
        "ratio_auto_to_grid_best": chosen.estimated_seconds / best["seconds"],
        "float": grid[0]["float"],
        "load_average_1min": os.getloadavg()[0],
    }
    write_results(RESULTS / "search.json", [summary, *grid])
    lines = [
        "| | candidate | accuracy (disable) | est. s/sample | complexity | search s | load |",
        "|---|---|---|---|---|---|---|",
        f"| auto | {summary['auto_candidate']} | {chosen.metric:.4f} | "
        f"{chosen.estimated_seconds:.2f} | {chosen.complexity:.3g} | {search_seconds:.0f} | "
        f"{load_search:.2f} |",
        f"| grid best | {best['candidate']} | {best['metric']:.4f} | {best['seconds']:.2f} | "
        f"{best['complexity']:.3g} | {grid_seconds:.0f} | {summary['load_average_1min']:.2f} |",
        "",
        f"float accuracy {summary['float']:.4f}; auto / grid best = "
        f"{summary['ratio_auto_to_grid_best']:.2f}",
    ]
    (RESULTS / "search.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
