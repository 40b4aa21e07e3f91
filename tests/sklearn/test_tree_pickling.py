"""Tree estimators are plain data: they pickle, deep-copy and clone with scikit-learn's
own code (no rebuild from saved ranges), and the copies compute the same integers."""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
from sklearn.base import BaseEstimator, clone

import fhe_quant.sklearn as fs
from fhe_quant.lower import TableRead, TableStep
from fhe_quant.program_modules import TreeModule

TINY_P_ERROR = 1e-12

_CASES = [
    (fs.DecisionTreeClassifier, "wine", {"max_depth": 3}),
    (fs.RandomForestClassifier, "breast_cancer", {"n_estimators": 4, "max_depth": 3}),
    (fs.GradientBoostingRegressor, "diabetes", {"n_estimators": 4, "max_depth": 3}),
    (fs.ExtraTreesRegressor, "diabetes", {"n_estimators": 3, "max_depth": 3}),
]


def _round_trips(value: Any) -> list[Any]:
    return [copy.deepcopy(value), pickle.loads(pickle.dumps(value))]


def test_tree_estimators_use_scikit_learns_pickling() -> None:
    for cls in (fs.DecisionTreeClassifier, fs.RandomForestRegressor, fs.XGBClassifier):
        assert cls.__getstate__ is BaseEstimator.__getstate__
        assert cls.__setstate__ is BaseEstimator.__setstate__


@pytest.mark.parametrize(
    ("cls", "data", "params"), _CASES, ids=lambda v: getattr(v, "__name__", "")
)
def test_fitted_estimators_round_trip(cls: type, data: str, params: dict, load: Any) -> None:
    x_train, x_test, y_train, _ = load(data)
    model = cls(random_state=0, n_bits=4, **params).fit(x_train, y_train)
    tables = [s for s in model.quantized_module_.program.steps if isinstance(s, TableStep)]
    assert tables and all(isinstance(s.exact, TableRead) for s in tables)
    expected = model.quantized_module_.forward_integers(x_test)
    for clone_ in _round_trips(model):
        module = clone_.quantized_module_
        assert type(module) is TreeModule and module is not model.quantized_module_
        np.testing.assert_array_equal(module.forward_integers(x_test), expected)
        np.testing.assert_array_equal(clone_.predict(x_test), model.predict(x_test))
        assert module.program.source() == model.quantized_module_.program.source()
        # the exact functions of the tables are the tables themselves
        q = module.quantize_input(x_test)
        np.testing.assert_array_equal(module.program.run_without_rounding(q), expected)
    fresh = clone(model)
    assert fresh.get_params() == model.get_params() and not hasattr(fresh, "quantized_module_")


def test_a_compiled_estimator_copies_without_its_circuit(load: Any) -> None:
    # NOTE: Concrete's compiled circuit is not data: a copy holds what defines it
    # (DESIGN-NOTES §17) and compiles the same circuit again on first use.
    x_train, x_test, y_train, _ = load("wine")
    model = fs.DecisionTreeClassifier(max_depth=3, n_bits=3, p_error=TINY_P_ERROR)
    model.fit(x_train, y_train).compile(x_train[:8])
    simulated = model.predict(x_test, fhe="simulate")
    for copy_ in _round_trips(model):
        circuit = copy_.quantized_module_._circuit
        assert not circuit.is_compiled
        np.testing.assert_array_equal(copy_.predict(x_test), model.predict(x_test))
        np.testing.assert_array_equal(copy_.predict(x_test, fhe="simulate"), simulated)
        assert circuit.is_compiled
    assert model.quantized_module_._circuit is not None  # the original keeps its circuit
