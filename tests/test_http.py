"""The HTTP front end, run as a separate process on 127.0.0.1: concurrent clients with
their own keys get correct answers, and malformed requests get a 4xx with a message
without stopping the server."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch
from shared_helpers import raw_request, start_server, stop_server

from fhe_quant.deploy import FHEModelClient, FHEModelDev
from fhe_quant.http import Client, HTTPRequestError
from fhe_quant.torch import compile_torch_model

N_CLIENTS = 8
SMALL_LIMIT = 4096
TIMEOUT = 60.0


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any, np.ndarray]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 3))
    x = np.random.default_rng(0).normal(size=(40, 4))
    # n_bits=2 keeps table lookups (real evaluation keys) with ~100 MB keys that take ~2 s
    # to generate; n_bits=3 doubles both, too slow for 8 clients in a fast test.
    qm = compile_torch_model(net, x, n_bits=2)
    root = tmp_path_factory.mktemp("http_artifact")
    FHEModelDev(root, qm).save()
    return root, qm, x


def _start(server_dir: Path, log: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "fhe_quant.http", str(server_dir), "--port", "0"]
    return start_server(command + ["--host", "127.0.0.1", *extra], log, TIMEOUT)


def _stop(proc: subprocess.Popen) -> None:
    stop_server(proc)


@pytest.fixture(scope="module")
def servers(artifact, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """(url of a server with the default body limit, url of one with a small limit)."""
    root = artifact[0]
    logs = tmp_path_factory.mktemp("http_logs")
    started = []
    try:
        started.append(_start(root / "server", logs / "main.log"))
        started.append(
            _start(root / "server", logs / "small.log", "--max-body-bytes", str(SMALL_LIMIT))
        )
        yield started[0][1], started[1][1]
    finally:
        for proc, _ in started:
            _stop(proc)


@pytest.fixture(scope="module")
def sessions(artifact, servers, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """N_CLIENTS clients with their own keys, run concurrently against the server."""
    root, _, x = artifact
    url = servers[0]
    key_root = tmp_path_factory.mktemp("http_keys")

    def session(i: int) -> dict[str, Any]:
        client = FHEModelClient(root / "client", key_dir=key_root / f"keys_{i}")
        api = Client(url, timeout=TIMEOUT)
        client_id = f"client-{i}"
        api.upload_keys(client_id, client.get_serialized_evaluation_keys())
        ciphertext = client.quantize_encrypt_serialize(x[i : i + 1])[0]
        reply = api.predict(client_id, ciphertext)
        return {
            "id": client_id,
            "client": client,
            "ciphertext": ciphertext,
            "answer": client.deserialize_decrypt([reply]),
            "float": client.deserialize_decrypt_dequantize([reply]),
        }

    with ThreadPoolExecutor(max_workers=N_CLIENTS) as pool:
        return list(pool.map(session, range(N_CLIENTS)))


def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    return raw_request(url, method, path, headers, body, TIMEOUT)


def _assert_alive(url: str, clients: int | None = None) -> None:
    health = Client(url, timeout=TIMEOUT).health()
    assert health["status"] == "ok"
    if clients is not None:
        assert health["clients"] == clients


def _refused(url: str, status: int, call, *args) -> str:
    with pytest.raises(HTTPRequestError) as info:
        call(*args)
    assert info.value.status == status, info.value
    assert info.value.message
    _assert_alive(url)
    return info.value.message


def test_health_before_any_client(servers) -> None:
    _assert_alive(servers[1], clients=0)
    status, body = _raw(servers[0], "GET", "/health", {})
    assert status == 200 and body["status"] == "ok"


def test_concurrent_clients_get_their_own_correct_answers(artifact, servers, sessions) -> None:
    _, qm, x = artifact
    assert len({s["client"].get_serialized_evaluation_keys() for s in sessions}) == N_CLIENTS
    for i, s in enumerate(sessions):
        expected = qm.forward_integers(x[i : i + 1], fhe="disable")
        np.testing.assert_array_equal(s["answer"], expected)
        np.testing.assert_allclose(s["float"], qm.forward(x[i : i + 1]))
    _assert_alive(servers[0], clients=N_CLIENTS)


def test_malformed_predictions_are_refused(servers, sessions) -> None:
    api = Client(servers[0], timeout=TIMEOUT)
    a, b = sessions[0], sessions[1]
    message = _refused(servers[0], 400, api.predict, a["id"], b"not a ciphertext")
    assert "not an fhe_quant message" in message
    message = _refused(servers[0], 400, api.predict, b["id"], a["ciphertext"])
    assert "other keys" in message
    corrupted = a["ciphertext"][:60] + b"\x00" * 40
    _refused(servers[0], 400, api.predict, a["id"], corrupted)
    message = _refused(servers[0], 404, api.predict, "nobody", a["ciphertext"])
    assert "nobody" in message
    _refused(servers[0], 400, api.predict, "bad.id", a["ciphertext"])
    _refused(servers[0], 400, api.upload_keys, "x" * 65, b"keys")
    _refused(servers[0], 404, Client(servers[0] + "/nowhere", timeout=TIMEOUT).health)


def test_bad_keys_are_refused_and_do_not_replace_good_ones(servers, sessions) -> None:
    api = Client(servers[0], timeout=TIMEOUT)
    a = sessions[0]
    _refused(servers[0], 400, api.upload_keys, a["id"], b"garbage keys")
    reply = api.predict(a["id"], a["ciphertext"])
    np.testing.assert_array_equal(a["client"].deserialize_decrypt([reply]), a["answer"])
    # Well-framed keys with a broken payload: refused when used, with a message.
    api.upload_keys("broken", b"FHQ1" + b"\x00" * 100)
    _refused(servers[0], 400, api.predict, "broken", a["ciphertext"])


def test_bad_headers_and_methods(servers) -> None:
    url = servers[0]
    path = "/clients/client-0/predict"
    status, body = _raw(url, "POST", path, {})
    assert status == 411 and body["error"]
    _assert_alive(url)
    status, body = _raw(url, "POST", path, {"Content-Length": "ten"})
    assert status == 400 and "Content-Length" in body["error"]
    _assert_alive(url)
    status, body = _raw(url, "POST", path, {"Content-Length": "0"})
    assert status == 400 and body["error"]
    _assert_alive(url)
    status, body = _raw(url, "GET", path, {})
    assert status == 405 and body["error"]
    _assert_alive(url)


def test_oversized_bodies_are_refused_unread(servers, sessions) -> None:
    url = servers[1]
    api = Client(url, timeout=TIMEOUT)
    # Real keys (~100 MB) would be cut off mid-send: the server reads none of the body.
    keys = sessions[0]["client"].get_serialized_evaluation_keys()[: 4 * SMALL_LIMIT]
    message = _refused(url, 413, api.upload_keys, "client-0", keys)
    assert str(SMALL_LIMIT) in message
    # A huge announced length is refused from the header alone, before any body is sent.
    status, body = _raw(url, "PUT", "/clients/c/keys", {"Content-Length": str(1 << 40)})
    assert status == 413 and body["error"]
    _assert_alive(url, clients=0)


def test_an_unread_body_closes_the_connection(servers) -> None:
    # The body of a refused request is not read: it must not be parsed as a next request.
    parts = urlsplit(servers[0])
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=TIMEOUT)
    try:
        smuggled = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        conn.request("PUT", "/clients/bad.id/keys", body=smuggled)
        response = conn.getresponse()
        assert response.status == 400 and json.loads(response.read())["error"]
        assert response.getheader("Connection") == "close"
    finally:
        conn.close()
    _assert_alive(servers[0])
