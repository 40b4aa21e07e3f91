"""Helpers shared by test modules of several folders (``tests/conftest.py`` puts this
folder on ``sys.path``: tests are imported with ``--import-mode=importlib``)."""

from __future__ import annotations

import http.client
import json
import select
import signal
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.lower import IntegerProgram

# --------------------------------------------------------------------------- programs


class ProductShuffle(nn.Module):
    """A product of two encrypted tensors and a channel shuffle (a ProductStep and a
    GatherStep once lowered), from 4 features to 2."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(4, 6), nn.Linear(6, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(t)) * torch.sigmoid(self.b(t))
        shuffled = h.view(-1, 2, 3).transpose(1, 2).reshape(-1, 6)
        return self.c(torch.relu(shuffled))


def all_values(program: IntegerProgram, q: np.ndarray) -> list[np.ndarray]:
    """Every value the program computes (index 0: the input), as the program runs it."""
    return [np.asarray(value) for value in program.values(q)]


def extreme_codes(module: Any, rng: np.random.Generator, n: int) -> np.ndarray:
    """Input codes of a compiled module's program: ``n`` uniform samples, ``n`` of corner
    codes (each 0 or ``qmax``), one all 0 and one all ``qmax``."""
    qmax = module.program.input_quantizer.qmax
    shape = (n,) + module.program.input_shape
    q = rng.integers(0, qmax + 1, size=shape)
    corners = rng.choice([0, qmax], size=shape)
    return np.concatenate([q, corners, np.zeros_like(q[:1]), np.full_like(q[:1], qmax)])


# --------------------------------------------------------------------------- data forms


def through_json(data: Any) -> Any:
    """``data`` (JSON values and NumPy arrays) through JSON text, its arrays kept aside
    (copied) as an artifact keeps them in its ``.npz``."""
    arrays: list[np.ndarray] = []

    def out(value: Any) -> Any:
        if isinstance(value, np.ndarray):
            arrays.append(value.copy())
            return {"__array__": len(arrays) - 1}
        if isinstance(value, dict):
            return {k: out(v) for k, v in value.items()}
        if isinstance(value, list):
            return [out(v) for v in value]
        return value

    def back(value: Any) -> Any:
        if isinstance(value, dict) and set(value) == {"__array__"}:
            return arrays[value["__array__"]]
        if isinstance(value, dict):
            return {k: back(v) for k, v in value.items()}
        if isinstance(value, list):
            return [back(v) for v in value]
        return value

    return back(json.loads(json.dumps(out(data))))


def assert_same_data(a: Any, b: Any, where: str = "") -> None:
    """Equal data: same keys in the same order, lists, scalars (and their types), arrays
    (and their dtypes and shapes)."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_same_data(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_data(x, y, f"{where}[{i}]")
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, where
        np.testing.assert_array_equal(a, b, err_msg=where)
    else:
        assert a == b, (where, a, b)


# --------------------------------------------------------------------------- servers


def start_server(
    command: list[str], log: Path, timeout: float, append: bool = False, kill_wait: float = 10
) -> tuple[subprocess.Popen, str]:
    """Start a server process that prints its URL on its first stdout line; its stderr
    goes to ``log``. Fails the test (with the log) if no URL comes within ``timeout``."""
    with log.open("ab" if append else "wb") as stderr:  # the child keeps its own handle
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("http://127.0.0.1:"):
        proc.kill()
        proc.wait(kill_wait)
        pytest.fail(f"{command[2]} did not start (stdout {line!r}): {log.read_text()}")
    return proc, line


def stop_server(
    proc: subprocess.Popen, sig: int = signal.SIGTERM, wait: float = 10, kill_wait: float = 10
) -> None:
    """Send ``sig``, wait ``wait`` seconds, then kill; close its stdout."""
    proc.send_signal(sig)
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(kill_wait)
    if proc.stdout is not None:
        proc.stdout.close()


def raw_request(
    url: str, method: str, path: str, headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int, Any]:
    """A request with hand-made headers; returns (status, decoded JSON body or None)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders(body or None)
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw else None
    finally:
        conn.close()
