"""``n_bits="auto"`` on tree estimators: the grid and leaf bits of least estimated
latency within the budget, chosen at ``fit`` with ``validation=(X_val, y_val)``."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import fhe_quant.sklearn as fs
from fhe_quant.errors import InputError, ParameterError
from fhe_quant.lower_tree import TreeQuantConfig
from fhe_quant.search import AccuracyBudgetError

from .conftest import dataset


def test_auto_tree_is_cheapest_within_budget_and_exact():
    x_train, x_test, y_train, y_test = dataset("wine")
    model = fs.DecisionTreeClassifier(n_bits="auto", max_depth=3, random_state=0)
    model.fit(x_train, y_train, validation=(x_test, y_test), max_accuracy_drop=0.02)
    rows = model.search_report_
    chosen = [r for r in rows if r.status == "chosen"]
    assert len(chosen) == 1 and isinstance(chosen[0].candidate, TreeQuantConfig)
    assert model.quantized_module_.quantized.config == chosen[0].candidate
    float_score = model.sklearn_model_.score(x_test, y_test)
    assert chosen[0].metric == model.score(x_test, y_test)
    assert chosen[0].metric >= float_score - 0.02
    compiled = [r for r in rows if r.estimated_seconds is not None]
    assert chosen[0].estimated_seconds == min(r.estimated_seconds for r in compiled)
    # compiled by the search, never keyed; simulate equals disable
    assert model.quantized_module_.fhe_circuit.statistics.keygen_seconds is None
    assert np.array_equal(
        model.predict(x_test[:10], fhe="simulate"), model.predict(x_test[:10], fhe="disable")
    )
    # the chosen config survives pickling
    again = pickle.loads(pickle.dumps(model))
    assert again.quantized_module_.quantized.config == chosen[0].candidate
    assert np.array_equal(again.predict(x_test), model.predict(x_test))


def test_auto_tree_regressor_uses_r2():
    x_train, x_test, y_train, y_test = dataset("diabetes")
    model = fs.DecisionTreeRegressor(n_bits="auto", max_depth=3, random_state=0)
    model.fit(x_train, y_train, validation=(x_test, y_test), max_accuracy_drop=0.05)
    chosen = next(r for r in model.search_report_ if r.status == "chosen")
    assert chosen.metric == pytest.approx(model.score(x_test, y_test))


def test_auto_tree_budget_error_leaves_estimator_unfitted():
    # a regressor validated on its own predictions (float R^2 = 1) with no drop allowed:
    # every candidate rounds the leaf values (y spans six orders of magnitude), so none
    # reaches 1
    from sklearn.tree import DecisionTreeRegressor

    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1000, size=(200, 1))
    y = x[:, 0] ** 2
    float_model = DecisionTreeRegressor(max_depth=3, random_state=0).fit(x, y)
    x_val = x[:40]
    model = fs.DecisionTreeRegressor(n_bits="auto", max_depth=3, random_state=0)
    with pytest.raises(AccuracyBudgetError, match="best reached") as info:
        model.fit(x, y, validation=(x_val, float_model.predict(x_val)), max_accuracy_drop=0.0)
    error = info.value
    assert error.float_metric == 1.0 and error.best_metric < 1.0
    assert error.best_seconds is not None and error.best_seconds > 0
    assert not hasattr(model, "quantized_module_")
    model.set_params(n_bits=3).fit(x, y)  # still usable
    assert model.predict(x[:5]).shape == (5,)


@pytest.mark.parametrize(
    ("validation", "error", "match"),
    [
        (None, InputError, "pair"),
        ("xy", InputError, "pair"),
        (("x", None), InputError, "labels"),
        ((np.zeros((3, 2)), np.zeros(3)), InputError, "shape"),
    ],
)
def test_auto_tree_bad_validation(validation, error, match):
    x_train, _, y_train, _ = dataset("wine")
    model = fs.DecisionTreeClassifier(n_bits="auto", max_depth=3, random_state=0)
    with pytest.raises(error, match=match):
        model.fit(x_train, y_train, validation=validation)
    assert not hasattr(model, "quantized_module_")
    model.set_params(n_bits=3).fit(x_train, y_train)


def test_validation_without_auto_is_refused():
    x_train, x_test, y_train, y_test = dataset("wine")
    model = fs.DecisionTreeClassifier(n_bits=3, max_depth=3)
    with pytest.raises(ParameterError, match="only used with n_bits='auto'"):
        model.fit(x_train, y_train, validation=(x_test, y_test))
    with pytest.raises(Exception, match="n_bits"):
        fs.DecisionTreeClassifier(n_bits="fast").fit(x_train, y_train)


@pytest.mark.slow
@pytest.mark.execute
def test_auto_tree_executes_like_disable():
    x_train, x_test, y_train, y_test = dataset("wine")
    model = fs.DecisionTreeClassifier(n_bits="auto", max_depth=2, random_state=0)
    model.fit(x_train, y_train, validation=(x_test, y_test), max_accuracy_drop=0.05)
    assert max(model.quantized_module_.program.lookups_by_width()) <= 4
    assert np.array_equal(
        model.predict(x_test[:1], fhe="execute"), model.predict(x_test[:1], fhe="disable")
    )
