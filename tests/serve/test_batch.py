"""Batches on a real dask.distributed LocalCluster: results in input order, keys sent
once per worker, a worker killed mid-batch, and bad batches refused before any work."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from fhe_quant.batch import (
    ServerArtifact,
    check_batch,
    local_cluster,
    run_batch,
    worker_statistics,
)
from fhe_quant.deploy import FHEModelServer
from fhe_quant.errors import DeploymentError

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def dask_client() -> Iterator[Any]:
    cluster, client = local_cluster(2)
    try:
        yield client
    finally:
        client.close()
        cluster.close()


def _expected(served: dict[str, Any], rows: slice) -> np.ndarray:
    return served["qm"].forward_integers(served["x"][rows], fhe="disable")


def test_bad_batches_are_refused_before_any_work(served, other_model) -> None:
    client, other = served["client"], other_model["client"]
    keys = client.get_serialized_evaluation_keys()
    good = client.quantize_encrypt_serialize(served["x"][:2])
    with pytest.raises(DeploymentError, match="empty"):
        check_batch([], keys)
    with pytest.raises(DeploymentError, match="key message"):
        check_batch(good, b"random bytes")
    with pytest.raises(DeploymentError, match=r"Sample 1 .* not an fhe_quant ciphertext"):
        check_batch([good[0], os.urandom(300)], keys)
    foreign = other.quantize_encrypt_serialize(other_model["x"][:1])[0]
    with pytest.raises(DeploymentError, match=r"Sample 2 .* other keys"):
        check_batch([*good, foreign], keys)
    # A ciphertext of another shape, sealed under these keys: refused on its size.
    mixed = [*good, good[0][:36] + foreign[36:] + b"\0" * 7]
    with pytest.raises(DeploymentError, match="mixes ciphertexts of different shapes"):
        check_batch(mixed, keys)
    assert check_batch(good, keys) == client.key_id


def test_server_artifact_is_data_with_a_digest(served, tmp_path) -> None:
    artifact = ServerArtifact.from_directory(served["root"] / "server")
    assert artifact.size > 0 and len(artifact.digest) == 64
    copy = ServerArtifact.from_directory(artifact.write(tmp_path / "copy"))
    assert copy.digest == artifact.digest
    changed = ServerArtifact(((artifact.files[0][0], artifact.files[0][1] + b"x"),))
    assert changed.digest != artifact.digest
    with pytest.raises(ValueError, match="relative"):
        ServerArtifact((("/etc/passwd", b""),))


@pytest.mark.slow
@pytest.mark.execute
def test_batch_answers_in_order_and_keys_reach_each_worker_once(served, dask_client) -> None:
    client = served["client"]
    server = FHEModelServer(served["root"] / "server")
    keys = client.get_serialized_evaluation_keys()
    ciphertexts = client.quantize_encrypt_serialize(served["x"][:6])
    first = server.run_batch(ciphertexts[:4], keys, client=dask_client)
    second = run_batch(server, ciphertexts[2:], keys, client=dask_client)
    np.testing.assert_array_equal(client.deserialize_decrypt(first), _expected(served, slice(0, 4)))
    np.testing.assert_array_equal(
        client.deserialize_decrypt(second), _expected(served, slice(2, 6))
    )
    stats = worker_statistics(dask_client)
    assert sum(s["runs"] for s in stats.values()) == 8
    for s in stats.values():
        assert s["received"].get("keys:" + client.key_id.hex(), 0) <= 1
        assert all(count == 1 for count in s["received"].values())
    corrupted = ciphertexts[1][:60] + bytes(len(ciphertexts[1]) - 60)
    with pytest.raises(DeploymentError, match="Sample 1 of the batch"):
        server.run_batch([ciphertexts[0], corrupted], keys, dask_client)


@pytest.mark.slow
@pytest.mark.execute
def test_a_worker_killed_mid_batch_still_answers_every_sample_once(served, dask_client) -> None:
    client = served["client"]
    server = FHEModelServer(served["root"] / "server")
    keys = client.get_serialized_evaluation_keys()
    n = 10
    ciphertexts = client.quantize_encrypt_serialize(served["x"][:n])
    before = sum(s["runs"] for s in worker_statistics(dask_client).values())
    pids = [s["pid"] for s in worker_statistics(dask_client).values()]
    killed = threading.Event()

    def kill_one() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            runs = sum(s["runs"] for s in worker_statistics(dask_client).values()) - before
            if runs >= 2:
                os.kill(pids[0], signal.SIGKILL)
                killed.set()
                return
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one)
    killer.start()
    results = server.run_batch(ciphertexts, keys, client=dask_client)
    killer.join()
    assert killed.is_set(), "the batch finished before a worker could be killed"
    assert len(results) == n
    np.testing.assert_array_equal(
        client.deserialize_decrypt(results), _expected(served, slice(0, n))
    )
    dask_client.wait_for_workers(2, timeout=60)
