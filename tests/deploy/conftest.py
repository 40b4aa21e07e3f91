"""Shared artifacts of the deployment-safety tests: a small linear model (no table lookup:
fast keys and runs), saved signed and unsigned, with a private circuit cache."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.deploy import FHEModelDev
from fhe_quant.model import QuantizedModule
from fhe_quant.signing import write_signing_key_pair
from fhe_quant.torch import compile_torch_model


@dataclass(frozen=True)
class Saved:
    """A saved model: ``root/client``, ``root/server``; its keys and circuit cache."""

    root: Path
    model: QuantizedModule
    x: np.ndarray
    private_key: Path
    public_key: Path
    cache: Path

    def copy(self, target: Path) -> Path:
        shutil.copytree(self.root, target)
        return target


def _linear(seed: int, n_out: int) -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, n_out)), np.random.default_rng(seed).normal(size=(40, 4))


def save_linear(base: Path, seed: int, n_out: int, sign: bool = True) -> Saved:
    """Compile and save a linear model under ``base`` (signed with a new key pair)."""
    net, x = _linear(seed, n_out)
    model = compile_torch_model(net, x, n_bits=4)
    base.mkdir(parents=True, exist_ok=True)
    private, public = write_signing_key_pair(base / "owner")
    FHEModelDev(base / "artifact", model).save(signing_key=private if sign else None)
    return Saved(base / "artifact", model, x, private, public, base / "cache")


@pytest.fixture(scope="package")
def signed(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return save_linear(tmp_path_factory.mktemp("signed"), seed=0, n_out=2)


@pytest.fixture(scope="package")
def other(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    """Another model of the same input shape, signed by another key."""
    return save_linear(tmp_path_factory.mktemp("other"), seed=1, n_out=3)


@pytest.fixture(scope="package")
def unsigned(tmp_path_factory: pytest.TempPathFactory) -> Saved:
    return save_linear(tmp_path_factory.mktemp("unsigned"), seed=0, n_out=2, sign=False)
