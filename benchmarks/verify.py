"""Benchmark: verifying outsourced integer inference with Freivalds vs recomputing it.

Two workloads, batch 256:

* the digits MLP (64-64-10, ReLU, trained briefly on scikit-learn's ``load_digits``,
  standardized), compiled with ``n_bits=6`` (no Concrete compilation): the whole
  transcript (:func:`fhe_quant.verify.prove_inference` vs
  :func:`fhe_quant.verify.verify_inference`) and each linear layer alone;
* a wide layer: a 1024x1024 matrix of 6-bit signed weights applied to 6-bit codes.

For each linear layer: the prover's recomputation ``X @ W.T`` in int64 (what
``fhe="disable"`` runs), the same product in float64 BLAS (exact here, for reference),
and Freivalds' check with 2 rounds in int64 and float32 field arithmetic. Every timing
is the median of several repeats. Results go to ``benchmarks/results/verify.json``
and a markdown table is printed.

Run::

    python benchmarks/verify.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.lower import LinearStep
from fhe_quant.torch import compile_torch_model
from fhe_quant.verify import (
    DEFAULT_PRIME,
    freivalds_check,
    prove_inference,
    verify_inference,
)

__all__ = ["main"]

ROUNDS = 2
RESULTS = Path(__file__).parent / "results" / "verify.json"


def _median_ms(fn: Callable[[], Any], repeat: int, min_seconds: float = 0.05) -> float:
    """Median wall time of ``fn`` in milliseconds (each sample loops to ``min_seconds``)."""
    fn()  # warm up (page faults, caches)
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-7)
    number = max(1, int(min_seconds / once))
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        samples.append((time.perf_counter() - start) / number * 1e3)
    return statistics.median(samples)


def _digits_mlp(epochs: int) -> tuple[Any, np.ndarray]:
    """The 64-64-10 ReLU MLP trained on standardized digits; returns it and the test set."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    xt, yt = torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train)
    for _ in range(epochs):
        for batch in torch.randperm(len(xt)).split(64):
            optimizer.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[batch]), yt[batch]).backward()
            optimizer.step()
    return model.eval(), np.concatenate([x_test, x_train])


def _layer_row(
    case: str, X: np.ndarray, W: np.ndarray, Y: np.ndarray, repeat: int
) -> dict[str, Any]:
    """Recompute ``Y = X @ W.T`` vs Freivalds' check of it (int64 and float32)."""
    Wt = W.T
    seed = np.random.default_rng(0)
    for dtype in (np.int64, np.float32):
        assert freivalds_check(X, Wt, Y, DEFAULT_PRIME, ROUNDS, seed, dtype=dtype)
        forged = Y.copy()
        forged[-1, -1] += 1
        assert not freivalds_check(X, Wt, forged, DEFAULT_PRIME, ROUNDS, seed, dtype=dtype)
    Xf, Wf = X.astype(np.float64), W.astype(np.float64)
    return {
        "case": case,
        "batch": X.shape[0],
        "in": W.shape[1],
        "out": W.shape[0],
        "recompute_int64_ms": _median_ms(lambda: X @ Wt, repeat),
        "recompute_float64_blas_ms": _median_ms(lambda: Xf @ Wf.T, repeat),
        "freivalds_int64_ms": _median_ms(
            lambda: freivalds_check(X, Wt, Y, DEFAULT_PRIME, ROUNDS, seed), repeat
        ),
        "freivalds_float32_ms": _median_ms(
            lambda: freivalds_check(X, Wt, Y, DEFAULT_PRIME, ROUNDS, seed, dtype=np.float32),
            repeat,
        ),
    }


def run(batch: int, repeat: int, epochs: int) -> dict[str, Any]:
    """All measurements, as a JSON-ready dict."""
    rows = []
    model, x_all = _digits_mlp(epochs)
    qm = compile_torch_model(model, x_all[:1000], n_bits=6, compile=False)
    x = x_all[:batch]
    transcript = prove_inference(qm, x)
    seed = np.random.default_rng(0)
    for dtype in (np.int64, np.float32):
        assert verify_inference(qm, x, transcript, ROUNDS, seed, dtype=dtype).ok
    rows.append(
        {
            "case": "digits MLP, whole transcript",
            "batch": batch,
            "in": 64,
            "out": 10,
            "recompute_int64_ms": _median_ms(lambda: prove_inference(qm, x), repeat),
            "recompute_float64_blas_ms": None,
            "freivalds_int64_ms": _median_ms(
                lambda: verify_inference(qm, x, transcript, ROUNDS, seed), repeat
            ),
            "freivalds_float32_ms": _median_ms(
                lambda: verify_inference(qm, x, transcript, ROUNDS, seed, dtype=np.float32),
                repeat,
            ),
        }
    )
    layer_inputs = [transcript.inputs, *transcript.activations]
    linears = [s for s in qm.program.steps if isinstance(s, LinearStep)]
    for step, X, acc in zip(linears, layer_inputs, transcript.accumulators, strict=True):
        rows.append(
            _layer_row(f"digits MLP, layer {step.name}", X, step.weight, acc - step.offset, repeat)
        )
    rng = np.random.default_rng(0)
    W = rng.integers(-31, 32, (1024, 1024))  # 6-bit signed weights
    X = rng.integers(0, 64, (batch, 1024))  # 6-bit unsigned codes
    rows.append(_layer_row("wide layer, 6-bit", X, W, X @ W.T, repeat))
    for row in rows:
        row["speedup_int64"] = row["recompute_int64_ms"] / row["freivalds_int64_ms"]
        row["speedup_float32"] = row["recompute_int64_ms"] / row["freivalds_float32_ms"]
    return {
        "benchmark": "verify",
        "prime": DEFAULT_PRIME,
        "rounds": ROUNDS,
        "false_accept_bound": float(DEFAULT_PRIME) ** -ROUNDS,
        "n_bits": 6,
        "repeat": repeat,
        "machine": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
        "rows": rows,
    }


def table(results: dict[str, Any]) -> str:
    """The results as a markdown table."""

    def ms(value: float | None) -> str:
        return "—" if value is None else f"{value:.3f}"

    lines = [
        f"Freivalds, {results['rounds']} rounds over Z_p, p = {results['prime']} "
        f"(false accept <= {results['false_accept_bound']:.1e}); median ms",
        "",
        "| case | N x in -> out | recompute int64 | recompute f64 BLAS | Freivalds int64 "
        "| Freivalds f32 | speedup int64 / f32 |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in results["rows"]:
        lines.append(
            f"| {row['case']} | {row['batch']} x {row['in']} -> {row['out']} "
            f"| {ms(row['recompute_int64_ms'])} | {ms(row['recompute_float64_blas_ms'])} "
            f"| {ms(row['freivalds_int64_ms'])} | {ms(row['freivalds_float32_ms'])} "
            f"| {row['speedup_int64']:.1f}x / {row['speedup_float32']:.1f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark, write the JSON results and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    results = run(args.batch, args.repeat, args.epochs)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
