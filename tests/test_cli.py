"""The fhe-quant command line: report on a saved torch model."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fhe_quant.cli import main

MODULE_SOURCE = """
import torch

def make(hidden=8):
    return torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 3))
"""


@pytest.fixture
def saved_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    (tmp_path / "tiny_cli_model.py").write_text(MODULE_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("tiny_cli_model", None)
    import tiny_cli_model  # type: ignore[import-not-found]

    torch.manual_seed(0)
    model = tiny_cli_model.make(hidden=6)
    torch.save(model.state_dict(), tmp_path / "state.pt")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 4))
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", rng.integers(0, 3, size=40))
    return {
        "state": str(tmp_path / "state.pt"),
        "x": str(tmp_path / "x.npy"),
        "y": str(tmp_path / "y.npy"),
    }


def test_report_prints_scores_bits_and_program(saved_model, capsys) -> None:
    code = main(
        [
            "report",
            "--module",
            "tiny_cli_model:make",
            "--kwarg",
            "hidden=6",
            "--state",
            saved_model["state"],
            "--calib",
            saved_model["x"],
            "--labels",
            saved_model["y"],
            "--n-bits",
            "3",
            "--program",
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert "simulate" in out and "PBS per sample" in out
    assert "def program(q)" in out and "round_bit_pattern" in out


def test_report_error_is_a_clean_message(saved_model, capsys) -> None:
    code = main(
        [
            "report",
            "--module",
            "tiny_cli_model:make",
            "--kwarg",
            "hidden=6",
            "--state",
            saved_model["state"],
            "--calib",
            saved_model["x"],
            "--n-bits",
            "12",
            "--quiet",
        ]
    )
    assert code == 2
    assert "n_bits" in capsys.readouterr().err


def test_version(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert "fhe-quant" in capsys.readouterr().out


def test_info_describes_a_saved_artifact(tmp_path: Path, capsys) -> None:
    from fhe_quant.deploy import FHEModelDev
    from fhe_quant.torch import compile_torch_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    qm = compile_torch_model(model, np.random.default_rng(0).normal(size=(20, 3)), n_bits=3)
    FHEModelDev(tmp_path, qm).save()
    assert main(["info", str(tmp_path / "client")]) == 0
    out = capsys.readouterr().out
    assert f"PBS per sample: {qm.statistics['pbs_count']}" in out and "def program(q)" in out
    (tmp_path / "client" / "model.json").write_text("{}")
    assert main(["info", str(tmp_path / "client")]) == 2
    assert "checksum" in capsys.readouterr().err


def test_predict_runs_encrypted_inference_through_an_http_server(tmp_path: Path, capsys) -> None:
    import threading

    from fhe_quant.deploy import FHEModelDev
    from fhe_quant.http import make_server
    from fhe_quant.torch import compile_torch_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = np.random.default_rng(0).normal(size=(20, 3))
    qm = compile_torch_model(model, x, n_bits=2, p_error=1e-12)
    FHEModelDev(tmp_path, qm).save()
    np.save(tmp_path / "x.npy", x[:2])
    httpd = make_server(tmp_path / "server", port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        code = main(
            [
                "predict",
                str(tmp_path / "client"),
                "--data",
                str(tmp_path / "x.npy"),
                "--url",
                url,
                "--timeout",
                "120",
            ]
        )
    finally:
        httpd.shutdown()
        httpd.server_close()
    out = capsys.readouterr().out.splitlines()
    assert code == 0 and len(out) == 2
    expected = qm.forward(x[:2]).argmax(axis=1)
    assert [int(line.rsplit(" ", 1)[1]) for line in out] == expected.tolist()
