"""Shared by the serving tests: one small keyed model (2-bit tables, quick keys), saved
once per session, and its client with keys."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fhe_quant.deploy import FHEModelClient, FHEModelDev
from fhe_quant.torch import compile_torch_model


def _save(root: Path, seed: int, width: int) -> tuple[Path, Any, np.ndarray]:
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(4, width), torch.nn.ReLU(), torch.nn.Linear(width, 3))
    x = np.random.default_rng(seed).normal(size=(40, 4))
    qm = compile_torch_model(net, x, n_bits=2)
    FHEModelDev(root, qm).save()
    return root, qm, x


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The model: its artifact root, QuantizedModule, data, and a client with keys."""
    root, qm, x = _save(tmp_path_factory.mktemp("served"), 0, 6)
    client = FHEModelClient(root / "client", key_dir=root / "keys")
    client.generate_private_and_evaluation_keys()
    return {"root": root, "qm": qm, "x": x, "client": client}


@pytest.fixture(scope="session")
def other_model(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Another model (other weights and circuit) with its own client and keys."""
    root, qm, x = _save(tmp_path_factory.mktemp("other"), 1, 9)
    client = FHEModelClient(root / "client", key_dir=root / "keys")
    client.generate_private_and_evaluation_keys()
    return {"root": root, "qm": qm, "x": x, "client": client}
