"""Concrete's native chatter (``KeySetCache: miss, regenerating ...``) stays out of the
user's terminal unless asked for; other native output still gets through."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.deploy import FHEModelClient, FHEModelDev
from fhe_quant.fhe import native_output
from fhe_quant.torch import compile_torch_model


def test_native_chatter_is_dropped_and_the_rest_kept(capfd: pytest.CaptureFixture[str]) -> None:
    with native_output():
        os.write(2, b"KeySetCache: miss, regenerating /tmp/k\nreal problem\n")
        os.write(1, b"native stdout\n")
    out, err = capfd.readouterr()
    assert err == "real problem\n" and out == "native stdout\n"
    with native_output(verbose=True):
        os.write(2, b"KeySetCache: miss, regenerating /tmp/k\n")
    assert "KeySetCache" in capfd.readouterr().err


def test_native_output_restores_the_descriptors_after_an_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(RuntimeError), native_output():
        raise RuntimeError("boom")
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"


@pytest.mark.slow
def test_client_key_generation_is_quiet(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(20, 3))
    qm = compile_torch_model(nn.Linear(3, 2), x, n_bits=4)
    FHEModelDev(tmp_path / "artifact", qm).save()
    capfd.readouterr()
    quiet = FHEModelClient(tmp_path / "artifact" / "client", key_dir=tmp_path / "keys")
    quiet.generate_private_and_evaluation_keys()
    out, err = capfd.readouterr()
    assert "KeySetCache" not in out + err
    loud = FHEModelClient(tmp_path / "artifact" / "client", key_dir=tmp_path / "other_keys")
    loud.generate_private_and_evaluation_keys(verbose=True)
    out, err = capfd.readouterr()
    assert "KeySetCache: miss" in out + err  # the message this silences is real
