"""Every public estimator on a scikit-learn data set: accuracy against the float model,
``disable`` == ``simulate`` bit for bit, PBS counts, and the client-side outputs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from sklearn import linear_model as sk_linear
from sklearn import neural_network as sk_neural
from sklearn.exceptions import DataConversionWarning
from sklearn.metrics import accuracy_score, r2_score

import fhe_quant.sklearn as fs

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12
#: Samples simulated per estimator (simulation runs sample by sample).
N_SIMULATED = 100


@dataclass(frozen=True)
class Case:
    name: str
    params: dict[str, Any]
    data: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.data}"


MLP_CLASSIFIER = {"hidden_layer_sizes": (32,), "max_iter": 400, "random_state": 0}
MLP_REGRESSOR = {"hidden_layer_sizes": (16,), "max_iter": 1000, "random_state": 0}

CASES = [
    Case("LinearRegression", {}, "diabetes"),
    Case("Ridge", {}, "diabetes"),
    Case("Lasso", {"alpha": 0.1}, "diabetes"),
    Case("ElasticNet", {"alpha": 0.01}, "diabetes"),
    Case("LinearSVR", {"max_iter": 10000, "random_state": 0}, "regression"),
    Case("SGDRegressor", {"random_state": 0}, "regression"),
    Case("PoissonRegressor", {"alpha": 0.01}, "poisson"),
    Case("GammaRegressor", {"alpha": 0.01}, "diabetes"),
    Case("TweedieRegressor", {"power": 1.5, "alpha": 0.01}, "diabetes"),
    Case("LogisticRegression", {}, "breast_cancer"),
    Case("LogisticRegression", {}, "iris"),
    Case("LinearSVC", {}, "wine"),
    Case("SGDClassifier", {"loss": "log_loss", "random_state": 0}, "digits"),
    Case("SGDClassifier", {"loss": "modified_huber", "random_state": 0}, "breast_cancer"),
    Case("MLPClassifier", MLP_CLASSIFIER, "digits"),
    Case("MLPRegressor", MLP_REGRESSOR, "regression"),
]


@dataclass
class Compiled:
    case: Case
    model: Any
    x_test: np.ndarray
    y_test: np.ndarray
    report: Any
    ints_disable: np.ndarray
    ints_simulate: np.ndarray


@pytest.fixture(scope="module", params=CASES, ids=[case.id for case in CASES])
def compiled(request: pytest.FixtureRequest, load: Any) -> Compiled:
    case: Case = request.param
    x_train, x_test, y_train, y_test = load(case.data)
    model = getattr(fs, case.name)(**case.params, p_error=TINY_P_ERROR).fit(x_train, y_train)
    model.compile(x_train)
    x, y = x_test[:N_SIMULATED], y_test[:N_SIMULATED]
    module = model.quantized_module_
    return Compiled(
        case,
        model,
        x,
        y,
        model.report(x, y, fhe="simulate"),
        module.forward_integers(x, fhe="disable"),
        module.forward_integers(x, fhe="simulate"),
    )


def test_simulated_metric_matches_float(compiled: Compiled) -> None:
    scores = compiled.report.scores
    assert set(scores) == {"float", "quantized (full tables)", "quantized", "simulate"}
    # Accuracy within 1 point, R² within 0.01, of the float scikit-learn model.
    assert abs(scores["simulate"] - scores["float"]) <= 0.01 + 1e-9, str(compiled.report)
    assert compiled.report.metric == ("r2" if compiled.model._metric == "r2" else "accuracy")


def test_disable_equals_simulate_bit_for_bit(compiled: Compiled) -> None:
    np.testing.assert_array_equal(compiled.ints_simulate, compiled.ints_disable)
    model, x = compiled.model, compiled.x_test
    np.testing.assert_array_equal(model.predict(x, fhe="simulate"), model.predict(x))


def test_linear_models_need_no_bootstrap(compiled: Compiled) -> None:
    stats = compiled.model.quantized_module_.statistics
    if compiled.case.name.startswith("MLP"):
        hidden = sum(compiled.case.params["hidden_layer_sizes"])
        assert stats["pbs_count"] >= hidden  # one lookup per hidden neuron at least
    else:
        assert stats["pbs_count"] == 0
        assert len(stats["layers"]) == 1
    assert stats["max_bit_width"] == compiled.report.max_bit_width


def test_score_is_the_wrapped_class_score(compiled: Compiled) -> None:
    model, x, y = compiled.model, compiled.x_test, compiled.y_test
    metric = accuracy_score if model._metric == "accuracy" else r2_score
    assert compiled.report.scores["float"] == pytest.approx(
        metric(y, model.sklearn_model_.predict(x))
    )
    assert compiled.report.scores["quantized"] == pytest.approx(metric(y, model.predict(x)))
    # score() measures what scikit-learn's does (D² for the GLMs), on the quantized model.
    assert abs(model.score(x, y) - model.sklearn_model_.score(x, y)) <= 0.01 + 1e-9


def _mean_abs(ours: np.ndarray, theirs: np.ndarray) -> float:
    assert ours.shape == theirs.shape
    return float(np.mean(np.abs(ours - theirs)))


def test_outputs_follow_sklearn(compiled: Compiled) -> None:
    """Probabilities, decision values and inverse links are close to the float model's
    (on average: test samples outside the calibrated range are clipped)."""
    model, x = compiled.model, compiled.x_test
    reference = model.sklearn_model_
    if hasattr(reference, "predict_proba"):
        proba = model.predict_proba(x)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0)
        assert _mean_abs(proba, reference.predict_proba(x)) < 0.01
    else:
        assert not hasattr(model, "predict_proba")
    if hasattr(reference, "decision_function"):
        theirs = reference.decision_function(x)
        ours = model.decision_function(x)
        assert _mean_abs(ours, theirs) < 0.02 * np.abs(theirs).mean()
    else:
        assert not hasattr(model, "decision_function")
    if model._metric == "r2":
        ours, theirs = model.predict(x), reference.predict(x)
        assert ours.shape == theirs.shape
        assert r2_score(theirs, ours) > 0.99


def test_classifier_string_labels_and_binary_decision(breast_cancer: Any) -> None:
    x_train, x_test, y_train, _ = breast_cancer
    labels = np.array(["benign", "malignant"])[y_train]
    model = fs.LogisticRegression().fit(x_train, labels)
    np.testing.assert_array_equal(model.classes_, ["benign", "malignant"])
    assert model.decision_function(x_test).shape == (len(x_test),)
    predicted = model.predict(x_test)
    assert predicted.dtype == labels.dtype
    expected = model.classes_[(model.decision_function(x_test) > 0).astype(int)]
    np.testing.assert_array_equal(predicted, expected)
    proba = model.predict_proba(x_test)
    np.testing.assert_allclose(proba[:, 1], 1 / (1 + np.exp(-model.decision_function(x_test))))
    np.testing.assert_allclose(model.predict_log_proba(x_test), np.log(proba))


def test_multiclass_logistic_uses_softmax(iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    model = fs.LogisticRegression().fit(x_train, y_train)
    decision = model.decision_function(x_test)
    expected = np.exp(decision) / np.exp(decision).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(model.predict_proba(x_test), expected)
    np.testing.assert_array_equal(model.predict(x_test), decision.argmax(axis=1))


@pytest.mark.parametrize("n_targets", [2, 1], ids=["two-targets", "one-column"])
def test_multioutput_regression_shapes_follow_sklearn(n_targets: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4))
    y = x @ rng.normal(size=(4, n_targets))
    models = [
        fs.LinearRegression(),
        fs.Ridge(),
        fs.MLPRegressor(hidden_layer_sizes=(8,), max_iter=2000, random_state=0),
    ]
    for model in models:
        with warnings.catch_warnings():
            # NOTE: MLPRegressor warns on a column-vector y, as scikit-learn's does.
            warnings.simplefilter("ignore", DataConversionWarning)
            model.fit(x, y)
        assert model.predict(x).shape == model.sklearn_model_.predict(x).shape
        assert model.predict(x).shape[0] == 80
        assert model.score(x, y) > model.sklearn_model_.score(x, y) - 0.03
    assert models[0].predict(x).shape == (80, n_targets)  # LinearRegression keeps 2-D y


def test_glm_inverse_link_is_applied_by_the_client(load: Any) -> None:
    x_train, x_test, y_train, _ = load("poisson")
    model = fs.PoissonRegressor(alpha=0.01).fit(x_train, y_train)
    raw = model.quantized_module_.forward(x_test)
    np.testing.assert_allclose(model.predict(x_test), np.exp(raw[:, 0]))
    relative = model.predict(x_test) / model.sklearn_model_.predict(x_test) - 1.0
    assert np.median(np.abs(relative)) < 0.01 and np.abs(relative).max() < 0.1
    identity = fs.TweedieRegressor(power=0.0).fit(x_train, y_train)
    raw = identity.quantized_module_.forward(x_test)
    np.testing.assert_allclose(identity.predict(x_test), raw[:, 0])


def test_mlp_hidden_activations(iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    for activation, op in [("relu", "relu"), ("tanh", "tanh"), ("logistic", "sigmoid")]:
        model = fs.MLPClassifier(
            hidden_layer_sizes=(8, 6), activation=activation, max_iter=3000, random_state=0
        ).fit(x_train, y_train)
        ops = [node.op for node in model.quantized_module_.graph.nodes]
        assert ops == ["input", "linear", op, "linear", op, "linear"]
        agreement = np.mean(model.predict(x_test) == model.sklearn_model_.predict(x_test))
        assert agreement >= 0.9
    identity = fs.MLPClassifier(
        hidden_layer_sizes=(8,), activation="identity", max_iter=3000, random_state=0
    ).fit(x_train, y_train)
    assert np.mean(identity.predict(x_test) == identity.sklearn_model_.predict(x_test)) >= 0.9


def test_binary_mlp_probabilities(breast_cancer: Any) -> None:
    x_train, x_test, y_train, _ = breast_cancer
    model = fs.MLPClassifier(hidden_layer_sizes=(8,), max_iter=2000, random_state=0)
    model.fit(x_train, y_train)
    assert model.sklearn_model_.out_activation_ == "logistic"
    proba = model.predict_proba(x_test)
    assert proba.shape == (len(x_test), 2)
    np.testing.assert_array_equal(model.predict(x_test), (proba[:, 1] > 0.5).astype(int))
    assert _mean_abs(proba, model.sklearn_model_.predict_proba(x_test)) < 0.02


def test_sgd_probabilities_depend_on_the_loss(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    assert not hasattr(fs.SGDClassifier(), "predict_proba")  # hinge loss
    assert hasattr(fs.SGDClassifier(loss="log_loss"), "predict_proba")
    assert not hasattr(fs.LinearSVC(), "predict_proba")
    assert not hasattr(fs.MLPClassifier(), "decision_function")
    model = fs.SGDClassifier(loss="log_loss", random_state=0).fit(x_train, y_train)
    # NOTE: multiclass SGD probabilities are normalized one-vs-rest sigmoids, as in sklearn.
    proba = model.predict_proba(x_train)
    assert _mean_abs(proba, model.sklearn_model_.predict_proba(x_train)) < 0.02


def test_n_bits_and_rounding_bits_reach_the_compiler(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    bits = {"inputs": 5, "weights": 4, "activations": 3, "outputs": 6}
    model = fs.MLPClassifier(
        hidden_layer_sizes=(6,), max_iter=3000, random_state=0, n_bits=bits, rounding_bits=4
    ).fit(x_train, y_train)
    config = model.quantized_module_.quantized.config
    assert (config.n_bits_inputs, config.n_bits_weights) == (5, 4)
    assert (config.n_bits_activations, config.n_bits_outputs) == (3, 6)
    assert model.quantized_module_.statistics["layers"][0]["table_input_bits"] == 4
    assert fs.LogisticRegression().n_bits == 8 and fs.MLPRegressor().n_bits == 6


def test_defaults_and_signatures_follow_sklearn() -> None:
    pairs = [
        (fs.LogisticRegression, sk_linear.LogisticRegression),
        (fs.SGDClassifier, sk_linear.SGDClassifier),
        (fs.LinearRegression, sk_linear.LinearRegression),
        (fs.MLPRegressor, sk_neural.MLPRegressor),
    ]
    for ours, theirs in pairs:
        params = ours().get_params()
        for name, value in theirs().get_params().items():
            assert params[name] == value, (ours.__name__, name)
        assert set(params) - set(theirs().get_params()) <= {
            "n_bits",
            "rounding_bits",
            "p_error",
            "verbose",
            "accumulator_bits",  # perceptrons only
        }
    assert fs.LinearRegression().verbose is False  # sklearn's has no verbose: ours is added
    assert fs.LogisticRegression().verbose == 0  # sklearn's own, shared
    model = fs.MLPRegressor("squared_error", (5,))  # positional arguments as in sklearn
    assert model.hidden_layer_sizes == (5,)
    assert "n_bits=4" in repr(fs.Ridge(n_bits=4))
