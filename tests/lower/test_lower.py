"""Lowering invariants: proven ranges hold, tables stay narrow, bits are dropped exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.errors import ParameterError
from fhe_quant.lower import MAX_TABLE_BITS, NUMPY, LinearStep, TableStep, auto_table_bits, bits_for
from fhe_quant.torch import compile_torch_model


def _mlp(widths: list[int], act: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers.append(nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    widths=st.lists(st.integers(1, 12), min_size=2, max_size=4),
    bits=st.integers(2, 8),
    table_bits=st.one_of(st.none(), st.integers(2, 10)),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.LeakyReLU]),
    seed=st.integers(0, 2**16),
)
def test_proven_ranges_hold_on_extreme_and_random_inputs(
    widths, bits, table_bits, act, seed
) -> None:
    model = _mlp(widths, act, seed)
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, widths[0]))
    qm = compile_torch_model(model, x, n_bits=bits, rounding_bits=table_bits, compile=False)
    program = qm.program
    qmax = program.input_quantizer.qmax
    # random integers, all-min, all-max, and far-out float inputs (clipped by the client)
    q = np.concatenate(
        [
            rng.integers(0, qmax + 1, size=(64, widths[0])),
            np.zeros((1, widths[0]), dtype=np.int64),
            np.full((1, widths[0]), qmax),
            qm.quantize_input(rng.normal(size=(16, widths[0])) * 1e6),
        ]
    )
    value = q
    for step in program.steps:
        if isinstance(step, LinearStep):
            assert value.min() >= 0
            value = step(value, NUMPY)
            assert value.min() >= 0 and np.all(value <= step.acc_max)
        else:
            assert np.all((value >> step.lsbs) <= step.index_max)
            assert step.index_bits <= (table_bits or auto_table_bits(step.out_bits))
            value = step(value, NUMPY)
            assert np.all(value >= step.out_min) and np.all(value <= step.out_max)


def test_extreme_inputs_reach_the_proven_bound() -> None:
    # The bound is tight for the first layer: the worst-case input reaches it.
    model = _mlp([6, 3], nn.ReLU, seed=3)
    x = np.random.default_rng(0).normal(size=(50, 6))
    qm = compile_torch_model(model, x, n_bits=4, compile=False)
    step = qm.program.steps[0]
    assert isinstance(step, LinearStep)
    w = step.weight
    qmax = qm.program.input_quantizer.qmax
    for j in range(w.shape[0]):
        worst = np.where(w[j] > 0, qmax, 0)[None, :]
        assert step(worst, NUMPY)[0, j] == step.acc_max[0, j]
        best = np.where(w[j] < 0, qmax, 0)[None, :]
        assert step(best, NUMPY)[0, j] == 0


def test_inputs_outside_the_calibrated_range_are_clipped_not_wrapped() -> None:
    model = _mlp([4, 8, 2], nn.ReLU, seed=1)
    x = np.random.default_rng(1).normal(size=(100, 4))
    qm = compile_torch_model(model, x, n_bits=4, compile=False)
    far = np.array([[1e9, -1e9, 1e9, -1e9]])
    edge = np.array([[x[:, 0].max(), x[:, 1].min(), x[:, 2].max(), x[:, 3].min()]])
    np.testing.assert_array_equal(qm.quantize_input(far), qm.quantize_input(edge))
    np.testing.assert_array_equal(qm.forward(far), qm.forward(edge))


def test_wide_accumulator_is_truncated_to_the_table_width() -> None:
    # 8-bit inputs times 8-bit weights over 256 inputs: an accumulator of ~23 bits.
    model = _mlp([256, 4, 2], nn.ReLU, seed=2)
    x = np.random.default_rng(2).normal(size=(64, 256))
    qm = compile_torch_model(  # no budget: the default before accumulator_bits='auto'
        model, x, n_bits=8, rounding_bits=6, accumulator_bits=None, compile=False
    )
    first, table = qm.program.steps[0], qm.program.steps[1]
    assert first.acc_bits > MAX_TABLE_BITS
    assert table.index_bits <= 6
    assert table.lsbs == table.round_bits - 6
    assert table.round_bits in (first.acc_bits, first.acc_bits + 1)
    layer = qm.statistics["layers"][0]
    assert layer["table_input_bits"] <= 6 and layer["truncated_bits"] == table.lsbs


def test_without_dropped_bits_the_tables_are_exact() -> None:
    model = _mlp([5, 6, 3], nn.Tanh, seed=4)
    x = np.random.default_rng(4).normal(size=(80, 5))
    qm = compile_torch_model(model, x, n_bits=3, rounding_bits=16, compile=False)
    assert all(s.lsbs == 0 for s in qm.program.steps if isinstance(s, TableStep))
    q = qm.quantize_input(x)
    np.testing.assert_array_equal(qm.program(q), qm.program.run_without_rounding(q))


def test_rounding_bits_out_of_range_is_refused() -> None:
    model = _mlp([3, 2], nn.ReLU, seed=0)
    with pytest.raises(ParameterError, match="rounding_bits"):
        compile_torch_model(model, np.ones((4, 3)), rounding_bits=17, compile=False)


def test_bits_for_and_auto_width() -> None:
    assert [bits_for(v) for v in (0, 1, 2, 3, 4, 255, 256)] == [1, 1, 2, 2, 3, 8, 9]
    assert [auto_table_bits(b) for b in (2, 3, 4, 5, 6, 7, 8)] == [5, 5, 5, 6, 7, 7, 7]


def test_program_source_lists_every_step() -> None:
    model = _mlp([3, 4, 2], nn.ReLU, seed=0)
    qm = compile_torch_model(
        model, np.random.default_rng(0).normal(size=(20, 3)), n_bits=3, compile=False
    )
    text = qm.program.source()
    assert text.count("acc = linear(") == 2 and "table_" in text and "proven" in text
