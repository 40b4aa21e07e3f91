"""Real encryption, one tiny model per family: ``execute`` gives ``disable``'s integers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fhe_quant.sklearn as fs

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def _check_execute(model: Any, x_train: np.ndarray, x_test: np.ndarray) -> None:
    model.compile(x_train)
    x = x_test[:2]
    module = model.quantized_module_
    np.testing.assert_array_equal(
        module.forward_integers(x, fhe="execute"), module.forward_integers(x, fhe="disable")
    )
    np.testing.assert_array_equal(model.predict(x, fhe="execute"), model.predict(x))


@pytest.mark.slow
@pytest.mark.execute
def test_linear_model_execute(iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    model = fs.LogisticRegression(p_error=TINY_P_ERROR).fit(x_train, y_train)
    _check_execute(model, x_train, x_test)
    assert model.quantized_module_.statistics["pbs_count"] == 0


@pytest.mark.slow
@pytest.mark.execute
def test_mlp_execute(iris: Any) -> None:
    x_train, x_test, y_train, _ = iris
    model = fs.MLPClassifier(
        hidden_layer_sizes=(4,), max_iter=3000, random_state=0, n_bits=3, p_error=TINY_P_ERROR
    ).fit(x_train, y_train)
    _check_execute(model, x_train, x_test)
    assert model.quantized_module_.statistics["pbs_count"] > 0
