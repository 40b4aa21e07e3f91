"""``accumulator_bits="auto"`` (the PTQ default): the widths it picks are the rule's, the
proven accumulators fit them, ``disable == simulate`` bit for bit, the quantized path
the weights are chosen against, and the fallback on a layer it cannot bound."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.frontends.torch import trace_module
from fhe_quant.lower import NUMPY, LinearStep, TableStep, lower
from fhe_quant.passes import simplify
from fhe_quant.quant import axe, ptq
from fhe_quant.quant.config import AUTO_TABLE_BITS, QuantConfig, default_calibration
from fhe_quant.torch import compile_torch_model
from tests.quant.test_axe_branching import _PooledSum, _ResidualCNN


def _mlp(seed: int, widths: tuple[int, ...] = (12, 16, 16, 3)) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _x(shape: tuple[int, ...], n: int = 200, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n,) + shape)


def _linear_steps(qm) -> list[LinearStep]:
    return [s for s in qm.program.steps if isinstance(s, LinearStep)]


# ------------------------------------------------------------------------- the config


def test_auto_sets_the_table_width_and_narrows_the_activation_codes() -> None:
    config = QuantConfig.from_n_bits(6, accumulator_bits="auto")
    assert config.rounding_bits == AUTO_TABLE_BITS == 4
    assert config.n_bits_activations == 4  # a 4-bit table has at most 16 outputs
    assert (config.n_bits_inputs, config.n_bits_weights, config.n_bits_outputs) == (6, 6, 6)
    assert QuantConfig.from_dict(config.to_dict()) == config
    # an explicit table width is kept; the codes still follow it
    wide = QuantConfig.from_n_bits(6, accumulator_bits="auto", rounding_bits=5)
    assert (wide.rounding_bits, wide.n_bits_activations) == (5, 5)
    narrow = QuantConfig.from_n_bits(3, accumulator_bits="auto")
    assert (narrow.rounding_bits, narrow.n_bits_activations) == (4, 3)
    # None and ints are untouched
    assert QuantConfig.from_n_bits(6, accumulator_bits=11).n_bits_activations == 6
    assert QuantConfig.from_n_bits(6).rounding_bits is None


@pytest.mark.parametrize("bad", ["Auto", "", "12"])
def test_config_rejects_other_strings(bad) -> None:
    with pytest.raises(ValueError, match="None, 'auto' or an int"):
        QuantConfig(accumulator_bits=bad)


def test_default_calibration() -> None:
    assert default_calibration(None, "auto") == "mse"
    assert default_calibration(None, 11) == default_calibration(None, None) == "minmax"
    assert default_calibration("minmax", "auto") == "minmax"


# ------------------------------------------------------------------------- the rule


@given(
    values=st.lists(st.floats(-20, 60, allow_nan=False), min_size=1, max_size=12),
    margin=st.floats(0, 10),
    enough=st.floats(-10, 60),
)
def test_smallest_within_is_the_smallest_width_meeting_the_target(values, margin, enough) -> None:
    sqnr = {4 + i: v for i, v in enumerate(values)}
    chosen = axe.smallest_within(sqnr, margin, enough)
    target = min(max(values) - margin, enough)
    assert sqnr[chosen] >= target
    assert all(sqnr[bits] < target for bits in sqnr if bits < chosen)


def test_layer_error_adds_the_rounding_variance() -> None:
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(3, 5)), rng.uniform(0, 15, size=(40, 5))
    q, scale = axe.quantize_rows(w, x, x, qmax=7, budget=20)
    plain = axe.output_error(w, q, scale, x, x)
    np.testing.assert_allclose(axe.layer_error(w, q, scale, x, x, 0), plain)
    np.testing.assert_allclose(
        axe.layer_error(w, q, scale, x, x, 3), plain + (scale * 8) ** 2 / 12
    )


def _rule_width(quantized, graph, values, node_name: str, table: int | None) -> int:
    """The width the rule gives one dense layer, recomputed from axe's pieces."""
    dag = quantized.plan
    node = graph.node(node_name)
    quantizer = dag.input_quantizer if node.inputs[0] == dag.input_name else None
    quantizer = quantizer or dag.tables[node.inputs[0]]
    x_q = quantizer.quantize(values[node.inputs[0]]) - quantizer.zero_point_array(2)
    folded = node.params["weight"] * np.asarray(quantizer.scale)[None, :]
    bits = quantized.config.n_bits_outputs if table is None else quantized.config.n_bits_weights
    qmax = 2 ** (bits - 1) - 1
    signal = np.var(x_q @ folded.T, axis=0).mean()
    sqnr = {}
    low = axe.smallest_accumulator_bits(quantizer.qmax, table)
    for width in range(low, 17):
        budget = axe.l1_budget(width, quantizer.qmax, table)
        q, scale = axe.quantize_rows(folded, x_q, x_q, qmax, budget, True, (1.0,))
        lsbs = 0 if table is None else max(0, width - table)
        sqnr[width] = 10 * np.log10(signal / axe.layer_error(folded, q, scale, x_q, x_q, lsbs).mean())
    return axe.smallest_within(sqnr)


def test_the_chosen_width_is_the_rules() -> None:
    x = _x((12,))
    qm = compile_torch_model(_mlp(3), x, n_bits=6, compile=False)
    assert qm.quantized.config.accumulator_bits == "auto"
    graph = qm.quantized.graph
    values = graph.run(x)
    dense = [n.name for n in graph.nodes if n.op == "linear"]
    widths = [
        _rule_width(qm.quantized, graph, values, name, None if name == dense[-1] else 4)
        for name in dense
    ]
    # one width for the model, the widest a layer asks for; every accumulator fits it
    assert max(s.acc_bits for s in _linear_steps(qm)) == max(widths)
    assert all(s.acc_bits <= max(widths) for s in _linear_steps(qm))
    # and the same width given explicitly gives the same program
    explicit = compile_torch_model(
        _mlp(3), x, n_bits={"inputs": 6, "weights": 6, "activations": 4, "outputs": 6},
        accumulator_bits=max(widths), rounding_bits=4, calibration="mse", compile=False,
    )
    for a, b in zip(_linear_steps(qm), _linear_steps(explicit), strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)


# ------------------------------------------------------------------------- the programs


def _assert_fits(qm) -> None:
    """Every proven accumulator fits the model's width, and rounding to the table never
    drops more than the width promises."""
    linear = _linear_steps(qm)
    width = max(s.acc_bits for s in linear)
    steps = qm.program.steps
    for before, table in zip(steps, steps[1:], strict=False):
        if isinstance(table, TableStep) and isinstance(before, LinearStep):
            assert table.lsbs <= max(0, width - table.index_bits)
            assert table.index_bits <= AUTO_TABLE_BITS


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16), n_bits=st.integers(3, 7), hidden=st.integers(4, 24))
def test_auto_mlp_fits_and_its_values_stay_in_their_proofs(seed, n_bits, hidden) -> None:
    x = _x((12,), n=120, seed=seed)
    qm = compile_torch_model(_mlp(seed, (12, hidden, hidden, 3)), x, n_bits=n_bits, compile=False)
    _assert_fits(qm)
    # every accumulator of the calibration data and of extreme codes stays in its proof
    qmax = qm.program.input_quantizer.qmax
    q = np.concatenate([qm.program.input_quantizer.quantize(x), np.full((2, 12), qmax)])
    q[-1] = 0
    value = q
    for step in qm.program.steps:
        value = step(value, NUMPY)
        if isinstance(step, LinearStep):
            assert value.min() >= 0 and np.all(value <= step.acc_max)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**16))
def test_auto_simulate_equals_disable_bit_for_bit(seed) -> None:
    x = _x((12,), n=100, seed=seed)
    qm = compile_torch_model(_mlp(seed), x, n_bits=6, p_error=1e-9)
    x_test = np.concatenate([x[:20], np.full((1, 12), 50.0), np.full((1, 12), -50.0)])
    np.testing.assert_array_equal(
        qm.forward_integers(x_test, fhe="simulate"), qm.forward_integers(x_test, fhe="disable")
    )


# ------------------------------------------------------------------------- the quantized path


def test_the_path_computes_with_the_integer_weights_on_the_quantized_codes() -> None:
    x = _x((12,))
    qm = compile_torch_model(_mlp(1), x, n_bits=6, compile=False)
    graph, dag = qm.quantized.graph, qm.quantized.plan
    values = graph.run(x)
    path = ptq._QuantizedPath(graph, dag, values, ptq._Codes(graph, dag, values))
    first = next(n for n in graph.nodes if n.op == "linear")
    path.linears[first.name] = dag.linears[first.name]
    quantized = dag.linears[first.name]
    codes = dag.input_quantizer.quantize(x) - dag.input_quantizer.zero_point_array(2)
    weight = quantized.weight_q * np.asarray(quantized.weight_quantizer.scale)[:, None]
    expected = codes @ weight.T + first.params["bias"]
    np.testing.assert_allclose(path[first.name], expected)
    # the table after it holds codes of its quantizer (dequantized)
    table = next(iter(dag.tables))
    quantizer = dag.tables[table]
    np.testing.assert_allclose(
        path[table], quantizer.dequantize(quantizer.quantize(np.maximum(expected, 0)))
    )
    assert not np.allclose(path[first.name], values[first.name])  # not the float values


def test_the_path_lowers_the_error_against_the_float_model() -> None:
    """Choosing each layer's roundings against the quantized upstream values (instead
    of the float ones) lowers the output error on held-out data."""
    x, x_test = _x((12,), n=300), _x((12,), n=300, seed=9)
    model = _mlp(5, (12, 32, 32, 3))
    with torch.no_grad():
        expected = model(torch.as_tensor(x_test, dtype=torch.float32)).double().numpy()
    qm = compile_torch_model(model, x, n_bits=6, accumulator_bits=10, compile=False)
    with_path = np.mean((qm.forward(x_test) - expected) ** 2)
    original = ptq._QuantizedPath.__getitem__
    try:  # the float values instead of the quantized ones
        ptq._QuantizedPath.__getitem__ = lambda self, name: self.values[name]
        float_qm = compile_torch_model(model, x, n_bits=6, accumulator_bits=10, compile=False)
    finally:
        ptq._QuantizedPath.__getitem__ = original
    without = np.mean((float_qm.forward(x_test) - expected) ** 2)
    assert with_path < without


# ------------------------------------------------------------------------- branching models


def test_the_frontends_keep_none_on_a_branching_model_and_say_so() -> None:
    torch.manual_seed(0)
    x = _x((1, 8, 8), n=120)
    model = _ResidualCNN().eval()
    qm = compile_torch_model(model, x, n_bits=5, compile=False)
    assert qm.quantized.config.accumulator_bits is None  # recorded: "auto" did not apply
    before = compile_torch_model(
        model, x, n_bits=5, accumulator_bits=None, calibration="minmax",
        compile=False,
    )
    for a, b in zip(_linear_steps(qm), _linear_steps(before), strict=True):
        np.testing.assert_array_equal(a.weight, b.weight)
    chain = compile_torch_model(_mlp(0), _x((12,)), n_bits=5, compile=False)
    assert chain.quantized.config.accumulator_bits == "auto"


def _quantize_auto(model: nn.Module, x: np.ndarray):
    graph = simplify(trace_module(model, x))
    return graph, ptq.quantize_graph(graph, x, QuantConfig.from_n_bits(5, accumulator_bits="auto"))


def test_auto_config_on_a_residual_cnn_fits_and_keeps_its_adds() -> None:
    torch.manual_seed(0)
    x = _x((1, 8, 8), n=120)
    _, quantized = _quantize_auto(_ResidualCNN().eval(), x)
    program = lower(quantized)
    linear = [s for s in program.steps if isinstance(s, LinearStep)]
    widths = [s.acc_bits for s in linear if s.weight.size > 1]
    assert max(widths) <= 16
    steps = program.steps
    for table in steps:
        if isinstance(table, TableStep):
            assert table.index_bits <= AUTO_TABLE_BITS
    assert [type(s).__name__ for s in steps].count("AddStep") == 1


def test_auto_config_falls_back_on_a_max_pool_of_a_residual_sum_with_the_reason() -> None:
    torch.manual_seed(0)
    x = _x((1, 4, 4), n=120)
    with pytest.warns(ptq.AccumulatorFallbackWarning, match="head \\(Linear\\).*max pool"):
        _, quantized = _quantize_auto(_PooledSum().eval(), x)
    # the fallback layer's weights are rounded to nearest over the 8-bit output range,
    # not budgeted; the program still runs
    head = [s for s in lower(quantized).steps if isinstance(s, LinearStep)][-1]
    assert np.abs(head.weight).max() == 2 ** (quantized.config.n_bits_outputs - 1) - 1
    with warnings.catch_warnings():  # no warning when nothing is bounded
        warnings.simplefilter("error")
        compile_torch_model(_PooledSum().eval(), x, n_bits=5, compile=False)


def test_the_default_budget_is_for_dense_chains_only() -> None:
    # A convolution reads all its pixels through one input quantizer; with outlier pixels
    # (per-pixel standardized digits reach 36 standard deviations) the 4-bit tables of
    # "auto" lost 46 points, so a convolutional chain keeps no budget by default.
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    dense = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    conv = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(36, 4)
    )
    x_dense, x_conv = rng.normal(size=(200, 16)), rng.normal(size=(200, 1, 8, 8))
    assert ptq.is_dense_chain(simplify(trace_module(dense, x_dense)))
    assert not ptq.is_dense_chain(simplify(trace_module(conv, x_conv)))
    by_default = compile_torch_model(dense, x_dense, n_bits=6, compile=False)
    assert by_default.quantized.config.accumulator_bits == "auto"
    conv_default = compile_torch_model(conv, x_conv, n_bits=6, compile=False)
    assert conv_default.quantized.config.accumulator_bits is None
    assert conv_default.quantized.config.calibration == "minmax"
    # an explicit width still applies to a convolutional chain
    asked = compile_torch_model(conv, x_conv, n_bits=6, accumulator_bits=12, compile=False)
    assert asked.quantized.config.accumulator_bits == 12
    assert max(s.acc_bits for s in asked.program.steps if isinstance(s, LinearStep)) <= 12
    codes = asked.program.input_quantizer.quantize(x_conv[:32])
    assert np.array_equal(asked.program(codes), asked.program(codes, NUMPY))
