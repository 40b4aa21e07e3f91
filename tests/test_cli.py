"""The fhe-quant command line: report, compile (torch and scikit-learn), info, serve,
predict; clean messages for bad files and module paths."""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path
from typing import Any

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


# ------------------------------------------------------------------ compile

SKLEARN_SOURCE = """
import numpy as np
from sklearn.linear_model import LogisticRegression

def data(n=120):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 4))
    return x, np.where(x[:, 0] - x[:, 2] > 0.3, "yes", "no")

def train(n=120):
    return LogisticRegression().fit(*data(n))
"""


def _run_cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fhe_quant.cli", *argv], capture_output=True, text=True, timeout=600
    )


def _serve(server_dir: Path) -> tuple[subprocess.Popen, str]:
    """``fhe-quant serve`` on a free loopback port, in its own process."""
    command = [sys.executable, "-m", "fhe_quant.cli", "serve", str(server_dir), "--port", "0"]
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL
    )
    ready, _, _ = select.select([proc.stdout], [], [], 300)  # the Dask workers start first
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("http://127.0.0.1:"):
        proc.kill()
        _, err = proc.communicate(timeout=10)
        pytest.fail(f"fhe-quant serve did not start (stdout {line!r}): {err.decode()}")
    return proc, line


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate(timeout=10)


@pytest.mark.slow
@pytest.mark.execute
def test_compile_torch_then_info_then_predict_through_serve(saved_model, tmp_path: Path) -> None:
    import tiny_cli_model  # type: ignore[import-not-found]

    from fhe_quant.torch import compile_torch_model

    out = tmp_path / "artifact"
    compiled = _run_cli(
        "compile",
        "--torch",
        "tiny_cli_model:make",
        "--kwarg",
        "hidden=6",
        "--state",
        saved_model["state"],
        "--calibration",
        saved_model["x"],
        "--n-bits",
        "2",
        "--p-error",
        "1e-12",
        "--out",
        str(out),
        "--quiet",
    )
    assert compiled.returncode == 0, compiled.stderr
    assert f"wrote {out / 'client'}" in compiled.stdout
    info = _run_cli("info", str(out / "client"))
    assert info.returncode == 0 and "task: module" in info.stdout

    x = np.load(saved_model["x"])
    np.save(tmp_path / "first.npy", x[:2])
    proc, url = _serve(out / "server")
    try:
        predicted = _run_cli(
            "predict", str(out / "client"), "--data", str(tmp_path / "first.npy"), "--url", url
        )
    finally:
        _stop(proc)
    assert predicted.returncode == 0, predicted.stderr
    lines = predicted.stdout.splitlines()
    model = tiny_cli_model.make(hidden=6)
    model.load_state_dict(torch.load(saved_model["state"], weights_only=True))
    expected = compile_torch_model(model, x, n_bits=2, compile=False).forward(x[:2])
    assert [int(line.rsplit(" ", 1)[1]) for line in lines] == expected.argmax(axis=1).tolist()


def _sklearn_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    (tmp_path / "tiny_cli_sklearn.py").write_text(SKLEARN_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    sys.modules.pop("tiny_cli_sklearn", None)
    import tiny_cli_sklearn  # type: ignore[import-not-found]

    x, _ = tiny_cli_sklearn.data()
    np.save(tmp_path / "x.npy", x)
    return tiny_cli_sklearn


@pytest.mark.parametrize("source", ["joblib", "factory"])
def test_compile_sklearn_writes_an_artifact_that_decodes_like_the_estimator(
    source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import joblib

    from fhe_quant.deploy import FHEModelClient, FHEModelServer
    from fhe_quant.sklearn import from_sklearn

    module = _sklearn_files(tmp_path, monkeypatch)
    joblib.dump(module.train(), tmp_path / "model.joblib")
    spec = "model.joblib" if source == "joblib" else "tiny_cli_sklearn:train"
    code = main(
        ["compile", "--sklearn", spec, "--calibration", "x.npy", "--n-bits", "5"]
        + ["--out", "artifact", "--quiet"]
    )
    assert code == 0, capsys.readouterr().err
    assert "0 PBS per sample" in capsys.readouterr().out

    x = np.load(tmp_path / "x.npy")
    expected = from_sklearn(module.train(), x, n_bits=5)
    client = FHEModelClient(tmp_path / "artifact" / "client")
    server = FHEModelServer(tmp_path / "artifact" / "server")
    keys = client.get_serialized_evaluation_keys()
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x[:4])]
    np.testing.assert_array_equal(client.predict(results), expected.predict(x[:4]))
    np.testing.assert_array_equal(client.predict_proba(results), expected.predict_proba(x[:4]))
    assert main(["info", "artifact/client"]) == 0
    assert "classes: ['no', 'yes']" in capsys.readouterr().out


def test_predict_prints_the_labels_of_a_classifier(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import threading

    from fhe_quant.http import make_server
    from fhe_quant.sklearn import from_sklearn

    module = _sklearn_files(tmp_path, monkeypatch)
    x = np.load(tmp_path / "x.npy")
    args = ["--calibration", "x.npy", "--out", "artifact", "--quiet"]
    assert main(["compile", "--sklearn", "tiny_cli_sklearn:train", *args]) == 0
    np.save(tmp_path / "first.npy", x[:3])
    httpd = make_server(tmp_path / "artifact" / "server", port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    capsys.readouterr()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        code = main(["predict", "artifact/client", "--data", "first.npy", "--url", url])
    finally:
        httpd.shutdown()
        httpd.server_close()
    lines = capsys.readouterr().out.splitlines()
    assert code == 0 and len(lines) == 3
    expected = from_sklearn(module.train(), x).predict(x[:3])
    assert [line.split("prediction ")[1].split()[0] for line in lines] == [
        repr(str(label)) for label in expected
    ]
    assert all("probabilities [" in line for line in lines)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sklearn", "missing.joblib"], "--sklearn: no such file 'missing.joblib'"),
        (["--sklearn", "tiny_cli_sklearn"], "must look like 'package.module:Name'"),
        (["--sklearn", "no_such_module_xyz:train"], "cannot import module 'no_such_module_xyz'"),
        (["--sklearn", "tiny_cli_sklearn:nothing"], "has no attribute 'nothing'"),
        (["--sklearn", "tiny_cli_sklearn:train", "--state", "s.pt"], "--state goes with --torch"),
        (["--torch", "tiny_cli_sklearn:train"], "not a torch.nn.Module"),
    ],
)
def test_compile_errors_are_clean_messages(
    argv: list[str], message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _sklearn_files(tmp_path, monkeypatch)
    code = main(["compile", *argv, "--calibration", "x.npy", "--out", "artifact", "--quiet"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "artifact").exists()


def test_compile_refuses_a_missing_or_misshaped_calibration_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    _sklearn_files(tmp_path, monkeypatch)
    spec = ["compile", "--sklearn", "tiny_cli_sklearn:train", "--out", "artifact", "--quiet"]
    assert main([*spec, "--calibration", "nothing.npy"]) == 2
    assert "--calibration: no such file 'nothing.npy'" in capsys.readouterr().err
    np.save(tmp_path / "wide.npy", np.zeros((5, 7)))
    assert main([*spec, "--calibration", "wide.npy"]) == 2
    assert "X has 7 features" in capsys.readouterr().err
    (tmp_path / "text.npy").write_text("not an array")
    assert main([*spec, "--calibration", "text.npy"]) == 2
    assert "is not a NumPy .npy array" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["report", "compile", "info", "serve", "predict"])
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"fhe-quant {command}" in capsys.readouterr().out


@pytest.fixture
def tiny_artifact(tmp_path: Path) -> tuple[Path, Any, np.ndarray]:
    from fhe_quant.deploy import FHEModelDev
    from fhe_quant.torch import compile_torch_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    x = np.random.default_rng(0).normal(size=(20, 3))
    qm = compile_torch_model(model, x, n_bits=2, p_error=1e-12)
    FHEModelDev(tmp_path / "art", qm).save()
    return tmp_path / "art", qm, x


def test_predict_resumes_an_interrupted_csv_and_writes_npy(
    tiny_artifact, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    from fhe_quant.http import make_server
    from fhe_quant.service_client import ServiceClient

    root, qm, x = tiny_artifact
    header = "a,b,c\n"
    (tmp_path / "x.csv").write_text(header + "\n".join(",".join(map(repr, r)) for r in x[:5]))
    sent: list[int] = []
    original = ServiceClient.predict_batch

    def counting(self, client_id, ciphertexts):
        if len(sent) == 1 and monkeypatch_state["interrupt"]:
            raise KeyboardInterrupt  # the user stops the run after one batch
        sent.append(len(ciphertexts))
        return original(self, client_id, ciphertexts)

    monkeypatch_state = {"interrupt": True}
    monkeypatch.setattr(ServiceClient, "predict_batch", counting)
    httpd = make_server(root / "server", port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    argv = ["predict", str(root / "client"), "--data", str(tmp_path / "x.csv"), "--url", url]
    argv += ["--batch-size", "2", "--quiet", "--key-dir", str(tmp_path / "keys")]
    try:
        with pytest.raises(KeyboardInterrupt):
            main([*argv, "--out", str(tmp_path / "p.csv")])
        assert (tmp_path / "p.csv").read_text().count("\n") == 3  # header + 2 rows kept
        monkeypatch_state["interrupt"] = False
        assert main([*argv, "--out", str(tmp_path / "p.csv")]) == 0
        assert sent == [2, 2, 1]  # the first two rows were not sent again
        assert main([*argv, "--out", str(tmp_path / "p.npy")]) == 0
    finally:
        httpd.shutdown()
        httpd.server_close()
    expected = qm.forward(x[:5])
    table = np.loadtxt(tmp_path / "p.csv", delimiter=",", skiprows=1)
    np.testing.assert_array_equal(table, expected)
    np.testing.assert_array_equal(np.load(tmp_path / "p.npy"), expected)
    assert not list(tmp_path.glob("p.*.progress.json")) and not (tmp_path / "p.npy.parts").exists()
    other = tmp_path / "other.npy"
    np.save(other, x[5:8])
    (tmp_path / "p.csv.progress.json").write_text('{"data_sha256": "0"}')
    code = main(
        ["predict", str(root / "client"), "--data", str(other), "--out", str(tmp_path / "p.csv")]
    )
    assert code == 2


def test_predict_and_serve_errors_are_one_line(tiny_artifact, tmp_path: Path, capsys) -> None:
    root, _, _ = tiny_artifact
    (tmp_path / "bad.csv").write_text("a,b\nx,y\n")
    base = ["predict", str(root / "client"), "--url", "http://127.0.0.1:9"]
    assert main([*base, "--data", str(tmp_path / "bad.csv")]) == 2
    assert "not a CSV table of numbers" in capsys.readouterr().err
    np.save(tmp_path / "x.npy", np.zeros((2, 3)))
    assert main([*base, "--data", str(tmp_path / "x.npy"), "--out", str(tmp_path / "p.txt")]) == 2
    assert "--out must end in .csv or .npy" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "x.npy"), "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err
    assert main([*base, "--data", str(tmp_path / "x.npy")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Request failed" in err
    assert main(["serve", str(root / "server"), "--key-memory", "lots"]) == 2
    assert "size must look like" in capsys.readouterr().err
