"""Bad input gets a clear, typed error that names the problem, and loses nothing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import sklearn.exceptions
from sklearn.naive_bayes import GaussianNB
from sklearn.neural_network import MLPClassifier as SkMLPClassifier
from sklearn.svm import SVC

import fhe_quant.sklearn as fs
from fhe_quant import errors


@pytest.fixture(scope="module")
def fitted(iris: Any) -> Any:
    x_train, _, y_train, _ = iris
    return fs.LogisticRegression().fit(x_train, y_train)


METHODS = ["predict", "predict_proba", "predict_log_proba", "decision_function"]


@pytest.mark.parametrize("method", [*METHODS, "compile", "report"])
def test_use_before_fit(method: str, iris: Any) -> None:
    x = iris[0]
    model = fs.LogisticRegression()
    with pytest.raises(sklearn.exceptions.NotFittedError, match="not fitted yet") as info:
        getattr(model, method)(x)
    # Both scikit-learn's error (for its tools) and ours (for fhe_quant users).
    assert isinstance(info.value, errors.NotFittedError)
    assert isinstance(info.value, errors.FHEQuantError)


@pytest.mark.parametrize("fhe", ["simulate", "execute"])
@pytest.mark.parametrize("method", METHODS)
def test_fhe_modes_before_compile(method: str, fhe: str, fitted: Any, iris: Any) -> None:
    with pytest.raises(errors.NotCompiledError, match="compile"):
        getattr(fitted, method)(iris[1][:2], fhe=fhe)
    np.testing.assert_array_equal(fitted.predict(iris[1][:2]), fitted.predict(iris[1][:2]))


def test_report_before_compile(fitted: Any, iris: Any) -> None:
    _, x_test, _, y_test = iris
    with pytest.raises(errors.NotCompiledError, match="compile"):
        fitted.report(x_test, y_test)
    report = fitted.report(x_test, y_test, fhe="disable")
    assert set(report.scores) == {"float", "quantized (full tables)", "quantized"}
    with pytest.raises(errors.InputError, match="both X and y"):
        fitted.report(x_test, fhe="disable")
    with pytest.raises(errors.InputError, match="samples"):
        fitted.report(x_test, y_test[:-1], fhe="disable")


def test_unknown_fhe_mode(fitted: Any, iris: Any) -> None:
    with pytest.raises(errors.ParameterError, match="'fhe' parameter"):
        fitted.predict(iris[1], fhe="encrypted")


@pytest.mark.parametrize("method", [*METHODS, "compile", "score"])
def test_wrong_number_of_features(method: str, fitted: Any, iris: Any) -> None:
    x = iris[1][:, :3]
    args = (x, iris[3]) if method == "score" else (x,)
    with pytest.raises(
        errors.InputError, match="X has 3 features, but LogisticRegression is expecting 4"
    ):
        getattr(fitted, method)(*args)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_inputs(bad: float, fitted: Any, iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    x = x_test.copy()
    x[1, 2] = bad
    with pytest.raises(errors.InputError, match=r"NaN|infinity"):
        fitted.predict(x)
    x = x_train.copy()
    x[0, 0] = bad
    with pytest.raises(errors.InputError, match=r"NaN|infinity"):
        fs.LogisticRegression().fit(x, y_train)
    with pytest.raises(errors.InputError, match=r"NaN|infinity"):
        fs.from_sklearn(fitted.sklearn_model_, x)
    # The model stays usable after the error.
    assert fitted.predict(x_test).shape == (len(x_test),)


def test_strings_in_inputs(fitted: Any, iris: Any) -> None:
    x = iris[1].astype(object)
    x[0, 0] = "large"
    with pytest.raises(errors.InputError, match="could not convert string to float"):
        fitted.predict(x)
    with pytest.raises(errors.InputError, match="could not convert string to float"):
        fs.Ridge().fit(x, np.arange(len(x), dtype=float))


def test_nan_targets(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    y = y_train.astype(float)
    y[3] = np.nan
    with pytest.raises(errors.InputError, match="y contains NaN"):
        fs.LinearRegression().fit(x_train, y)


@pytest.mark.parametrize(
    "cls", [fs.LogisticRegression, fs.LinearSVC, fs.SGDClassifier], ids=lambda c: c.__name__
)
def test_single_class_is_sklearns_error(cls: Any, iris: Any) -> None:
    x_train = iris[0]
    with pytest.raises(ValueError, match="class"):
        cls().fit(x_train, np.zeros(len(x_train)))


def test_classifier_refuses_continuous_targets(iris: Any) -> None:
    with pytest.raises(ValueError, match="Unknown label type"):
        fs.LogisticRegression().fit(iris[0], iris[0][:, 0])


@pytest.mark.parametrize(
    ("params", "error", "match"),
    [
        ({"n_bits": 12}, fs.EstimatorParameterError, r"'n_bits' parameter of Ridge must be an int"),
        ({"n_bits": 0}, fs.EstimatorParameterError, "'n_bits'"),
        ({"n_bits": 4.5}, fs.EstimatorParameterError, "'n_bits'"),
        ({"n_bits": {"weight": 4}}, errors.ParameterError, "unknown key 'weight'"),
        ({"n_bits": {"weights": 9}}, errors.ParameterError, "'weights' entry"),
        ({"rounding_bits": 0}, fs.EstimatorParameterError, "'rounding_bits'"),
        ({"p_error": 1.5}, fs.EstimatorParameterError, "'p_error'"),
        ({"alpha": -1.0}, fs.EstimatorParameterError, "'alpha' parameter of Ridge"),
    ],
)
def test_bad_parameters(params: dict[str, Any], error: type, match: str, iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    model = fs.Ridge().fit(x_train, y_train)
    before = model.predict(x_test)
    model.set_params(**params)
    with pytest.raises(error, match=match) as info:
        model.fit(x_train, y_train)
    assert isinstance(info.value, errors.ParameterError)
    # The failed fit left the previous fit in place.
    np.testing.assert_array_equal(model.predict(x_test), before)


def test_failed_refit_keeps_the_previous_fit(fitted: Any, iris: Any) -> None:
    x_train, x_test, _, _ = iris
    before = fitted.predict(x_test)
    with pytest.raises(ValueError, match="class"):
        fitted.fit(np.hstack([x_train, x_train]), np.zeros(len(x_train)))
    assert fitted.n_features_in_ == 4
    np.testing.assert_array_equal(fitted.predict(x_test), before)


def test_unknown_constructor_argument() -> None:
    with pytest.raises(TypeError, match="bogus"):
        fs.LogisticRegression(bogus=1)
    with pytest.raises(TypeError):
        fs.Ridge(1.0, 2.0)  # Ridge takes one positional argument


def test_from_sklearn_unsupported_kernel(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    svc = SVC(kernel="rbf").fit(x_train, y_train)
    with pytest.raises(errors.UnsupportedOpError, match=r"SVC\(kernel='rbf'\)") as info:
        fs.from_sklearn(svc, x_train)
    assert "LinearSVC" in str(info.value)
    with pytest.raises(errors.UnsupportedOpError, match=r"SVC\(kernel='rbf'\)"):
        fs.from_sklearn(SVC(kernel="rbf"), x_train)  # unsupported before unfitted


def test_from_sklearn_unsupported_class(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    with pytest.raises(errors.UnsupportedOpError, match="GaussianNB") as info:
        fs.from_sklearn(GaussianNB().fit(x_train, y_train), x_train)
    assert "LogisticRegression" in str(info.value)  # lists what is supported
    with pytest.raises(errors.UnsupportedOpError, match="ndarray"):
        fs.from_sklearn(np.zeros(3), x_train)


def test_from_sklearn_unfitted_and_wrong_width(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    with pytest.raises(fs.EstimatorNotFittedError, match="not fitted"):
        fs.from_sklearn(SkMLPClassifier(), x_train)
    model = SkMLPClassifier(hidden_layer_sizes=(4,), max_iter=3000, random_state=0)
    model.fit(x_train, y_train)
    with pytest.raises(errors.InputError, match=r"X has 3 features.*expects 4"):
        fs.from_sklearn(model, x_train[:, :3])


def test_mlp_unknown_activation(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    model = SkMLPClassifier(hidden_layer_sizes=(4,), max_iter=3000, random_state=0)
    model.fit(x_train, y_train)
    model.activation = "softsign"  # e.g. a patched or newer scikit-learn
    with pytest.raises(errors.UnsupportedOpError, match="activation='softsign'") as info:
        fs.from_sklearn(model, x_train)
    assert "MLPClassifier" in str(info.value) and "relu" in str(info.value)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
def test_mlp_multilabel_is_unsupported(iris: Any) -> None:
    x_train, _, y_train, _ = iris
    y = np.stack([y_train == 0, y_train == 1], axis=1).astype(int)
    with pytest.raises(errors.UnsupportedOpError, match="multilabel"):
        fs.MLPClassifier(hidden_layer_sizes=(4,), max_iter=50, random_state=0).fit(x_train, y)


def test_inputs_outside_the_calibration_range_are_clipped(fitted: Any, iris: Any) -> None:
    x_train, x_test, _, _ = iris
    far = x_test * 1000.0
    clipped = np.clip(far, x_train.min(axis=0), x_train.max(axis=0))
    module = fitted.quantized_module_
    np.testing.assert_array_equal(module.forward_integers(far), module.forward_integers(clipped))
    np.testing.assert_array_equal(fitted.decision_function(far), fitted.decision_function(clipped))
    # The proven accumulator bound holds for the far-out inputs: nothing wrapped.
    acc_max = module.program.output_step.acc_max
    ints = module.forward_integers(far)
    assert ints.min() >= 0 and (ints <= acc_max).all()
