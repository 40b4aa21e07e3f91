"""The FastAPI service as users run it: ``fhe-quant serve`` in its own process on
127.0.0.1 with a real LocalCluster, a key store on disk and a small key-memory budget.
Correct answers; tokens; bad keys, ciphertexts and batches refused by name; limits
(413 from the header, 429); slow clients; LRU eviction; a kill and restart."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import pytest
from shared_helpers import raw_request, start_server, stop_server

from fhe_quant.deploy import FHEModelClient
from fhe_quant.service_client import (
    CIRCUIT_HEADER,
    ServiceClient,
    ServiceError,
    circuit_id,
    pack,
)

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.execute]
TIMEOUT = 300.0
#: Fits one client's keys of the 2-bit test model (~21 MB), not two.
KEY_MEMORY = "30MB"
MAX_CONCURRENT = 2


def _start(server_dir: Path, store: Path, log: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "fhe_quant.cli", "serve", str(server_dir), "--port", "0"]
    command += ["--key-store", str(store), "--key-memory", KEY_MEMORY, "--workers", "1"]
    command += ["--max-concurrent", str(MAX_CONCURRENT), "--max-body-bytes", "64MiB"]
    return start_server(command, log, TIMEOUT, append=True, kill_wait=30)


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    stop_server(proc, sig, wait=60, kill_wait=30)


@pytest.fixture(scope="module")
def service(served, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A mutable holder: the running process, its URL, its key store."""
    root = tmp_path_factory.mktemp("service")
    state: dict[str, Any] = {"store": root / "keys", "log": root / "serve.log"}
    state["proc"], state["url"] = _start(served["root"] / "server", state["store"], state["log"])
    try:
        yield state
    finally:
        _stop(state["proc"])


@pytest.fixture(scope="module")
def alice(served, service) -> dict[str, Any]:
    client = served["client"]
    api = ServiceClient(service["url"], timeout=TIMEOUT)
    token = api.upload_keys("alice", client.get_serialized_evaluation_keys(), circuit_id(client))
    return {"api": api, "token": token, "client": client}


def _raw(url: str, method: str, path: str, headers: dict[str, str], body: bytes = b""):
    return raw_request(url, method, path, headers, body, TIMEOUT)


def _refused(status: int, call: Any, *args: Any) -> str:
    with pytest.raises(ServiceError) as info:
        call(*args)
    assert info.value.status == status, info.value
    return info.value.message


def _expected(served: dict[str, Any], rows: slice) -> np.ndarray:
    return served["qm"].forward_integers(served["x"][rows], fhe="disable")


def test_health_and_openapi(service) -> None:
    assert ServiceClient(service["url"]).health()["status"] == "ok"
    status, schema = _raw(service["url"], "GET", "/openapi.json", {})
    assert status == 200
    assert "/clients/{client_id}/predict_batch" in schema["paths"]


def test_predict_and_batch_answer_exactly(served, alice) -> None:
    api, client = alice["api"], alice["client"]
    ciphertexts = client.quantize_encrypt_serialize(served["x"][:3])
    one = client.deserialize_decrypt([api.predict("alice", ciphertexts[0])])
    np.testing.assert_array_equal(one, _expected(served, slice(0, 1)))
    batch = client.deserialize_decrypt(api.predict_batch("alice", ciphertexts))
    np.testing.assert_array_equal(batch, _expected(served, slice(0, 3)))


def test_tokens_are_required_and_checked(served, service, alice) -> None:
    client = alice["client"]
    ciphertext = client.quantize_encrypt_serialize(served["x"][:1])[0]
    keys, circuit = client.get_serialized_evaluation_keys(), circuit_id(client)
    anonymous = ServiceClient(service["url"], timeout=TIMEOUT)
    assert "Bearer" in _refused(401, anonymous.predict, "alice", ciphertext)
    _refused(401, anonymous.upload_keys, "alice", keys, circuit)  # no overwriting
    wrong = ServiceClient(service["url"], timeout=TIMEOUT, token="not-the-token")
    assert "Wrong token" in _refused(403, wrong.predict_batch, "alice", [ciphertext])
    _refused(403, wrong.upload_keys, "alice", keys, circuit)
    assert "Unknown client" in _refused(404, wrong.predict, "nobody", ciphertext)
    reply = alice["api"].predict("alice", ciphertext)  # alice's keys are untouched
    np.testing.assert_array_equal(client.deserialize_decrypt([reply]), _expected(served, slice(1)))


def test_bad_keys_ciphertexts_and_batches_are_named(served, other_model, service, alice) -> None:
    api, client = alice["api"], alice["client"]
    other = other_model["client"]
    fresh = ServiceClient(service["url"], timeout=TIMEOUT)
    other_keys = other.get_serialized_evaluation_keys()
    message = _refused(400, fresh.upload_keys, "mallory", other_keys, circuit_id(other))
    assert "another circuit" in message
    status, body = _raw(
        service["url"], "PUT", "/clients/mallory/keys", {"Content-Length": "4"}, b"FHQ1"
    )
    assert status == 400 and CIRCUIT_HEADER in body["error"]
    message = _refused(400, fresh.upload_keys, "mallory", os.urandom(64), circuit_id(client))
    assert "not an fhe_quant evaluation-key message" in message
    good = client.quantize_encrypt_serialize(served["x"][:2])
    foreign = other.quantize_encrypt_serialize(other_model["x"][:1])[0]
    assert "other keys" in _refused(400, api.predict, "alice", foreign)
    assert "not an fhe_quant" in _refused(400, api.predict, "alice", os.urandom(200))
    mixed = [*good, good[0][:36] + foreign[36:] + bytes(9)]
    assert "mixes ciphertexts" in _refused(400, api.predict_batch, "alice", mixed)
    status, body = _raw(
        service["url"],
        "POST",
        "/clients/alice/predict_batch",
        {"Authorization": f"Bearer {api.token}", "Content-Length": "12"},
        pack(good)[:12],
    )
    assert status == 400 and "truncated" in body["error"]
    assert ServiceClient(service["url"]).health()["busy"] == 0


def test_body_limits_are_read_from_the_header(service) -> None:
    status, body = _raw(service["url"], "PUT", "/clients/x/keys", {"Content-Length": str(1 << 40)})
    assert status == 413 and "over the limit" in body["error"]
    status, body = _raw(service["url"], "POST", "/clients/x/predict", {})
    assert status == 411 and body["error"]
    status, _ = _raw(service["url"], "GET", "/health", {})
    assert status == 200


def test_slow_clients_and_a_full_service(served, service, alice) -> None:
    parts = urlsplit(service["url"])
    slow = []
    for _ in range(50):  # connections that send half a request and wait
        sock = socket.create_connection((parts.hostname, parts.port), timeout=TIMEOUT)
        sock.sendall(b"POST /clients/alice/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\n")
        slow.append(sock)
    try:
        api, client = alice["api"], alice["client"]
        ciphertexts = client.quantize_encrypt_serialize(served["x"][:4])

        def batch(_: int) -> Any:
            try:
                return api.predict_batch("alice", ciphertexts)
            except ServiceError as exc:
                return exc

        with ThreadPoolExecutor(max_workers=6) as pool:
            futures = [pool.submit(batch, i) for i in range(6)]
            latencies = []
            while not all(f.done() for f in futures):
                start = time.perf_counter()
                assert ServiceClient(service["url"], timeout=10).health()["status"] == "ok"
                latencies.append(time.perf_counter() - start)
                time.sleep(0.05)
        answers = [f.result() for f in futures]
    finally:
        for sock in slow:
            sock.close()
    refused = [a for a in answers if isinstance(a, ServiceError)]
    assert refused and all(a.status == 429 for a in refused)
    done = [a for a in answers if not isinstance(a, ServiceError)]
    assert done
    for results in done:
        np.testing.assert_array_equal(
            client.deserialize_decrypt(results), _expected(served, slice(0, 4))
        )
    assert max(latencies) < 5.0, latencies  # /health is not queued behind the FHE work


def test_key_memory_budget_evicts_to_disk(served, service, alice, tmp_path) -> None:
    bob = FHEModelClient(served["root"] / "client", key_dir=tmp_path / "bob")
    api = ServiceClient(service["url"], timeout=TIMEOUT)
    api.upload_keys("bob", bob.get_serialized_evaluation_keys(), circuit_id(bob))
    health = api.health()
    assert health["clients"] == 2 and health["keys_in_memory"] == 1
    ciphertext = alice["client"].quantize_encrypt_serialize(served["x"][5:6])[0]
    reply = alice["api"].predict("alice", ciphertext)  # read back from disk
    np.testing.assert_array_equal(
        alice["client"].deserialize_decrypt([reply]), _expected(served, slice(5, 6))
    )
    assert len(list(service["store"].glob("*.keys"))) == 2


def test_killed_and_restarted_service_keeps_keys_and_answers(served, service, alice) -> None:
    client = alice["client"]
    ciphertexts = client.quantize_encrypt_serialize(served["x"][6:9])
    before = client.deserialize_decrypt(alice["api"].predict_batch("alice", ciphertexts))
    _stop(service["proc"], signal.SIGKILL)
    service["proc"], service["url"] = _start(
        served["root"] / "server", service["store"], service["log"]
    )
    api = ServiceClient(service["url"], timeout=TIMEOUT, token=alice["token"])
    assert api.health()["clients"] >= 1
    after = client.deserialize_decrypt(api.predict_batch("alice", ciphertexts))
    np.testing.assert_array_equal(after, before)
    np.testing.assert_array_equal(after, _expected(served, slice(6, 9)))
