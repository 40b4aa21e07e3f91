"""``accumulator_bits`` on the scikit-learn perceptrons and ``from_sklearn``."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.neural_network import MLPClassifier as SkMLPClassifier

from fhe_quant import errors
from fhe_quant.lower import LinearStep
from fhe_quant.sklearn import LogisticRegression, MLPClassifier, MLPRegressor, from_sklearn


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6))
    return x, (x[:, 0] + x[:, 1] > 0).astype(int)


def _acc_bits(model) -> list[int]:
    steps = model.quantized_module_.program.steps
    return [s.acc_bits for s in steps if isinstance(s, LinearStep)]


def test_mlp_classifier_bounds_every_accumulator() -> None:
    x, y = _data()
    free = MLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(x, y)
    model = MLPClassifier(
        hidden_layer_sizes=(16,), max_iter=2000, random_state=0, accumulator_bits=9
    ).fit(x, y)
    assert max(_acc_bits(free)) > 9 and max(_acc_bits(model)) <= 9
    assert model.get_params()["accumulator_bits"] == 9
    assert model.score(x, y) >= 0.9


def test_mlp_regressor_accepts_accumulator_bits() -> None:
    x, y = _data()
    model = MLPRegressor(
        hidden_layer_sizes=(8,), max_iter=2000, random_state=0, accumulator_bits=10
    ).fit(x, y.astype(float))
    assert max(_acc_bits(model)) <= 10


def test_from_sklearn_mlp_and_its_errors() -> None:
    x, y = _data()
    trained = SkMLPClassifier(hidden_layer_sizes=(16,), max_iter=2000, random_state=0).fit(x, y)
    model = from_sklearn(trained, x, accumulator_bits=9)
    assert max(_acc_bits(model)) <= 9
    with pytest.raises(errors.ParameterError, match="applies to perceptrons"):
        from_sklearn(LogisticRegression().fit(x, y).sklearn_model_, x, accumulator_bits=9)
    with pytest.raises(errors.ParameterError, match="accumulator_bits"):
        MLPClassifier(accumulator_bits=1).fit(x, y)
    assert "accumulator_bits" not in LogisticRegression().get_params()
