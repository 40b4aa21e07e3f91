"""Shared QAT fixtures: a small MLP factory, and an MLP and a CNN trained on digits once."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.torch import QATModule, prepare_qat
from fhe_quant.training import fit

MLPFactory = Callable[..., nn.Module]


def _mlp(
    n_in: int = 64,
    width: int = 24,
    n_out: int = 10,
    act: type[nn.Module] = nn.ReLU,
    seed: int = 0,
) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(n_in, width), act(), nn.Linear(width, width), act(), nn.Linear(width, n_out)
    )


@pytest.fixture(scope="session")
def make_mlp() -> MLPFactory:
    """``make_mlp(n_in, width, n_out, act, seed)``: a 3-layer MLP, deterministic."""
    return _mlp


@pytest.fixture(scope="session")
def trained_qat(digits: tuple[np.ndarray, ...]) -> QATModule:
    """A 3-bit QAT MLP (64-24-24-10) trained 3 epochs on digits, in eval mode."""
    x_train, _, y_train, _ = digits
    qat = prepare_qat(_mlp(), n_bits=3)
    fit(qat, x_train, y_train, epochs=3, lr=1e-2, verbose=False)
    return qat.eval()


def _cnn(channels: int = 4, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, channels, 3),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(channels * 3 * 3, 10),
    )


@pytest.fixture(scope="session")
def make_cnn() -> Callable[..., nn.Module]:
    """``make_cnn(channels, seed)``: conv 1->channels 3x3, ReLU, avg pool 2, linear."""
    return _cnn


@pytest.fixture(scope="session")
def digit_images(digits: tuple[np.ndarray, ...]) -> tuple[np.ndarray, ...]:
    """The standardized digits as 1x8x8 images (same split)."""
    x_train, x_test, y_train, y_test = digits
    return x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8), y_train, y_test


@pytest.fixture(scope="session")
def trained_cnn(digit_images: tuple[np.ndarray, ...]) -> QATModule:
    """A 3-bit QAT CNN (conv 1->4 3x3, ReLU, avg pool 2, linear 36->10) trained 3 epochs
    on digits, in eval mode."""
    x_train, _, y_train, _ = digit_images
    qat = prepare_qat(_cnn(), n_bits=3, X_sample=x_train)
    fit(qat, x_train, y_train, epochs=3, lr=1e-2, verbose=False)
    return qat.eval()
