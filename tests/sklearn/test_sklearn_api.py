"""The scikit-learn contract: scikit-learn's own estimator checks, clone and grid search,
pickling, and importing already-trained models with ``from_sklearn``."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
from sklearn import linear_model as sk_linear
from sklearn import neural_network as sk_neural
from sklearn import svm as sk_svm
from sklearn.base import clone, is_regressor
from sklearn.model_selection import GridSearchCV
from sklearn.utils.estimator_checks import parametrize_with_checks

import fhe_quant.sklearn as fs

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def _expected_failures(estimator: Any) -> dict[str, str]:
    """Checks these estimators cannot pass, with the reason of each.

    None today. The ones that needed work: ``check_estimators_pickle`` (the quantized
    module is plain data; its Concrete circuit is compiled again on first use),
    ``check_sample_weight_equivalence_on_dense_data`` (samples of weight zero do not
    calibrate), ``check_non_transformer_estimators_n_iter`` (``n_iter_`` is mirrored),
    ``check_classifiers_one_label`` (a one-class MLPClassifier predicts its class).
    """
    return {}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(
    [
        fs.LogisticRegression(),
        fs.LinearRegression(),
        fs.MLPClassifier(hidden_layer_sizes=(16,), max_iter=300, random_state=0),
    ],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


def test_clone_and_grid_search(iris: Any) -> None:
    x_train, x_test, y_train, y_test = iris
    model = fs.LogisticRegression(n_bits=6, C=0.5)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy is not model
    search = GridSearchCV(fs.LogisticRegression(), {"n_bits": [3, 8], "C": [0.1, 1.0]}, cv=2)
    search.fit(x_train, y_train)
    assert search.best_params_["n_bits"] == 8  # 3 bits are too few for iris
    assert search.best_estimator_.quantized_module_.quantized.config.n_bits_inputs == 8
    assert search.score(x_test, y_test) > 0.85
    mlp = GridSearchCV(
        fs.MLPRegressor(hidden_layer_sizes=(4,), max_iter=2000, random_state=0),
        {"n_bits": [{"weights": 4, "activations": 4}, 6]},
        cv=2,
    )
    mlp.fit(x_train, x_train @ [1.0, -1.0, 0.5, 0.0])
    assert len(mlp.cv_results_["params"]) == 2


def test_pickle_keeps_the_integer_program(iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    for model in (
        fs.LogisticRegression(p_error=TINY_P_ERROR),
        fs.MLPClassifier(hidden_layer_sizes=(5,), max_iter=3000, random_state=0),
    ):
        model.fit(x_train, y_train)
        model.compile(x_train)
        restored = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(
            restored.quantized_module_.forward_integers(x_test),
            model.quantized_module_.forward_integers(x_test),
        )
        np.testing.assert_array_equal(restored.predict_proba(x_test), model.predict_proba(x_test))
        # The Concrete circuit is not pickled: the copy compiles it again on first use.
        circuit = restored.quantized_module_.fhe_circuit
        assert not circuit.is_compiled and model.quantized_module_.fhe_circuit.is_compiled
        np.testing.assert_array_equal(
            restored.predict(x_test[:5], fhe="simulate"), model.predict(x_test[:5])
        )
        assert circuit.is_compiled and restored.quantized_module_.fhe_circuit is circuit


SKLEARN_MODELS = [
    sk_linear.LogisticRegression(C=0.5),
    sk_linear.SGDClassifier(loss="modified_huber", random_state=0),
    sk_svm.LinearSVC(),
    sk_linear.Lasso(alpha=0.01),
    sk_linear.TweedieRegressor(power=1.2, link="log"),
    sk_neural.MLPClassifier(
        hidden_layer_sizes=(6,), activation="tanh", max_iter=3000, random_state=0
    ),
    sk_neural.MLPRegressor(hidden_layer_sizes=(6,), max_iter=3000, random_state=0),
]


def _weights(model: Any) -> list[np.ndarray]:
    return list(model.coefs_) if hasattr(model, "coefs_") else [model.coef_]


@pytest.mark.parametrize("sk_model", SKLEARN_MODELS, ids=lambda m: type(m).__name__)
def test_from_sklearn_imports_without_refitting(sk_model: Any, iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    y = y_train + 1.0 if is_regressor(sk_model) else y_train
    trained = clone(sk_model).fit(x_train, y)
    coefs = [np.copy(c) for c in _weights(trained)]
    model = fs.from_sklearn(trained, x_train, n_bits=7)
    assert type(model).__name__ == type(trained).__name__
    assert model.n_bits == 7 and model.n_features_in_ == 4
    for name, value in trained.get_params().items():
        assert model.get_params()[name] == value
    # A copy of the trained model, not a refit one, and the original is untouched.
    assert model.sklearn_model_ is not trained
    for ours, original in zip(_weights(model.sklearn_model_), coefs, strict=True):
        np.testing.assert_array_equal(ours, original)
    # The same as fitting the fhe_quant estimator with the same parameters and data.
    refit = clone(model).fit(x_train, y)
    np.testing.assert_array_equal(
        refit.quantized_module_.forward_integers(x_test),
        model.quantized_module_.forward_integers(x_test),
    )
    agreement = np.mean(model.predict(x_test) == trained.predict(x_test))
    if model._metric == "accuracy":
        assert agreement >= 0.9
    if hasattr(model, "classes_"):
        np.testing.assert_array_equal(model.classes_, trained.classes_)


def test_from_sklearn_default_bits_and_verbose(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    linear = fs.from_sklearn(sk_linear.LinearRegression().fit(x_train, y_train), x_train)
    assert linear.n_bits == 8 and linear.verbose is False
    mlp = sk_neural.MLPRegressor(hidden_layer_sizes=(3,), max_iter=3000, random_state=0)
    imported = fs.from_sklearn(mlp.fit(x_train, y_train), x_train, p_error=0.01)
    assert imported.n_bits == 6 and imported.p_error == 0.01
