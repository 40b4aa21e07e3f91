"""Concrete ML's half of ``benchmarks/side_by_side.py``, run by a separate interpreter.

Concrete ML 1.9 pins its own torch, brevitas and concrete-python, so it lives in its own
virtual environment (``/work/cmlvenv``) and never in fhe_quant's. This script imports
neither fhe_quant nor anything outside numpy, torch, scikit-learn and concrete-python at
module level, so ``side_by_side.py`` imports its helpers too: the float models, the
plain training loop and the circuit columns are the same code on both sides.

It loads the weights and data split that ``side_by_side.py`` saved (``WORK/NAME.npz``),
builds the same float model, quantizes and compiles it with Concrete ML's public API
(``compile_torch_model``, ``compile_brevitas_qat_model``, ``from_sklearn_model``), and
measures the same columns: simulated test accuracy, lookups by table width, Concrete's
complexity, evaluation key size, and with real keys the key generation time and the
encrypted latency of ``--samples`` samples. One JSON row per model is printed on stdout.

Usage (normally called by side_by_side.py)::

    /work/cmlvenv/bin/python benchmarks/side_by_side_cml.py --work DIR \
        [--models mlp_ptq ...] [--samples 2] [--skip-keygen] [--max-key-gb 2]
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

#: The six models of issue 14's table, in its order.
MODELS = ("mlp_ptq", "cnn_ptq", "mlp_qat", "rf", "dt", "logreg")

#: What each model is, for the tables.
TITLES = {
    "mlp_ptq": "digits MLP 64-64-64-10, 6-bit PTQ",
    "cnn_ptq": "digits CNN conv(1->8,3x3)-ReLU-avgpool2-linear(72->10), 6-bit PTQ",
    "mlp_qat": "digits MLP 64-64-64-10, 3-bit QAT",
    "rf": "RandomForest 20 trees depth 4, breast cancer, 6 bits",
    "dt": "DecisionTree depth 5, wine, 6 bits",
    "logreg": "LogisticRegression, make_classification 2000x100, 8 bits",
}

#: The scikit-learn hyper-parameters (fitted with these, random_state=0, on both sides).
SKLEARN_PARAMS: dict[str, dict[str, Any]] = {
    "rf": {"n_estimators": 20, "max_depth": 4, "random_state": 0},
    "dt": {"max_depth": 5, "random_state": 0},
    "logreg": {"max_iter": 1000},
}


# ---------------------------------------------------------------- shared with ours
def load_average() -> float:
    """The 1-minute load average now."""
    return round(os.getloadavg()[0], 2)


def uptime() -> str:
    """``uptime``'s line (what the issue asks to record before each model)."""
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def float_torch_model(name: str) -> Any:
    """The untrained float module of ``name`` (seeded: the same on both sides)."""
    import torch

    torch.manual_seed(0)
    if name == "cnn_ptq":
        return torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 3),
            torch.nn.ReLU(),
            torch.nn.AvgPool2d(2),
            torch.nn.Flatten(),
            torch.nn.Linear(72, 10),
        )
    return torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def plain_loop(model: Any, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> Any:
    """The loop users write: Adam 1e-3, batch 64, cross-entropy, no schedule, seed 0."""
    import torch

    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.CrossEntropyLoss()
    x_all = torch.tensor(x, dtype=torch.float32)
    y_all = torch.tensor(y, dtype=torch.long)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_all)).split(64):
            optimizer.zero_grad()
            loss(model(x_all[batch]), y_all[batch]).backward()
            optimizer.step()
    return model.eval()


def load_state(model: Any, saved: Any) -> Any:
    """Load the ``w:``-prefixed arrays of a saved ``.npz`` into a torch module."""
    import torch

    state = {k[2:]: torch.tensor(saved[k]) for k in saved.files if k.startswith("w:")}
    model.load_state_dict(state)
    return model.eval()


def fit_sklearn(name: str, saved: Any) -> Any:
    """The float scikit-learn model of ``name`` from the saved split: trees are re-fitted
    (seeded) and checked against the saved structure; a logistic regression gets the
    saved coefficients."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.tree import DecisionTreeClassifier

    params = SKLEARN_PARAMS[name]
    x, y = saved["x_train"], saved["y_train"]
    if name == "logreg":
        model = LogisticRegression(**params).fit(x, y)
        model.coef_ = np.array(saved["coef"], dtype=np.float64)
        model.intercept_ = np.array(saved["intercept"], dtype=np.float64)
        return model
    cls = RandomForestClassifier if name == "rf" else DecisionTreeClassifier
    return cls(**params).fit(x, y)


def tree_signature(model: Any) -> np.ndarray:
    """Every node's (feature, threshold, predicted class) of a fitted forest or tree."""
    trees = getattr(model, "estimators_", [model])
    rows = []
    for tree in trees:
        t = tree.tree_
        rows.append(np.stack([t.feature, t.threshold, t.value[:, 0].argmax(axis=1)], axis=1))
    return np.concatenate(rows).astype(np.float64)


def circuit_columns(circuit: Any) -> dict[str, Any]:
    """The columns read from a compiled concrete ``fhe.Circuit`` (no keys needed):
    bootstraps, complexity, key sizes, widest integer, and the table lookups by the
    width of their encrypted input (read from the graph, the same way on both sides)."""
    lookups: dict[int, int] = {}
    rounded = 0
    for node in circuit.graph.graph.nodes:
        if node.converted_to_table_lookup:
            width = max(int(v.dtype.bit_width) for v in node.inputs if v.is_encrypted)
            lookups[width] = lookups.get(width, 0) + int(node.output.size)
        if node.properties.get("name") == "round_bit_pattern":
            rounded += int(node.output.size)
    per_parameter = []
    for param, count in circuit.programmable_bootstrap_count_per_parameter.items():
        key = [
            int(getattr(param, name)())
            for name in ("polynomial_size", "glwe_dimension", "input_lwe_dimension", "level")
        ]
        per_parameter.append([key, int(count)])
    return {
        "pbs_count": int(circuit.programmable_bootstrap_count),
        "complexity": float(circuit.complexity),
        "max_bit_width": int(circuit.graph.maximum_integer_bit_width()),
        "lookups_by_input_bits": {str(k): v for k, v in sorted(lookups.items())},
        "rounded_values": rounded,
        "pbs_per_parameter": sorted(per_parameter),
        "bootstrap_key_bytes": int(circuit.size_of_bootstrap_keys),
        "keyswitch_key_bytes": int(circuit.size_of_keyswitch_keys),
        "key_bytes": int(circuit.size_of_bootstrap_keys + circuit.size_of_keyswitch_keys),
    }


def accuracy(predict: Callable, x: np.ndarray, y: np.ndarray, fhe: str, chunk: int = 32) -> float:
    """Accuracy of ``predict(x, fhe)`` on the whole split, ``chunk`` samples at a time
    (a whole test split simulated at once can take gigabytes)."""
    hits = sum(
        int(np.sum(predict(x[i : i + chunk], fhe) == y[i : i + chunk]))
        for i in range(0, len(x), chunk)
    )
    return hits / len(x)


def timed_runs(
    keygen: Callable[[], Any], run_one: Callable[[np.ndarray], Any], x: np.ndarray, samples: int
) -> dict[str, Any]:
    """Key generation once, then ``samples`` encrypted runs of one sample each."""
    start = time.perf_counter()
    keygen()
    keygen = time.perf_counter() - start
    latencies = []
    for i in range(samples):
        start = time.perf_counter()
        run_one(x[i : i + 1])
        latencies.append(time.perf_counter() - start)
    return {
        "keygen_seconds": keygen,
        "execute_seconds_per_sample": float(np.mean(latencies)),
        "execute_seconds": latencies,
        "load_average_after": load_average(),
    }


# ---------------------------------------------------------------- Concrete ML side
def _brevitas_mlp(float_model: Any, n_bits: int = 3) -> Any:
    """The digits MLP as a Brevitas ``n_bits`` model, started from the float weights."""
    import brevitas.nn as qnn
    import torch

    class QuantMLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = qnn.QuantIdentity(bit_width=n_bits, return_quant_tensor=True)
            self.fc1 = qnn.QuantLinear(64, 64, bias=True, weight_bit_width=n_bits)
            self.r1 = qnn.QuantReLU(bit_width=n_bits, return_quant_tensor=True)
            self.fc2 = qnn.QuantLinear(64, 64, bias=True, weight_bit_width=n_bits)
            self.r2 = qnn.QuantReLU(bit_width=n_bits, return_quant_tensor=True)
            self.fc3 = qnn.QuantLinear(64, 10, bias=True, weight_bit_width=n_bits)

        def forward(self, x: Any) -> Any:
            x = self.r1(self.fc1(self.inp(x)))
            return self.fc3(self.r2(self.fc2(x)))

    model = QuantMLP()
    for mine, theirs in ((model.fc1, 0), (model.fc2, 2), (model.fc3, 4)):
        mine.weight.data.copy_(float_model[theirs].weight.data)
        mine.bias.data.copy_(float_model[theirs].bias.data)
    return model


def _cml_torch(name: str, saved: Any) -> tuple[Any, Any, Callable, Callable]:
    from concrete.ml.torch.compile import compile_brevitas_qat_model, compile_torch_model

    x_train, y_train = saved["x_train"], saved["y_train"]
    float_model = load_state(float_torch_model(name), saved)
    if name == "mlp_qat":
        model = plain_loop(_brevitas_mlp(float_model), x_train, y_train)
        qm = compile_brevitas_qat_model(model, x_train, rounding_threshold_bits=6)
    else:
        qm = compile_torch_model(float_model, x_train, n_bits=6, rounding_threshold_bits=6)

    def predict(x: np.ndarray, fhe: str) -> np.ndarray:
        return qm.forward(x, fhe=fhe).argmax(axis=1)

    return qm, qm.fhe_circuit, predict, lambda x: qm.forward(x, fhe="execute")


def _cml_sklearn(name: str, saved: Any) -> tuple[Any, Any, Callable, Callable]:
    from concrete.ml.sklearn import (
        DecisionTreeClassifier,
        LogisticRegression,
        RandomForestClassifier,
    )

    sk = fit_sklearn(name, saved)
    if name != "logreg" and not np.array_equal(tree_signature(sk), saved["tree_signature"]):
        raise RuntimeError(f"{name}: the re-fitted trees differ from the saved ones")
    cls = {"rf": RandomForestClassifier, "dt": DecisionTreeClassifier}.get(name, LogisticRegression)
    n_bits = 8 if name == "logreg" else 6
    model = cls.from_sklearn_model(sk, saved["x_train"], n_bits=n_bits)
    model.compile(saved["x_train"])

    def predict(x: np.ndarray, fhe: str) -> np.ndarray:
        return model.predict(x, fhe=fhe)

    return model, model.fhe_circuit, predict, lambda x: model.predict(x, fhe="execute")


def measure_cml(
    name: str, work: Path, samples: int, keygen: bool, max_key_bytes: float = float("inf")
) -> dict[str, Any]:
    """Concrete ML's row for model ``name``."""
    from importlib.metadata import version

    saved = np.load(work / f"{name}.npz")
    row: dict[str, Any] = {
        "side": "concrete-ml",
        "label": f"concrete-ml {version('concrete-ml')}",
        "model": name,
        "uptime_before": uptime(),
        "load_average_before": load_average(),
        "concrete_python": version("concrete-python"),
    }
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = _cml_torch if name in ("mlp_ptq", "cnn_ptq", "mlp_qat") else _cml_sklearn
        _, circuit, predict, run_one = build(name, saved)
    row["compile_seconds"] = time.perf_counter() - start
    row.update(circuit_columns(circuit))
    x_test, y_test = saved["x_test"], saved["y_test"]
    row["accuracy_simulate"] = accuracy(predict, x_test, y_test, "simulate")
    row["accuracy_disable"] = accuracy(predict, x_test, y_test, "disable")
    row["float_accuracy"] = float(saved["float_accuracy"])
    if keygen and row["key_bytes"] > max_key_bytes:
        row["keygen_skipped"] = f"evaluation keys {row['key_bytes'] / 1e9:.1f} GB > --max-key-gb"
    elif keygen:
        row.update(timed_runs(lambda: circuit.keygen(force=True), run_one, x_test, samples))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--skip-keygen", action="store_true")
    parser.add_argument("--max-key-gb", type=float, default=2.0)
    args = parser.parse_args()
    for name in args.models:
        row = measure_cml(
            name, args.work, args.samples, not args.skip_keygen, args.max_key_gb * 1e9
        )
        print(json.dumps(row), flush=True)
        print(f"{name}: done", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
