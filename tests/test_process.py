"""Exit statuses and signals stay the interpreter's own after an encrypted run.

concrete-python 2.11's runtime turns every exit status into 0 once a circuit has run,
and replaces the SIGPIPE disposition so that writing to a closed socket kills the
process (``fhe_quant.process``). Each case runs in a child process: the thing under
test is how that process ends.
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from fhe_quant.process import RUNTIME_SIGNALS, import_concrete

pytestmark = [pytest.mark.slow, pytest.mark.execute]

TIMEOUT = 300

#: A tiny model run for real (key generation, encryption, run, decryption) through the
#: public API; defines ``ENCRYPTED_RUN_OK``.
ENCRYPTED_RUN = textwrap.dedent(
    """
    import numpy as np
    from fhe_quant.sklearn import LinearRegression

    _x = np.random.default_rng(0).normal(size=(120, 3))
    _model = LinearRegression(n_bits=4).fit(_x, _x @ [1.0, -2.0, 0.5])
    _model.compile(_x)
    ENCRYPTED_RUN_OK = bool(
        np.array_equal(_model.predict(_x[:1], fhe="execute"), _model.predict(_x[:1]))
    )
    """
)


def _run(args: list[str], cwd: Path, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        stdin=subprocess.DEVNULL,
        **kwargs,
    )


def _script(tmp_path: Path, body: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "script.py"
    path.write_text(ENCRYPTED_RUN + textwrap.dedent(body))
    return _run([sys.executable, str(path)], tmp_path)


@pytest.mark.parametrize("failing", [True, False])
def test_pytest_status_counts_failures_after_an_encrypted_run(tmp_path: Path, failing: bool):
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # keep the project's options out
    (tmp_path / "test_inner.py").write_text(
        ENCRYPTED_RUN
        + textwrap.dedent(
            f"""
            def test_encrypted():
                assert ENCRYPTED_RUN_OK

            def test_plain():
                assert {not failing}
            """
        )
    )
    result = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], tmp_path)
    summary = result.stdout.strip().splitlines()[-1]
    if failing:
        assert "1 failed, 1 passed" in summary, result.stdout + result.stderr
        assert result.returncode == 1, summary
    else:
        assert "2 passed" in summary, result.stdout + result.stderr
        assert result.returncode == 0, summary


def test_script_keeps_its_exit_status(tmp_path: Path):
    result = _script(tmp_path, "import sys\nassert ENCRYPTED_RUN_OK\nsys.exit(3)\n")
    assert result.returncode == 3, result.stderr


def test_uncaught_exception_exits_1(tmp_path: Path):
    result = _script(tmp_path, "assert ENCRYPTED_RUN_OK\nraise RuntimeError('boom')\n")
    assert result.returncode == 1
    assert "RuntimeError: boom" in result.stderr


def test_cli_user_error_after_an_encrypted_run_exits_2(tmp_path: Path):
    body = f"""
    from fhe_quant.cli import main
    assert ENCRYPTED_RUN_OK
    raise SystemExit(main(["info", {str(tmp_path / "missing")!r}]))
    """
    result = _script(tmp_path, body)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().startswith("fhe-quant: error:"), result.stderr
    assert "Traceback" not in result.stderr


def test_console_script_user_error_exits_2(tmp_path: Path):
    # NOTE: importing the CLI's deployment code starts Concrete's runtime already, so
    # without the fix this exits 0 too.
    result = _run(
        [
            sys.executable,
            "-c",
            "from fhe_quant.cli import main; raise SystemExit(main())",
            "info",
            str(tmp_path / "missing"),
        ],
        tmp_path,
    )
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_writing_to_a_closed_socket_raises_instead_of_killing(tmp_path: Path):
    body = """
    import socket
    assert ENCRYPTED_RUN_OK
    a, b = socket.socketpair()
    b.close()
    try:
        for _ in range(100):
            a.sendall(b"x" * 65536)
    except BrokenPipeError:
        print("broken pipe raised")
    """
    result = _script(tmp_path, body)
    assert result.returncode == 0, (result.returncode, result.stderr)
    assert "broken pipe raised" in result.stdout


def _sigaction_handler(signum: int) -> int:
    # NOTE: the handler pointer is the first field of Linux's struct sigaction.
    buffer = ctypes.create_string_buffer(512)
    assert ctypes.CDLL(None).sigaction(signum, None, buffer) == 0
    return struct.unpack_from("P", buffer.raw)[0]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's sigaction")
def test_runtime_leaves_signal_dispositions_as_they_were():
    fhe = import_concrete()
    before = {s: _sigaction_handler(s) for s in RUNTIME_SIGNALS}

    @fhe.compiler({"x": "encrypted"})
    def add_one(x):
        return x + 1

    circuit = add_one.compile(range(8))
    assert circuit.encrypt_run_decrypt(3) == 4
    assert {s: _sigaction_handler(s) for s in RUNTIME_SIGNALS} == before
    assert before[int(__import__("signal").SIGPIPE)] == 1  # SIG_IGN, Python's choice


def _hang_up_after_request(port: int, request: bytes) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        # NOTE: linger 0 closes with a reset, so the server's reply hits a dead socket.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def test_server_survives_clients_that_hang_up(tmp_path: Path):
    from fhe_quant.deploy import FHEModelClient, FHEModelDev
    from fhe_quant.http import Client
    from fhe_quant.sklearn import LinearRegression

    x = np.random.default_rng(1).normal(size=(120, 3))
    model = LinearRegression(n_bits=4).fit(x, x @ [1.0, 2.0, -1.0])
    model.compile(x)
    FHEModelDev(tmp_path / "artifact", model).save()
    client = FHEModelClient(tmp_path / "artifact" / "client")
    keys = client.get_serialized_evaluation_keys()
    (ciphertext,) = client.quantize_encrypt_serialize(x[:1])

    env = dict(os.environ, PYTHONUNBUFFERED="1")
    command = [
        sys.executable,
        "-m",
        "fhe_quant.http",
        str(tmp_path / "artifact" / "server"),
        "--port",
        "0",
    ]
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:"), proc.stderr.read()
        port = int(url.rsplit(":", 1)[1])
        api = Client(url, timeout=60)
        api.upload_keys("alice", keys)
        expected = client.deserialize_decrypt_dequantize([api.predict("alice", ciphertext)])
        request = (
            f"POST /clients/alice/predict HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Length: {len(ciphertext)}\r\n\r\n"
        ).encode() + ciphertext
        for _ in range(20):
            _hang_up_after_request(port, request)
        again = client.deserialize_decrypt_dequantize([api.predict("alice", ciphertext)])
        assert proc.poll() is None, proc.stderr.read()
        np.testing.assert_array_equal(again, expected)
    finally:
        proc.terminate()
        proc.wait(30)
        proc.stdout.close()
        proc.stderr.close()
