"""Shared fixtures: small trained models and data, built once per session."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.training import fit

#: Test modules import shared_helpers.py from here (importlib mode adds no path).
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits, standardized, 75/25 split with a fixed seed."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


@pytest.fixture(scope="session")
def digits_mlp(digits: tuple[np.ndarray, ...]) -> torch.nn.Module:
    """The 64-64-10 ReLU MLP of the issue, trained on digits."""
    x_train, _, y_train, _ = digits
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )
    fit(model, x_train, y_train, epochs=40, verbose=False)
    return model.eval()


def pytest_configure(config: pytest.Config) -> None:
    """Start Concrete's runtime the way fhe_quant does before any test can start it.

    NOTE: concrete-python 2.11's runtime otherwise ends the process with status 0 after the
    first encrypted run, whatever the tests did (``fhe_quant.process``); a test that uses
    ``concrete`` directly must not reopen that.
    """
    from fhe_quant.process import import_concrete

    import_concrete()
