"""NeuralNetClassifier / NeuralNetRegressor: the scikit-learn contract, QAT inside."""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.exceptions import NotFittedError as SklearnNotFittedError
from sklearn.utils._param_validation import InvalidParameterError
from sklearn.utils.estimator_checks import parametrize_with_checks

from fhe_quant import qat as deprecated_qat
from fhe_quant import qat_estimators
from fhe_quant import torch as public_torch
from fhe_quant.errors import (
    EstimatorNotFittedError,
    EstimatorParameterError,
    NotCompiledError,
    NotFittedError,
    ParameterError,
)
from fhe_quant.sklearn import NeuralNetClassifier, NeuralNetRegressor

QATNotFittedError, QATParameterError = EstimatorNotFittedError, EstimatorParameterError

TINY_P_ERROR = 1e-12


@parametrize_with_checks(
    [
        NeuralNetClassifier(n_hidden=16, epochs=10, random_state=0),
        NeuralNetRegressor(n_hidden=16, epochs=10, random_state=0),
    ]
)
def test_scikit_learn_estimator_checks(estimator, check) -> None:
    check(estimator)


@pytest.fixture(scope="module")
def classifier(digits) -> NeuralNetClassifier:
    x_train, _, y_train, _ = digits
    model = NeuralNetClassifier(n_bits=3, n_hidden=16, epochs=6, random_state=0)
    return model.fit(x_train, y_train)


def test_classifier_fit_predict_proba(classifier, digits) -> None:
    _, x_test, _, y_test = digits
    np.testing.assert_array_equal(classifier.classes_, np.arange(10))
    predictions = classifier.predict(x_test)
    assert predictions.shape == (len(x_test),) and set(predictions) <= set(range(10))
    assert classifier.score(x_test, y_test) > 0.5
    proba = classifier.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(proba.argmax(axis=1), predictions)
    assert len(classifier.history_["loss"]) == 6 and classifier.n_features_in_ == 64
    # the estimator's predictions are its QAT module's (exact parity)
    logits = classifier.qat_module_(x_test).detach().numpy()
    np.testing.assert_array_equal(classifier.classes_[logits.argmax(axis=1)], predictions)


def test_classifier_compile_and_simulate(classifier, digits) -> None:
    _, x_test, _, _ = digits
    model = clone(classifier).set_params(p_error=TINY_P_ERROR, epochs=1)
    model.fit(digits[0][:400], digits[2][:400])
    with pytest.raises(NotCompiledError):
        model.predict(x_test[:2], fhe="simulate")
    model.compile(x_test)
    np.testing.assert_array_equal(
        model.predict(x_test[:8], fhe="simulate"), model.predict(x_test[:8], fhe="disable")
    )
    with pytest.raises(ParameterError, match="fhe"):
        model.predict(x_test[:2], fhe="encrypt")
    report = model.report(x_test[:20], digits[3][:20], fhe="simulate")
    assert (
        report.scores["simulate"]
        == report.scores["quantized"]
        == model.score(x_test[:20], digits[3][:20])
    )
    assert report.pbs_count > 0


def test_string_labels_and_determinism(digits) -> None:
    x, y = digits[0][:300], digits[2][:300]
    labels = np.array(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    )[y]
    a = NeuralNetClassifier(n_hidden=8, epochs=2, random_state=1).fit(x, labels)
    b = NeuralNetClassifier(n_hidden=8, epochs=2, random_state=1).fit(x, labels)
    np.testing.assert_array_equal(a.predict(x), b.predict(x))
    assert set(a.predict(x)) <= set(labels)


def test_regressor_one_and_two_targets() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 4))
    y = 3.0 * x[:, 0] - x[:, 1] + 10.0
    model = NeuralNetRegressor(n_bits=4, n_hidden=16, epochs=15, random_state=0).fit(x, y)
    assert model.predict(x).shape == (300,)
    assert model.score(x, y) > 0.5
    report = model.report(x, y, fhe="disable")
    assert report.metric == "r2" and report.scores["quantized"] == pytest.approx(model.score(x, y))
    two = NeuralNetRegressor(n_hidden=8, epochs=2, random_state=0).fit(x, np.c_[y, -y])
    assert two.predict(x[:5]).shape == (5, 2)


def test_clone_and_params(classifier) -> None:
    fresh = clone(classifier)
    assert fresh.get_params() == classifier.get_params()
    assert not hasattr(fresh, "quantized_module_")
    assert fresh.set_params(n_bits={"weights": 2, "activations": 3}).n_bits["weights"] == 2


def test_pickle_deepcopy_and_clone_with_no_custom_code(classifier, digits) -> None:
    for cls in NeuralNetClassifier.__mro__ + NeuralNetRegressor.__mro__:
        if cls.__module__.startswith("fhe_quant"):
            for name in ("__getstate__", "__setstate__", "__reduce__", "__deepcopy__"):
                assert name not in vars(cls), (cls, name)
    x = digits[1][:20]
    expected = classifier.predict(x)
    for restored in (pickle.loads(pickle.dumps(classifier)), copy.deepcopy(classifier)):
        np.testing.assert_array_equal(restored.predict(x), expected)
        np.testing.assert_array_equal(
            restored.qat_module_.eval()(x).detach().numpy(),
            classifier.qat_module_.eval()(x).detach().numpy(),
        )
        assert restored.get_params() == classifier.get_params()
    fresh = clone(classifier)
    assert not hasattr(fresh, "qat_module_") and fresh.get_params() == classifier.get_params()


def test_public_faces_and_the_deprecated_alias_are_the_same_objects() -> None:
    assert NeuralNetClassifier is qat_estimators.NeuralNetClassifier
    for name in ("prepare_qat", "compile_qat_model", "QATModule", "NotAQATModuleError"):
        assert getattr(deprecated_qat, name) is getattr(public_torch, name), name
    for name in ("NeuralNetClassifier", "NeuralNetRegressor"):
        assert getattr(deprecated_qat, name) is getattr(qat_estimators, name), name
    assert deprecated_qat.QATParameterError is EstimatorParameterError
    assert deprecated_qat.QATNotFittedError is EstimatorNotFittedError


def test_errors() -> None:
    with pytest.raises(QATNotFittedError) as info:
        NeuralNetClassifier().predict(np.zeros((2, 3)))
    assert isinstance(info.value, NotFittedError) and isinstance(info.value, SklearnNotFittedError)
    with pytest.raises(QATParameterError, match="n_layers") as info:
        NeuralNetClassifier(n_layers=0).fit(np.zeros((4, 2)), [0, 1, 0, 1])
    assert isinstance(info.value, InvalidParameterError) and isinstance(info.value, ParameterError)
    with pytest.raises(ParameterError, match="n_bits"):
        NeuralNetClassifier(n_bits={"weights": 12}).fit(np.zeros((4, 2)), [0, 1, 0, 1])
    with pytest.raises(ValueError, match="2 classes"):
        NeuralNetClassifier(epochs=1).fit(np.zeros((4, 2)), [1, 1, 1, 1])
