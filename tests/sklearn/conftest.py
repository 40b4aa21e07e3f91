"""Small, standardized scikit-learn data sets shared by the sklearn tests."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from sklearn.datasets import (
    load_breast_cancer,
    load_diabetes,
    load_digits,
    load_iris,
    load_wine,
    make_regression,
)
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

Split = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def split(x: np.ndarray, y: np.ndarray, scale_y: bool = False) -> Split:
    """70/30 split with a fixed seed; features standardized on the training part."""
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    scaler = StandardScaler().fit(x_train)
    if scale_y:
        mean, std = y_train.mean(), y_train.std()
        y_train, y_test = (y_train - mean) / std, (y_test - mean) / std
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def _poisson_counts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 5))
    rate = np.exp(x @ np.array([0.3, -0.2, 0.4, 0.1, 0.0]) + 1.0)
    return x, rng.poisson(rate).astype(np.float64)


_LOADERS = {
    "breast_cancer": lambda: split(*load_breast_cancer(return_X_y=True)),
    "iris": lambda: split(*load_iris(return_X_y=True)),
    "wine": lambda: split(*load_wine(return_X_y=True)),
    "digits": lambda: split(*load_digits(return_X_y=True)),
    "diabetes": lambda: split(*load_diabetes(return_X_y=True)),
    "regression": lambda: split(
        *make_regression(n_samples=400, n_features=10, noise=10.0, random_state=0),
        scale_y=True,
    ),
    "poisson": lambda: split(*_poisson_counts()),
}
_CACHE: dict[str, Split] = {}


def dataset(name: str) -> Split:
    """``(x_train, x_test, y_train, y_test)`` of a named data set, built once."""
    if name not in _CACHE:
        _CACHE[name] = _LOADERS[name]()
    return _CACHE[name]


@pytest.fixture(scope="session")
def load() -> Callable[[str], Split]:
    """The :func:`dataset` loader (test modules cannot import a conftest by name)."""
    return dataset


@pytest.fixture(scope="session")
def iris() -> Split:
    return dataset("iris")


@pytest.fixture(scope="session")
def breast_cancer() -> Split:
    return dataset("breast_cancer")
