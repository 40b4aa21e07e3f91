"""Lowering of convolutions and pooling: zero padding with a non-zero zero point, proven
ranges that hold and are tight, exact pooling weights, per-channel scales."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.frontends.torch import trace_module
from fhe_quant.ir import ConvGeometry, conv_numpy, weight_input_channels
from fhe_quant.lower import NUMPY, LinearStep, TableStep, auto_table_bits
from fhe_quant.model import build_quantized_module, make_config
from fhe_quant.torch import compile_torch_model


def _codes_entering(qm, index: int, q: np.ndarray) -> np.ndarray:
    """The integer tensor that program step ``index`` reads for input codes ``q``."""
    value = q
    for step in qm.program.steps[:index]:
        value = step(value, NUMPY)
    return value


def _dequantized_reference(qm, index: int, q: np.ndarray) -> np.ndarray:
    """Float convolution (torch, zero padding of *real* values) of the dequantized input
    with the dequantized weights: what linear step ``index`` must compute exactly."""
    step = qm.program.steps[index]
    segment = qm.quantized.segments[index // 2]
    linear = segment.linear
    x_hat = linear.input_quantizer.dequantize(_codes_entering(qm, index, q))
    s_in = np.broadcast_to(np.asarray(linear.input_quantizer.scale).reshape(-1), (x_hat.shape[1],))
    s_w = np.broadcast_to(
        np.asarray(linear.weight_quantizer.scale).reshape(-1), (step.weight.shape[0],)
    )
    # weight_q ~ w * s_in[c] / s_w[o], c the input channel weight column (o, j) reads
    s_in_of_weight = s_in[weight_input_channels(linear.node)]
    spatial = (1,) * (step.weight.ndim - 2)
    w_hat = (
        step.weight
        * s_w.reshape((-1, 1) + spatial)
        / s_in_of_weight.reshape(s_in_of_weight.shape + spatial)
    )
    g = ConvGeometry.from_attrs(step.attrs)
    padded = np.pad(x_hat, ((0, 0), (0, 0)) + g.padding)  # real zeros
    fn = torch.conv1d if g.ndim == 1 else torch.conv2d
    out = fn(
        torch.as_tensor(padded),
        torch.as_tensor(w_hat),
        stride=g.stride,
        dilation=g.dilation,
        groups=g.groups,
    ).numpy()
    bias = segment.linear.node.params.get("bias", np.zeros(out.shape[1]))
    return out + bias.reshape((1, -1) + (1,) * (out.ndim - 2))


@pytest.mark.parametrize(
    "last",
    [
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Conv2d(3, 4, 2, padding="same"),  # asymmetric padding
        nn.Conv2d(3, 3, 3, padding=2, stride=2, dilation=2, groups=3),
        nn.Conv1d(3, 2, 3, padding=2),
    ],
    ids=repr,
)
def test_padding_is_the_real_zero_whatever_the_zero_point(last: nn.Module) -> None:
    # Tanh outputs in (-1, 1): the codes entering `last` have zero points near the middle
    # of their range, one per channel; zero padding must still mean the real value 0.
    torch.manual_seed(0)
    nd = 1 if isinstance(last, nn.Conv1d) else 2
    first = nn.Conv1d(2, 3, 1) if nd == 1 else nn.Conv2d(2, 3, 1)
    model = nn.Sequential(first, nn.Tanh(), last)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 2) + (7,) * nd) * 2
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=16, compile=False)
    input_q = qm.quantized.segments[1].linear.input_quantizer
    assert input_q.axis == 1 and len(input_q.zero_point) == 3
    assert min(input_q.zero_point) > 50  # far from 0: a code-0 padding would be wrong
    q = qm.quantize_input(x[:16])
    got = qm.program.output_step.dequantize(qm.program(q))
    np.testing.assert_allclose(got, _dequantized_reference(qm, 2, q), rtol=1e-9, atol=1e-9)
    # and the correction is per position: the border outputs' zeros differ from the centre's
    zero = qm.program.output_step.zero
    assert len(np.unique(zero[0, 0])) > 1


def test_real_zero_input_gives_the_bias_at_every_position() -> None:
    # Inputs in [-1, 3]: the real 0 has the code z = round(1/s) != 0. An all-zero image
    # must give exactly the bias everywhere, borders included.
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1))
    x = np.random.default_rng(1).uniform(-1, 3, size=(40, 2, 5, 5))
    x[0] = -1.0
    x[1] = 3.0
    qm = compile_torch_model(model, x, n_bits=6, compile=False)
    assert all(z > 0 for z in qm.program.input_quantizer.zero_point)
    out = qm.forward(np.zeros((1, 2, 5, 5)))
    bias = model[0].bias.detach().double().numpy()
    np.testing.assert_allclose(
        out, np.broadcast_to(bias[None, :, None, None], out.shape), atol=1e-12
    )


def test_numpy_conv_is_exact_on_integers() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2**20, size=(2, 4, 6, 5))
    w = rng.integers(-(2**20), 2**20, size=(6, 2, 3, 2))
    g = ConvGeometry((2, 1), ((1, 2), (0, 1)), (1, 2), groups=2)
    out = conv_numpy(x, w, g)
    assert out.dtype == np.int64
    # a direct sum (products of 2**40: far beyond float64's exact integers when summed)
    padded = np.pad(x, ((0, 0), (0, 0), (1, 2), (0, 1)))
    ref = np.zeros_like(out)
    for n, o, i, j in np.ndindex(*ref.shape):
        grp = o // 3
        for c, a, b in np.ndindex(2, 3, 2):
            ref[n, o, i, j] += w[o, c, a, b] * padded[n, grp * 2 + c, i * 2 + a, j + 2 * b]
    np.testing.assert_array_equal(out, ref)


# ------------------------------------------------------------------- proven ranges


def _cnn(draw_conv: dict, pool: bool, act: type[nn.Module], seed: int) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Conv2d(**draw_conv), act()]
    if pool:
        layers.append(nn.AvgPool2d(2, stride=1))
    # kernel 2 with padding 1: valid on any input size, and the border outputs read
    # mostly padding
    layers += [nn.Conv2d(draw_conv["out_channels"], 2, 2, padding=1), nn.Flatten()]
    return nn.Sequential(*layers)


conv_configs = st.fixed_dictionaries(
    {
        "in_channels": st.sampled_from([1, 2]),
        "out_channels": st.sampled_from([2, 4]),
        "kernel_size": st.integers(1, 3),
        "stride": st.integers(1, 2),
        "padding": st.integers(0, 2),
        "dilation": st.integers(1, 2),
    }
).map(lambda c: {**c, "groups": c["in_channels"] if c["out_channels"] % 2 == 0 else 1})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    conv=conv_configs,
    pool=st.booleans(),
    bits=st.integers(2, 8),
    table_bits=st.one_of(st.none(), st.integers(2, 9)),
    act=st.sampled_from([nn.ReLU, nn.Tanh, nn.GELU]),
    seed=st.integers(0, 2**16),
)
def test_proven_ranges_hold_for_conv_layers(conv, pool, bits, table_bits, act, seed) -> None:
    model = _cnn(conv, pool, act, seed)
    rng = np.random.default_rng(seed)
    shape = (conv["in_channels"], 7, 7)
    x = rng.normal(size=(48,) + shape)
    qm = compile_torch_model(model, x, n_bits=bits, rounding_bits=table_bits, compile=False)
    qmax = qm.program.input_quantizer.qmax
    q = np.concatenate(
        [
            rng.integers(0, qmax + 1, size=(32,) + shape),
            np.zeros((1,) + shape, dtype=np.int64),
            np.full((1,) + shape, qmax),
            qm.quantize_input(rng.normal(size=(8,) + shape) * 1e6),
        ]
    )
    value = q
    for step in qm.program.steps:
        if isinstance(step, LinearStep):
            assert value.min() >= 0
            value = step(value, NUMPY)
            assert value.min() >= 0 and np.all(value <= step.acc_max)
        else:
            assert np.all((value >> step.lsbs) <= step.index_max)
            assert step.index_bits <= (table_bits or auto_table_bits(step.out_bits))
            value = step(value, NUMPY)
            assert np.all(value >= step.out_min) and np.all(value <= step.out_max)


@pytest.mark.parametrize(
    "conv",
    [nn.Conv2d(2, 3, 3, padding=1), nn.Conv2d(2, 4, 3, stride=2, padding=2, groups=2)],
    ids=repr,
)
def test_worst_case_inputs_reach_the_conv_bound(conv: nn.Module) -> None:
    # Every output's bound is reached, border outputs included: the proof is tight.
    torch.manual_seed(2)
    x = np.random.default_rng(2).normal(size=(40, 2, 5, 5))
    qm = compile_torch_model(nn.Sequential(conv), x, n_bits=4, compile=False)
    step = qm.program.steps[0]
    qmax = qm.program.input_quantizer.qmax
    # the linear map's matrix: the response to each unit input
    basis = np.eye(2 * 5 * 5, dtype=np.int64).reshape(-1, 2, 5, 5)
    jacobian = (step(basis, NUMPY) - step.offset).reshape(len(basis), -1).T
    worst = np.where(jacobian > 0, qmax, 0).reshape(-1, 2, 5, 5)
    best = np.where(jacobian < 0, qmax, 0).reshape(-1, 2, 5, 5)
    diagonal = np.arange(jacobian.shape[0])
    np.testing.assert_array_equal(
        step(worst, NUMPY).reshape(len(worst), -1)[diagonal, diagonal], step.acc_max.ravel()
    )
    np.testing.assert_array_equal(step(best, NUMPY).reshape(len(best), -1)[diagonal, diagonal], 0)


def test_wide_conv_accumulator_is_proven_truncated_and_reported() -> None:
    # 8-bit codes x 8-bit weights over 3x3x16 taps: an accumulator of about 23 bits.
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(16, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 2))
    x = np.random.default_rng(3).normal(size=(32, 16, 4, 4))
    qm = compile_torch_model(
        model, x, n_bits=8, rounding_bits=6, accumulator_bits=None, compile=False
    )
    conv, table = qm.program.steps[0], qm.program.steps[1]
    assert conv.acc_bits > 16
    w = np.abs(conv.weight).reshape(4, -1).sum(axis=1)
    assert int(conv.acc_max.max()) == int(w.max()) * qm.program.input_quantizer.qmax
    assert table.index_bits <= 6 and table.lsbs == table.round_bits - 6
    assert table.round_bits in (conv.acc_bits, conv.acc_bits + 1)
    layer = qm.statistics["layers"][0]
    assert layer["accumulator_bits"] == conv.acc_bits and layer["truncated_bits"] == table.lsbs
    assert "conv(q, W__0[4, 16, 3, 3], stride=(1, 1)" in qm.program.source()
    assert "round_bit_pattern(acc, lsbs_to_remove=" in qm.program.source()


# ------------------------------------------------------------ quantization granularity


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("per_channel_activations", [True, False])
def test_pooling_weights_are_exactly_one(per_channel, per_channel_activations) -> None:
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(12, 2)
    )
    x = np.random.default_rng(4).normal(size=(40, 1, 6, 6))
    config = make_config(
        5, per_channel=per_channel, per_channel_activations=per_channel_activations
    )
    qm = build_quantized_module(trace_module(model, x), x, config, compile=False)
    pool = qm.quantized.segments[1].linear
    assert pool.node.op == "avg_pool"
    np.testing.assert_array_equal(pool.weight_q, np.ones((3, 1, 2, 2)))
    s_in = np.broadcast_to(np.asarray(pool.input_quantizer.scale), (3,))
    np.testing.assert_allclose(pool.weight_quantizer.scale, s_in / 4, rtol=1e-15)
    step = qm.program.steps[2]
    assert step.acc_max.max() == 4 * pool.input_quantizer.qmax  # a plain sum of 4 codes


def test_conv_inputs_are_quantized_per_channel_and_weights_per_output_channel() -> None:
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), nn.Flatten(), nn.Linear(2, 2)
    )
    x = np.random.default_rng(5).normal(size=(40, 3, 5, 5)) * np.array([1, 5, 20])[:, None, None]
    lookups = {}
    for per_channel in (True, False):
        qm = compile_torch_model(  # no budget (a budget makes every scale per channel)
            model, x, n_bits=5, per_channel=per_channel, accumulator_bits=None, compile=False
        )
        first, second, last = (s.linear for s in qm.quantized.segments)
        # one scale per channel (axis 1), shared by all spatial positions
        assert first.input_quantizer.axis == 1 and len(first.input_quantizer.scale) == 3
        assert second.input_quantizer.axis == 1 and len(second.input_quantizer.scale) == 4
        assert last.input_quantizer.axis == 1 and len(last.input_quantizer.scale) == 2
        if per_channel:
            assert first.weight_quantizer.axis == 0 and len(first.weight_quantizer.scale) == 4
        else:
            assert first.weight_quantizer.axis is None
        tables = [s for s in qm.program.steps if isinstance(s, TableStep)]
        lookups[per_channel] = [t.table.shape[0] for t in tables]
    # per-channel weight scales live in the per-element tables: no extra lookup
    assert lookups[True] == lookups[False] == [4 * 3 * 3, 2 * 1 * 1]
