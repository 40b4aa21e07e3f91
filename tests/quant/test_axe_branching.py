"""Accumulator-aware PTQ on branching models (residual adds, concatenations, max
pooling): every linear layer's proven accumulator fits ``accumulator_bits``, the
program's values stay inside their proofs, and the budget costs little accuracy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.lower import NUMPY, AddStep, LinearStep, MaxPoolStep, TableStep
from fhe_quant.quant import axe
from fhe_quant.torch import compile_torch_model


class _ResidualCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(self.conv(h) + h)
        return self.head(self.pool(h).flatten(1))


class _ConcatCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 3, 3, padding=1)
        self.b = nn.Conv2d(1, 2, 1)
        self.head = nn.Linear(5 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([torch.relu(self.a(x)), torch.sigmoid(self.b(x))], dim=1)
        return self.head(h.flatten(1))


class _SumReader(nn.Module):
    """A dense layer that reads a residual sum directly (no activation after the add)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)) + x)


class _PooledSum(nn.Module):
    """A max pool of a residual sum, read by a dense layer."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 1, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x)) + x
        return self.head(self.pool(h).flatten(1))


def _data(shape: tuple[int, ...], n: int = 200) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n,) + shape)


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _values(program, q: np.ndarray) -> list[np.ndarray]:
    values = [q]
    for step in program.steps:
        inputs = getattr(step, "inputs", ()) or (len(values) - 1,)
        if getattr(step, "multi_operand", False):
            operand = tuple(values[i] for i in inputs)
        else:
            operand = values[inputs[0]]
        values.append(np.asarray(step(operand, NUMPY)))
    return values


def _assert_fits_and_proofs_hold(qm, bits: int) -> None:
    program = qm.program
    linears = [s for s in program.steps if isinstance(s, LinearStep)]
    assert linears and all(s.acc_bits <= bits for s in linears)
    # no accumulator enters an add as it is: every operand is codes (multipliers 1)
    for step in program.steps:
        if isinstance(step, AddStep):
            assert all(np.all(np.abs(m) == 1) for m in step.multipliers)
    by_index = {k + 1: s for k, s in enumerate(program.steps)}
    for step in program.steps:
        source = by_index.get(step.inputs[0]) if getattr(step, "inputs", ()) else None
        if isinstance(step, TableStep) and isinstance(source, LinearStep):
            # the budget kept room to round without a carry: no extra dropped bit
            assert step.lsbs == max(0, source.acc_bits - step.index_bits)
    rng = np.random.default_rng(1)
    qmax = program.input_quantizer.qmax
    shape = (30,) + program.input_shape
    q = np.concatenate([rng.integers(0, qmax + 1, size=shape), rng.choice([0, qmax], size=shape)])
    for step, value in zip(program.steps, _values(program, q)[1:], strict=True):
        if isinstance(step, (LinearStep, AddStep)):
            assert value.min() >= 0 and np.all(value <= step.acc_max)


@pytest.mark.parametrize(
    ("cls", "shape", "bits"),
    [(_ResidualCNN, (1, 8, 8), 11), (_ConcatCNN, (1, 8, 8), 12), (_SumReader, (6,), 10)],
)
def test_branching_accumulators_fit(cls, shape, bits) -> None:
    x = _data(shape)
    model = _model(cls)
    free = compile_torch_model(model, x, n_bits=5, accumulator_bits=None, compile=False)
    qm = compile_torch_model(model, x, n_bits=5, accumulator_bits=bits, compile=False)
    assert max(s.acc_bits for s in free.program.steps if isinstance(s, LinearStep)) > bits
    _assert_fits_and_proofs_hold(qm, bits)
    # the budget costs little: the error against the float model stays close to free PTQ's
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    spread = expected.std()
    free_error = np.abs(free.forward(x) - expected).mean() / spread
    budget_error = np.abs(qm.forward(x) - expected).mean() / spread
    assert budget_error <= max(3 * free_error, 0.15)


def test_residual_cnn_keeps_its_max_pool_and_its_lookups_per_table() -> None:
    x = _data((1, 8, 8))
    qm = compile_torch_model(_model(_ResidualCNN), x, n_bits=5, accumulator_bits=11, compile=False)
    kinds = [type(s).__name__ for s in qm.program.steps]
    assert kinds.count("MaxPoolStep") == 1 and kinds.count("AddStep") == 1
    pool = next(s for s in qm.program.steps if isinstance(s, MaxPoolStep))
    assert pool.bits <= 5  # the pool compares codes, not accumulators


def test_too_small_a_budget_on_a_branching_model_names_the_layer() -> None:
    x = _data((6,))
    with pytest.raises(axe.AccumulatorBudgetError) as info:
        compile_torch_model(_model(_SumReader), x, n_bits=5, accumulator_bits=5, compile=False)
    # the dense layer after the add reads a sum of two 5-bit codes (range 62): 6 bits
    assert info.value.layer == "b (Linear)" and info.value.smallest_bits == 6
    # nothing lost: the width the message names works
    qm = compile_torch_model(_model(_SumReader), x, n_bits=5, accumulator_bits=6, compile=False)
    _assert_fits_and_proofs_hold(qm, 6)


def test_a_max_pool_of_a_residual_sum_is_refused_with_a_budget_only() -> None:
    x = _data((1, 4, 4))
    model = _model(_PooledSum)
    compile_torch_model(model, x, n_bits=5, accumulator_bits=None, compile=False)  # no budget
    with pytest.raises(UnsupportedOpError, match="max pool of a residual sum") as info:
        compile_torch_model(model, x, n_bits=5, accumulator_bits=12, compile=False)
    assert "head (Linear)" in str(info.value)


@pytest.mark.slow
def test_budgeted_residual_cnn_simulate_equals_disable() -> None:
    x = _data((1, 8, 8), n=100)
    qm = compile_torch_model(
        _model(_ResidualCNN), x, n_bits=4, accumulator_bits=10, rounding_bits=5, p_error=1e-12
    )
    _assert_fits_and_proofs_hold(qm, 10)
    x_test = np.concatenate([x[:3], np.full((1, 1, 8, 8), 9.0)])
    np.testing.assert_array_equal(
        qm.forward_integers(x_test, fhe="simulate"), qm.forward_integers(x_test, fhe="disable")
    )
