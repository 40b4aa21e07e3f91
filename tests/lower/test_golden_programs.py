"""Golden programs: the integer programs of a handful of models, recorded before the
lowering became one path (issue 13 part 1), must not change.

For every model the record holds each step's kind, operands, widths (accumulator bits,
table input bits, dropped bits) and a digest of its integer constants, the
``lookups_by_width()`` counts (the PBS proxy), a digest of ``IntegerProgram.source()``
and a digest of the program's integer outputs on fixed inputs. Nothing here compiles. The
models under "recorded after part 1" were recorded when accumulator-aware PTQ began to
accept branching models.

Run ``FHE_QUANT_RECORD_GOLDEN=1 pytest tests/lower/test_golden_programs.py`` to record
anew (only when a change of the integers is intended, and say so in the commit).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.lower import IntegerProgram
from fhe_quant.qat import compile_qat_model, prepare_qat
from fhe_quant.torch import compile_torch_model

GOLDEN = pathlib.Path(__file__).parent / "golden" / "programs.json"
RECORD = os.environ.get("FHE_QUANT_RECORD_GOLDEN") == "1"


def _digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for array in arrays:
        a = np.ascontiguousarray(np.asarray(array))
        if a.dtype.kind in "iub":
            a = a.astype(np.int64)
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


def _set_weights(model: nn.Module, seed: int) -> nn.Module:
    """Deterministic weights from NumPy (independent of torch's random streams)."""
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.as_tensor(rng.normal(0, 0.5, size=tuple(p.shape)), dtype=p.dtype))
    return model.eval()


def _mlp() -> nn.Module:
    return _set_weights(
        nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 5)),
        1,
    )


def _conv_chain() -> nn.Module:
    return _set_weights(
        nn.Sequential(
            nn.Conv2d(1, 3, 3, padding=1),
            nn.ReLU(),
            nn.AvgPool2d(2),
            nn.Flatten(),
            nn.Linear(3 * 4 * 4, 4),
        ),
        2,
    )


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv(h) + h)
        return self.head(h.flatten(1))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 6)
        self.b = nn.Linear(16, 5)
        self.head = nn.Linear(11, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1))


def _max_pool() -> nn.Module:
    return _set_weights(
        nn.Sequential(
            nn.Conv2d(1, 2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * 4 * 4, 3),
        ),
        5,
    )


def _x(shape: tuple[int, ...], n: int = 120, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + shape)


def _torch(make: Callable[[], nn.Module], shape: tuple[int, ...], **kwargs: Any) -> Any:
    # NOTE: the PTQ defaults of the recording (issue 14 part 1 made accumulator_bits="auto"
    # the default, with 4-bit tables and mse calibration)
    kwargs = {"accumulator_bits": None, "calibration": "minmax", **kwargs}
    return compile_torch_model(make(), _x(shape), compile=False, **kwargs)


def _qat() -> Any:
    # NOTE: the QAT defaults of the recording (issue 14 part 6 changed them since)
    qat = prepare_qat(
        _mlp(), n_bits=3, X_sample=_x((16,)), seed=0, accumulator_bits=None, rounding_bits=5
    )
    with torch.no_grad():
        qat.train()(torch.as_tensor(_x((16,)), dtype=torch.float32))  # initialise the steps
    return compile_qat_model(qat.eval(), _x((16,)), compile=False)


def _sklearn(kind: str) -> Any:
    from fhe_quant import sklearn as fq

    x = _x((6,), n=150, seed=3)
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if kind == "logistic":
            est = fq.LogisticRegression(n_bits=6).fit(x, y)
        else:
            est = fq.MLPClassifier(  # the default of the recording: no accumulator bound
                n_bits=4, hidden_layer_sizes=(8,), max_iter=60, random_state=0,
                accumulator_bits=None,
            ).fit(x, y)
    return est.quantized_module_


MODELS: dict[str, Callable[[], Any]] = {
    "mlp_6": lambda: _torch(_mlp, (16,), n_bits=6),
    "mlp_4": lambda: _torch(_mlp, (16,), n_bits=4),
    "mlp_3_rounding_5": lambda: _torch(_mlp, (16,), n_bits=3, rounding_bits=5),
    "mlp_6_per_tensor": lambda: _torch(_mlp, (16,), n_bits=6, per_channel=False),
    "mlp_6_acc_12": lambda: _torch(_mlp, (16,), n_bits=6, accumulator_bits=12),
    "mlp_4_acc_9": lambda: _torch(_mlp, (16,), n_bits=4, accumulator_bits=9),
    "conv_chain_5": lambda: _torch(_conv_chain, (1, 8, 8), n_bits=5),
    "conv_chain_5_acc_11": lambda: _torch(_conv_chain, (1, 8, 8), n_bits=5, accumulator_bits=11),
    "residual_5": lambda: _torch(lambda: _set_weights(_Residual(), 3), (1, 8, 8), n_bits=5),
    "concat_6": lambda: _torch(lambda: _set_weights(_Concat(), 4), (16,), n_bits=6),
    "max_pool_5": lambda: _torch(_max_pool, (1, 8, 8), n_bits=5),
    # recorded after part 1: accumulator_bits on branching models (refused before)
    "residual_5_acc_12": lambda: _torch(
        lambda: _set_weights(_Residual(), 3), (1, 8, 8), n_bits=5, accumulator_bits=12
    ),
    "concat_6_acc_13": lambda: _torch(
        lambda: _set_weights(_Concat(), 4), (16,), n_bits=6, accumulator_bits=13
    ),
    "max_pool_5_acc_12": lambda: _torch(_max_pool, (1, 8, 8), n_bits=5, accumulator_bits=12),
    "qat_mlp_3": _qat,
    "sklearn_logistic_6": lambda: _sklearn("logistic"),
    "sklearn_mlp_4": lambda: _sklearn("mlp"),
}


def _step_record(step: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"kind": type(step).__name__, "name": step.name}
    record["inputs"] = list(getattr(step, "inputs", ()))
    for attr in ("acc_bits", "index_bits", "lsbs", "round_bits", "out_bits", "bits"):
        if hasattr(step, attr):
            record[attr] = int(getattr(step, attr))
    arrays = [
        getattr(step, a)
        for a in ("weight", "offset", "acc_max", "table", "index_max", "out_min", "out_max")
        if hasattr(step, a)
    ]
    arrays += list(getattr(step, "multipliers", ()))
    record["constants"] = _digest(*arrays)
    return record


def _program_record(module: Any) -> dict[str, Any]:
    program: IntegerProgram = module.program
    rng = np.random.default_rng(7)
    qmax = program.input_quantizer.qmax
    q = rng.integers(0, qmax + 1, size=(16,) + program.input_shape)
    q = np.concatenate([q, np.zeros_like(q[:1]), np.full_like(q[:1], qmax)])
    out = program(q)
    return {
        "input_shape": list(program.input_shape),
        "input_qmax": int(qmax),
        "steps": [_step_record(s) for s in program.steps],
        "lookups_by_width": {str(k): int(v) for k, v in sorted(program.lookups_by_width().items())},
        "source": hashlib.sha256(program.source().encode()).hexdigest()[:16],
        "outputs": _digest(out),
        "outputs_head": np.asarray(out).reshape(len(q), -1)[0].astype(int).tolist(),
    }


def _recorded() -> dict[str, Any]:
    if not GOLDEN.exists():
        return {}
    return json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("name", list(MODELS))
def test_program_is_unchanged(name: str) -> None:
    torch.manual_seed(0)
    record = _program_record(MODELS[name]())
    if RECORD:
        golden = _recorded()
        golden[name] = record
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
        return
    expected = _recorded()[name]
    assert record["lookups_by_width"] == expected["lookups_by_width"]
    assert record["steps"] == expected["steps"]
    assert record["outputs"] == expected["outputs"]
    assert record["source"] == expected["source"]
    assert record == expected
