"""scikit-learn's own estimator checks on every public estimator (the ones not checked
in their family's test file), with small sizes so that the many fits stay quick."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
from sklearn.base import BaseEstimator
from sklearn.utils.estimator_checks import parametrize_with_checks

import fhe_quant.sklearn as fs

#: Checked in their family's own test file (same checks, their own expected failures).
CHECKED_ELSEWHERE = {
    "LogisticRegression": "tests/sklearn/test_sklearn_api.py",
    "LinearRegression": "tests/sklearn/test_sklearn_api.py",
    "MLPClassifier": "tests/sklearn/test_sklearn_api.py",
    "DecisionTreeClassifier": "tests/sklearn/test_trees.py",
    "GradientBoostingRegressor": "tests/sklearn/test_trees.py",
    "KNeighborsClassifier": "tests/sklearn/test_knn.py",
    "NeuralNetClassifier": "tests/qat/test_qat_estimators.py",
    "NeuralNetRegressor": "tests/qat/test_qat_estimators.py",
}
_BOOSTING = ("XGBClassifier", "XGBRegressor", "LGBMClassifier", "LGBMRegressor")
_SMALL: dict[str, dict[str, Any]] = {
    "MLPRegressor": {"hidden_layer_sizes": (8,), "max_iter": 300, "random_state": 0},
    "DecisionTreeRegressor": {},
    "RandomForestClassifier": {"n_estimators": 5, "random_state": 0},
    "RandomForestRegressor": {"n_estimators": 5, "random_state": 0},
    "ExtraTreesClassifier": {"n_estimators": 5, "random_state": 0},
    "ExtraTreesRegressor": {"n_estimators": 5, "random_state": 0},
    "GradientBoostingClassifier": {"n_estimators": 5, "random_state": 0},
    # NOTE: one thread: the libraries' thread pools are slower on shared 2-core machines.
    **{name: {"n_estimators": 5, "random_state": 0, "n_jobs": 1} for name in _BOOSTING},
    "LGBMRegressor": {"random_state": 0, "n_jobs": 1},  # 5 trees score R² < 0.5
}


def _public_estimators() -> list[str]:
    names = []
    for name in fs.__all__:
        if name in _BOOSTING:
            library = "xgboost" if name.startswith("XGB") else "lightgbm"
            if importlib.util.find_spec(library) is None:
                continue  # the optional extra is not installed
        value = getattr(fs, name)
        if isinstance(value, type) and issubclass(value, BaseEstimator):
            names.append(name)
    return names


def _estimators() -> list[Any]:
    return [
        getattr(fs, name)(**_SMALL.get(name, {}))
        for name in _public_estimators()
        if name not in CHECKED_ELSEWHERE
    ]


def _expected_failures(estimator: Any) -> dict[str, str]:
    """The checks the wrapped scikit-learn estimator itself is expected to fail (the
    wrapper fits that very model), with scikit-learn's reason: none is ours."""
    # NOTE: a private helper of scikit-learn's own test suite; without it, no failure is
    # expected and such a check fails loudly.
    from sklearn.utils._test_common.instance_generator import _get_expected_failed_checks

    inner = estimator._make_sklearn_model()
    if not type(inner).__module__.startswith("sklearn"):
        return {}
    return {
        check: f"as scikit-learn's own {type(inner).__name__}: {reason}"
        for check, reason in _get_expected_failed_checks(inner).items()
    }


def test_every_public_estimator_is_checked() -> None:
    checked = {type(e).__name__ for e in _estimators()} | set(CHECKED_ELSEWHERE)
    assert set(_public_estimators()) == checked
    assert len(_public_estimators()) >= 25


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(_estimators(), expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)
