"""The cost model: figures read from a compiled circuit without keys, the shipped fit,
the per-layer shares in the report, and its errors."""

from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest
import torch

from fhe_quant.cost import (
    CostEstimate,
    CostModel,
    Fit,
    estimate_cost,
    fit_line,
    layer_costs,
)
from fhe_quant.errors import NotCompiledError, ParameterError
from fhe_quant.torch import compile_torch_model


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x = np.random.default_rng(0).normal(size=(64, 4))
    return compile_torch_model(net, x, n_bits=3, rounding_bits=3), x


def test_shipped_model_loads_and_fits_its_runs():
    data = json.loads(resources.files("fhe_quant").joinpath("data/cost_model.json").read_text())
    model = CostModel.from_dict(data)
    assert model == CostModel.default()
    assert model.latency.slope > 0 and model.keygen.slope > 0
    assert model.latency.n_runs >= 5
    # the shipped fit says how far its worst run was
    assert 0 <= model.latency.max_relative_residual < 1
    assert set(range(1, 9)) <= set(model.lookup_price)
    prices = [model.price(w) for w in range(2, 9)]
    assert prices[-1] > prices[0]


def test_estimate_needs_no_keys_and_matches_circuit(small_model):
    qm, _ = small_model
    estimate = estimate_cost(qm)
    circuit = qm.circuit
    assert qm.fhe_circuit.statistics.keygen_seconds is None  # nothing was keyed
    assert estimate.complexity == pytest.approx(circuit.complexity)
    assert estimate.pbs_count == circuit.programmable_bootstrap_count
    assert sum(n for _, n in estimate.pbs_per_parameter) == estimate.pbs_count
    assert estimate.bootstrap_key_bytes == circuit.size_of_bootstrap_keys > 0
    assert estimate.key_bytes == circuit.size_of_bootstrap_keys + circuit.size_of_keyswitch_keys
    model = CostModel.default()
    assert estimate.seconds_per_sample == pytest.approx(
        model.latency.slope * circuit.complexity + model.latency.intercept
    )
    assert estimate.keygen_seconds == pytest.approx(model.keygen_seconds(estimate.key_bytes))
    # the layers share the total: the hidden layer holds every lookup
    names = [name for name, _ in estimate.layers]
    assert len(names) == 2
    assert sum(s for _, s in estimate.layers) == pytest.approx(estimate.seconds_per_sample)
    assert estimate.layers[-1][1] == 0.0


def test_report_shows_estimate_per_layer_and_total(small_model):
    qm, _ = small_model
    report = qm.report()
    text = str(report)
    assert "estimated latency per layer" in text
    estimate = estimate_cost(qm)
    assert report.estimated_latency_seconds == pytest.approx(estimate.seconds_per_sample)
    assert report.evaluation_key_bytes == estimate.key_bytes
    assert "evaluation keys" in text
    section = text.split("estimated latency per layer")[1].splitlines()[1:]
    (first,) = [line for line in section if line.split()[0] == qm.program.steps[0].name]
    assert first.split()[1] == f"{estimate.layers[0][1]:.3f}"


def test_report_without_circuit_has_no_estimate():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    qm = compile_torch_model(net, np.ones((8, 3)), n_bits=3, compile=False)
    report = qm.report()
    assert report.estimated_latency_seconds is None and report.evaluation_key_bytes is None
    assert "estimated latency per layer" not in str(report)
    with pytest.raises(NotCompiledError, match="compile"):
        estimate_cost(qm)


def test_estimate_of_estimator_and_of_wrong_object():
    from sklearn.datasets import load_wine

    from fhe_quant.sklearn import DecisionTreeClassifier

    x, y = load_wine(return_X_y=True)
    tree = DecisionTreeClassifier(n_bits=4, max_depth=3, random_state=0).fit(x, y)
    tree.compile(x)
    estimate = estimate_cost(tree)
    assert estimate.pbs_count == tree.quantized_module_.statistics["pbs_count"]
    with pytest.raises(ParameterError, match="compiled model"):
        estimate_cost("a model")


def test_layer_costs_weights_width_and_dropped_bits():
    model = CostModel.default()
    layers = [
        {"layer": "a", "lookups": 10, "table_input_bits": 4, "truncated_bits": 0},
        {"layer": "b", "lookups": 10, "table_input_bits": 4, "truncated_bits": 3},
        {"layer": "c", "lookups": 10, "table_input_bits": 6, "truncated_bits": 0},
        {"layer": "out"},
    ]
    shares = dict(layer_costs(layers, model))
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["b"] > shares["a"] and shares["out"] == 0.0
    assert shares["c"] / shares["a"] == pytest.approx(model.price(6) / model.price(4))
    assert layer_costs([{"layer": "x"}]) == [("x", 0.0)]


def test_fit_line_recovers_a_line_and_reports_residuals():
    fit = fit_line([1e9, 2e9, 4e9], [1.1, 2.1, 4.1])
    assert fit.slope == pytest.approx(1e-9, rel=1e-6)
    assert fit.intercept == pytest.approx(0.1, rel=1e-6)
    assert fit.max_relative_residual < 1e-9
    noisy = fit_line([1.0, 2.0], [1.0, 1.0])
    assert noisy.slope >= 0 and noisy.intercept >= 0
    # a negative intercept is refused: the fit goes through the origin instead
    through = fit_line([1.0, 2.0, 3.0], [0.5, 2.0, 3.5])
    assert through.intercept == 0.0 and through.max_relative_residual > 0


@pytest.mark.parametrize(
    ("x", "y", "match"),
    [([], [], "two equal"), ([1.0], [1.0, 2.0], "two equal"), ([1.0], [0.0], "positive")],
)
def test_fit_line_refuses_bad_runs(x, y, match):
    with pytest.raises(ParameterError, match=match):
        fit_line(x, y)


def test_model_validation_and_round_trip():
    model = CostModel.default()
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    with pytest.raises(ParameterError, match="lookup_price"):
        CostModel(model.latency, model.keygen, {})
    with pytest.raises(ParameterError, match="lookup_price"):
        CostModel(model.latency, model.keygen, {3: -1.0})
    with pytest.raises(ParameterError, match="needs latency"):
        CostModel.from_dict({"latency": {}})
    with pytest.raises(ParameterError, match="slope"):
        Fit(-1.0, 0.0, 0.0, 1)
    with pytest.raises(ParameterError, match="n_runs"):
        Fit(1.0, 0.0, 0.0, 0)
    with pytest.raises(ParameterError, match="finite"):
        Fit(float("nan"), 0.0, 0.0, 1)
    with pytest.raises(ParameterError, match="complexity"):
        CostEstimate(-1.0, 0, (), 0, 0, 0.0, 0.0)
    # widths past the widest measured one double per bit
    widest = max(model.lookup_price)
    assert model.price(widest + 2) == pytest.approx(4 * model.lookup_price[widest])


@pytest.mark.slow
@pytest.mark.execute
def test_estimate_is_made_before_keys_and_the_circuit_still_runs_exactly(small_model):
    """The estimate needs no keys, and the circuit it priced runs (3-bit tables, 1 sample).
    How close estimates are to measured latency is benchmarks/cost_calibration.py's table
    (no timed assertions here: the machines are shared and a first run with compressed
    keys also pays their expansion)."""
    qm, x = small_model
    estimate = estimate_cost(qm)
    assert qm.fhe_circuit.statistics.keygen_seconds is None
    assert estimate.seconds_per_sample > 0 and estimate.keygen_seconds > 0
    qm.keygen()
    out = qm.forward_integers(x[:1], fhe="execute")
    assert np.array_equal(out, qm.forward_integers(x[:1], fhe="disable"))
