"""What the benchmark scripts share: the digits split and the encrypted-run measurement."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.model import QuantizedModule

__all__ = ["digits_split", "measure_execute", "write_results"]


def digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, standardized on the training part, 75/25, random_state=0."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def measure_execute(qm: QuantizedModule, x: np.ndarray, samples: int) -> dict[str, Any]:
    """Key generation time, encrypted latency per sample, and equality with ``disable``."""
    keygen = qm.keygen()
    clear = qm.forward_integers(x[:samples], fhe="disable")
    latencies, equal = [], True
    for i in range(samples):
        start = time.perf_counter()
        out = qm.forward_integers(x[i : i + 1], fhe="execute")
        latencies.append(time.perf_counter() - start)
        equal &= bool(np.array_equal(out, clear[i : i + 1]))
    return {
        "keygen_seconds": keygen,
        "execute_seconds_per_sample": float(np.mean(latencies)),
        "execute_equals_disable": equal,
    }


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """Write ``rows`` as the results JSON, with the machine they were measured on."""
    out.parent.mkdir(exist_ok=True)
    meta = {"machine": platform.platform(), "cpus": torch.get_num_threads()}
    out.write_text(json.dumps({**meta, "rows": rows}, indent=2))


def rows_from_checkout(script: str, directory: str) -> list[dict[str, Any]]:
    """The "before" rows of a before/after benchmark: ``script --rows before`` run by the
    same interpreter with the fhe_quant of another checkout ``directory`` first on the
    path (its JSON rows on stdout)."""
    env = {**os.environ, "PYTHONPATH": directory, "PYTHONDONTWRITEBYTECODE": "1"}
    done = subprocess.run(
        [sys.executable, script, "--rows", "before"],
        env=env,
        check=True,
        stdout=subprocess.PIPE,
        text=True,
    )
    return json.loads(done.stdout)


def digits_mlp(seed: int = 0) -> torch.nn.Module:
    """The issue's digits MLP 64-64-64-10 (ReLU), untrained, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
