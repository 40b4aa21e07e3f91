"""An artifact saved by an earlier fhe_quant (format 3, before the deploy package and the
deterministic report) still loads, encrypts, runs and decrypts to its recorded outputs.

``data/format3_main`` was saved by main at 9d8bb05: a 4 -> 2 linear model, 4 bits,
unsigned; ``inputs.txt``/``outputs.txt`` are three samples and that model's outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from fhe_quant.deploy import FHEModelClient, FHEModelServer, artifact_info

OLD = Path(__file__).parent / "data" / "format3_main"


def test_a_format_3_artifact_saved_by_main_runs_to_its_recorded_outputs(tmp_path: Path) -> None:
    root = shutil.copytree(OLD, tmp_path / "old")
    x, expected = np.loadtxt(root / "inputs.txt"), np.loadtxt(root / "outputs.txt")
    with pytest.warns(UserWarning, match="unsigned"):
        client = FHEModelClient(root / "client", key_dir=tmp_path / "keys")
    with pytest.warns(UserWarning, match="unsigned"):
        server = FHEModelServer(root / "server", cache_dir=tmp_path / "cache")
    with server:
        keys = client.get_serialized_evaluation_keys()
        results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x)]
    np.testing.assert_array_equal(client.deserialize_decrypt_dequantize(results), expected)


def test_the_old_report_with_timings_is_still_read() -> None:
    report = json.loads((OLD / "client" / "report.json").read_text())
    assert "compile_seconds" in report["statistics"]  # what main wrote
    info = artifact_info(OLD / "client")
    assert info["manifest"]["format_version"] == 3
    assert info["statistics"] == report["statistics"]
