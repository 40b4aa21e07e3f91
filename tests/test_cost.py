"""The cost model: figures read from a compiled circuit without keys, the shipped fit,
the per-layer shares in the report, and its errors."""

from __future__ import annotations

import itertools
import json
from importlib import resources

import numpy as np
import pytest
import torch

from fhe_quant.cost import (
    CostEstimate,
    CostModel,
    LinearFit,
    circuit_figures,
    cost_features,
    estimate_cost,
    fit_linear,
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
    assert model.latency.coefficients["complexity"] > 0
    assert model.keygen.coefficients["bootstrap_key_work"] > 0
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
    latency = model.latency
    figures = circuit_figures(circuit)
    traffic = sum(
        count * 8 * n * (k + 1) ** 2 * level * size
        for (size, k, n, level), count in figures["pbs_per_parameter"]
    )
    assert estimate.seconds_per_sample == pytest.approx(
        latency.coefficients["complexity"] * circuit.complexity
        + latency.coefficients.get("bootstrap_key_traffic", 0.0) * traffic
        + latency.coefficients.get("pbs_count", 0.0) * circuit.programmable_bootstrap_count
        + latency.intercept
    )
    assert estimate.keygen_seconds == pytest.approx(model.keygen_seconds(figures))
    # each bootstrap key's parameters, with its decomposition level, as in the key set
    keyset = circuit.client.specs.program_info.get_keyset_info().bootstrap_keys()
    expected = sorted(
        (k.polynomial_size(), k.glwe_dimension(), k.input_lwe_dimension(), k.level())
        for k in keyset
    )
    assert sorted(key for key, _ in figures["pbs_per_parameter"]) == expected
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


def test_fit_linear_recovers_a_plane_and_reports_residuals():
    rows = [
        {"complexity": c, "pbs_count": p} for c, p in [(1e9, 10), (2e9, 5), (4e9, 40), (3e9, 1)]
    ]
    y = [1e-9 * r["complexity"] + 0.01 * r["pbs_count"] + 0.1 for r in rows]
    fit = fit_linear(rows, y, ["complexity", "pbs_count"])
    assert fit.coefficients["complexity"] == pytest.approx(1e-9, rel=1e-6)
    assert fit.coefficients["pbs_count"] == pytest.approx(0.01, rel=1e-6)
    assert fit.intercept == pytest.approx(0.1, rel=1e-6)
    assert fit.max_relative_residual < 1e-9 and fit.n_runs == 4
    assert fit(rows[0]) == pytest.approx(y[0])


def test_fit_linear_keeps_every_term_non_negative():
    # y falls with pbs_count: an unconstrained fit would give it a negative coefficient
    rows = [{"complexity": c, "pbs_count": p} for c, p in [(1.0, 3), (2.0, 2), (3.0, 1), (4.0, 0)]]
    y = [1.0, 1.9, 3.1, 4.0]
    fit = fit_linear(rows, y, ["complexity", "pbs_count"])
    assert all(v >= 0 for v in fit.coefficients.values()) and fit.intercept >= 0
    assert fit.coefficients["pbs_count"] == 0.0 and fit.coefficients["complexity"] > 0
    # a negative intercept is refused too: the fit goes through the origin instead
    through = fit_linear(
        [{"complexity": v} for v in (1.0, 2.0, 3.0)], [0.5, 2.0, 3.5], ["complexity"]
    )
    assert through.intercept == 0.0 and through.max_relative_residual > 0


@pytest.mark.parametrize(
    ("rows", "y", "features", "match"),
    [
        ([], [], ["complexity"], "as many runs"),
        ([{"complexity": 1.0}], [1.0, 2.0], ["complexity"], "as many runs"),
        ([{"complexity": 1.0}], [0.0], ["complexity"], "positive"),
        ([{"complexity": 1.0}], [1.0], ["pbs_count"], "lacks the feature"),
        ([{"complexity": 1.0}], [1.0], [], "one feature"),
    ],
)
def test_fit_linear_refuses_bad_runs(rows, y, features, match):
    with pytest.raises(ParameterError, match=match):
        fit_linear(rows, y, features)


def test_model_validation_and_round_trip():
    model = CostModel.default()
    assert CostModel.from_dict(json.loads(json.dumps(model.to_dict()))) == model
    with pytest.raises(ParameterError, match="lookup_price"):
        CostModel(model.latency, model.keygen, {})
    with pytest.raises(ParameterError, match="lookup_price"):
        CostModel(model.latency, model.keygen, {3: -1.0})
    with pytest.raises(ParameterError, match="needs latency"):
        CostModel.from_dict({"latency": {}})
    with pytest.raises(ParameterError, match="'complexity' term"):
        LinearFit({"complexity": -1.0}, 0.0, 0.0, 1)
    with pytest.raises(ParameterError, match="'intercept' term"):
        LinearFit({"complexity": 1.0}, -0.1, 0.0, 1)
    with pytest.raises(ParameterError, match="n_runs"):
        LinearFit({"complexity": 1.0}, 0.0, 0.0, 0)
    with pytest.raises(ParameterError, match="finite"):
        LinearFit({"complexity": float("nan")}, 0.0, 0.0, 1)
    with pytest.raises(ParameterError, match="Unknown cost feature 'flops'"):
        LinearFit({"flops": 1.0}, 0.0, 0.0, 1)
    with pytest.raises(ParameterError, match="coefficients"):
        LinearFit({}, 0.0, 0.0, 1)
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


def test_estimates_are_monotone_in_every_feature():
    model = CostModel.default()
    complexities = np.linspace(0.0, 5e11, 50)
    seconds = [model.seconds_per_sample(c) for c in complexities]
    assert all(b > a for a, b in itertools.pairwise(seconds))
    base = {
        "complexity": 1e10,
        "pbs_count": 100,
        "pbs_per_parameter": (((1024, 2, 750, 3), 60), ((4096, 1, 800, 2), 40)),
        "bootstrap_key_bytes": 8 * 750 * 9 * 3 * 1024 + 8 * 800 * 4 * 2 * 4096,
        "keyswitch_key_bytes": 5e7,
    }
    grown = {**base, "complexity": 2e10, "pbs_count": 200, "keyswitch_key_bytes": 1e8}
    assert model.seconds_per_sample(grown) > model.seconds_per_sample(base)
    assert model.keygen_seconds(grown) > model.keygen_seconds(base)
    wider = {**base, "pbs_per_parameter": (((2048, 2, 750, 3), 60), ((4096, 1, 800, 2), 40))}
    assert model.keygen_seconds(wider) > model.keygen_seconds(base)


def test_cost_features_work_and_levels():
    explicit = {
        "complexity": 1.0,
        "pbs_count": 3,
        "pbs_per_parameter": (((512, 4, 600, 2), 3),),
        "bootstrap_key_bytes": 8 * 600 * 25 * 2 * 512,
        "keyswitch_key_bytes": 10,
    }
    features = cost_features(explicit)
    assert features["bootstrap_key_work"] == 600 * 5 * 2 * 4 * 512**2
    assert features["key_bytes"] == explicit["bootstrap_key_bytes"] + 10
    # without a level (results of the first format) it is the one that adds the sizes up
    legacy = {**explicit, "pbs_per_parameter": [[[512, 4, 600], 3]]}
    assert cost_features(legacy)["bootstrap_key_work"] == features["bootstrap_key_work"]
    with pytest.raises(ParameterError, match="Circuit figures need"):
        cost_features({"complexity": 1.0})


def test_bad_json_is_refused_by_name(tmp_path):
    good = CostModel.default().to_dict()
    with pytest.raises(ParameterError, match=r"model\.json is not JSON"):
        CostModel.from_json("{not json", "model.json")
    with pytest.raises(ParameterError, match="must hold a JSON object"):
        CostModel.from_json("[1, 2]", "model.json")
    broken = {**good, "latency": {**good["latency"], "coefficients": {"complexity": "fast"}}}
    with pytest.raises(ParameterError, match=r"model\.json: .*'complexity' term"):
        CostModel.from_json(json.dumps(broken), "model.json")
    with pytest.raises(ParameterError, match="needs latency"):
        CostModel.from_json(json.dumps({k: v for k, v in good.items() if k != "keygen"}))
    with pytest.raises(ParameterError, match="Expected circuit figures or a number"):
        CostModel.default().seconds_per_sample(-1.0)


def test_first_format_is_still_read():
    old = {
        "latency": {"slope": 2e-10, "intercept": 0.1, "max_relative_residual": 0.5, "n_runs": 3},
        "keygen": {"slope": 4e-9, "intercept": 0.2, "max_relative_residual": 0.7, "n_runs": 3},
        "lookup_price": {"4": 1.0},
    }
    model = CostModel.from_dict(old)
    assert model.seconds_per_sample(1e10) == pytest.approx(2.1)
    assert model.keygen_seconds(1e9) == pytest.approx(4.2)


def test_shipped_fit_is_reproduced_from_the_recorded_runs(monkeypatch):
    """benchmarks/cost_calibration.py --reuse --write on the recorded runs (its JSON and
    the side-by-side JSON) gives back the shipped model's fits."""
    import pathlib
    import sys

    benchmarks = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    sys.modules.pop("cost_calibration", None)
    import cost_calibration

    shipped = CostModel.default()
    rows = json.loads((benchmarks / "results" / "cost_calibration.json").read_text())["rows"]
    max_load = float(shipped.measured.split("load <= ")[1].split(",")[0])
    refit = cost_calibration.calibrate(rows + cost_calibration.side_by_side_runs(), max_load)
    for got, want in ((refit.latency, shipped.latency), (refit.keygen, shipped.keygen)):
        assert got.coefficients == pytest.approx(want.coefficients, rel=1e-9)
        assert got.intercept == pytest.approx(want.intercept, rel=1e-9, abs=1e-12)
        assert got.max_relative_residual == pytest.approx(want.max_relative_residual, rel=1e-9)
        assert got.n_runs == want.n_runs
    assert refit.lookup_price == shipped.lookup_price
    assert refit.load_average == shipped.load_average


def test_estimates_at_a_load_are_a_fair_share_of_the_cores():
    data = {**CostModel.default().to_dict(), "cpus": 2, "load_exponent": 1.0}
    model = CostModel.from_dict(data)
    idle = model.seconds_per_sample(1e10)
    assert model.seconds_per_sample(1e10, 1.5) == idle  # not above the cores: idle
    assert model.seconds_per_sample(1e10, 8.0) == pytest.approx(4 * idle)
    figures = {
        "complexity": 1e10,
        "pbs_count": 10,
        "pbs_per_parameter": (((1024, 2, 700, 2), 10),),
        "bootstrap_key_bytes": 8 * 700 * 9 * 2 * 1024,
        "keyswitch_key_bytes": 1e7,
    }
    assert model.keygen_seconds(figures, 8.0) == pytest.approx(4 * model.keygen_seconds(figures))
    half = CostModel.from_dict({**data, "load_exponent": 0.5})
    assert half.seconds_per_sample(1e10, 8.0) == pytest.approx(2 * idle)
    with pytest.raises(ParameterError, match="'cpus'"):
        CostModel.from_dict({**data, "cpus": 0})
    with pytest.raises(ParameterError, match="'load_exponent'"):
        CostModel.from_dict({**data, "load_exponent": -1.0})
    with pytest.raises(ParameterError, match="load average must be a finite"):
        model.seconds_per_sample(1e10, float("nan"))
