"""Saving the same model twice writes the same bytes: no timings, no timestamps in the
artifact, so two builds of one model have equal files and equal signatures."""

from __future__ import annotations

import json
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fhe_quant.deploy import FHEModelDev, artifact_info
from fhe_quant.signing import write_signing_key_pair
from fhe_quant.torch import compile_torch_model


def _build(seed: int) -> object:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = np.random.default_rng(seed).normal(size=(120, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_torch_model(net, x, n_bits=3)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_two_builds_of_one_model_save_identical_signed_files(tmp_path: Path) -> None:
    private, _ = write_signing_key_pair(tmp_path / "owner")
    roots = []
    for build in range(2):
        started = time.time()
        model = _build(seed=0)  # compiled again: its compile time differs
        root = tmp_path / f"build{build}"
        FHEModelDev(root, model).save(signing_key=private)
        roots.append(root)
        # zip dates have a 2-second resolution: make sure the second save is later
        time.sleep(max(0.0, 2.1 - (time.time() - started)))
    first, second = _files(roots[0]), _files(roots[1])
    assert "client/manifest.sig" in first and "server/manifest.sig" in first
    assert sorted(first) == sorted(second)
    differing = [name for name in first if first[name] != second[name]]
    assert differing == []


def test_the_artifact_holds_no_timings_and_no_zip_dates(tmp_path: Path) -> None:
    FHEModelDev(tmp_path / "a", _build(seed=1)).save()
    report = json.loads((tmp_path / "a" / "client" / "report.json").read_text())
    assert report["statistics"]["pbs_count"] > 0
    assert not [key for key in report["statistics"] if key.endswith("_seconds")]
    with zipfile.ZipFile(tmp_path / "a" / "client" / "client.zip") as archive:
        assert [i.date_time for i in archive.infolist()] == [(1980, 1, 1, 0, 0, 0)]
        assert archive.namelist() == ["client.specs.json"]
    assert artifact_info(tmp_path / "a" / "client")["statistics"] == report["statistics"]
