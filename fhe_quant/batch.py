"""Batches of encrypted samples on a ``dask.distributed`` cluster.

:func:`run_batch` (also :meth:`fhe_quant.deploy.FHEModelServer.run_batch`) fans the
samples of one client out over the workers of a cluster, one task per sample, and
returns the results in input order. Concrete objects do not pickle, so everything
travels as bytes: the server artifact as the files of its directory
(:class:`ServerArtifact`), the evaluation keys as the client's key message, each
ciphertext as its envelope. Each worker process keeps what it loaded (the
:class:`~fhe_quant.deploy.FHEModelServer` of an artifact, a client's keys, deserialized
and expanded on first use) in a small cache keyed by digest, so the artifact and a
client's keys reach a worker once, not once per sample: on the driver side they are
scattered to the cluster once (``broadcast=True``) and the futures kept, keyed by digest,
for the batches that follow.

Faults: a worker that dies mid-batch (killed, out of memory, or aborted by Concrete) is
replaced by its nanny and Dask reschedules its tasks on the workers left; the copies of
the artifact and keys broadcast to the other workers keep them reachable. Every sample
is answered exactly once, in order. A batch is checked before any work starts: equal
ciphertext sizes (one shape), every envelope naming these keys.

The embedded cluster (``client=None``) is a :class:`distributed.LocalCluster` with one
worker process per core, one thread each, and ``OMP_NUM_THREADS=1`` set in each worker's
environment, so that workers do not fight for cores; it is started on first use and
closed at exit. Pass a :class:`distributed.Client` (or a scheduler address, see
:func:`connect`) for a real cluster. The cluster's members must trust each other: Dask's
own protocol pickles task arguments; what fhe_quant sends over it is bytes only.

Examples:
    >>> check_batch([b"x"], b"not keys")
    Traceback (most recent call last):
    ...
    fhe_quant.errors.DeploymentError: The evaluation keys are not an fhe_quant key message.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import threading
import weakref
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fhe_quant.deploy.artifact import MESSAGE_MAGIC, FHEModelServer, is_fhe_quant_message
from fhe_quant.errors import DeploymentError, ParameterError

__all__ = [
    "ServerArtifact",
    "check_batch",
    "connect",
    "embedded_client",
    "local_cluster",
    "run_batch",
    "worker_statistics",
    "forget_keys",
]

_DIGEST = 32
#: Deserialized keys and artifacts kept per worker process (the most recently used).
WORKER_CACHE_ENTRIES = 4
#: Scattered key messages kept referenced on the driver (one per client and cluster).
DRIVER_SCATTERED_KEYS = 16


@dataclass(frozen=True)
class ServerArtifact:
    """A server directory as data: its files' relative paths and bytes, and their digest.

    Attributes:
        files: ``(relative path, bytes)`` of every file, sorted by path.
        digest: SHA-256 (hex) over the paths and contents; names the artifact.

    Examples:
        >>> art = ServerArtifact((("a.json", b"{}"),))
        >>> len(art.digest), art.size
        (64, 2)
        >>> ServerArtifact((("../x", b""),))
        Traceback (most recent call last):
        ...
        ValueError: ServerArtifact file path '../x' must be relative, without '..'.
    """

    files: tuple[tuple[str, bytes], ...]
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        for name, data in self.files:
            parts = Path(name).parts
            if not parts or Path(name).is_absolute() or ".." in parts:
                raise ValueError(
                    f"ServerArtifact file path {name!r} must be relative, without '..'."
                )
            if not isinstance(data, bytes):
                raise ValueError(f"ServerArtifact file {name!r} must be bytes.")
        sha = hashlib.sha256()
        for name, data in sorted(self.files):
            sha.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
        object.__setattr__(self, "files", tuple(sorted(self.files)))
        object.__setattr__(self, "digest", sha.hexdigest())

    @property
    def size(self) -> int:
        """Total bytes of the files."""
        return sum(len(data) for _, data in self.files)

    @classmethod
    def from_directory(cls, path: str | Path) -> ServerArtifact:
        """Read every file under ``path`` (a ``server`` directory)."""
        root = Path(path)
        files = [
            (f.relative_to(root).as_posix(), f.read_bytes())
            for f in sorted(root.rglob("*"))
            if f.is_file()
        ]
        return cls(tuple(files))

    def write(self, directory: str | Path) -> Path:
        """Write the files under ``directory``; returns it."""
        root = Path(directory)
        for name, data in self.files:
            target = root / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return root


_ARTIFACTS: weakref.WeakKeyDictionary[FHEModelServer, ServerArtifact] = weakref.WeakKeyDictionary()


def _artifact_of(server: FHEModelServer) -> ServerArtifact:
    """The artifact of ``server``'s directory, read once per server object."""
    artifact = _ARTIFACTS.get(server)
    if artifact is None:
        artifact = _ARTIFACTS[server] = ServerArtifact.from_directory(server.path)
    return artifact


def check_batch(ciphertexts: Sequence[bytes], keys: bytes, key_id: bytes | None = None) -> bytes:
    """Refuse a batch that cannot be right, before any work; returns the key id
    (``key_id``, when the caller knows the SHA-256 of ``keys`` already).

    Raises:
        DeploymentError: not a key message; an empty batch; a sample that is not an
            fhe_quant ciphertext or was made under other keys; samples of different sizes
            (a ciphertext's size is fixed by the model's input shape).
    """
    if not is_fhe_quant_message(keys):
        raise DeploymentError("The evaluation keys are not an fhe_quant key message.")
    if len(ciphertexts) == 0:
        raise DeploymentError("The batch is empty: send at least one ciphertext.")
    key_id = key_id or hashlib.sha256(keys).digest()
    head = len(MESSAGE_MAGIC)
    for i, message in enumerate(ciphertexts):
        if not is_fhe_quant_message(message) or len(message) <= head + _DIGEST:
            raise DeploymentError(f"Sample {i} of the batch is not an fhe_quant ciphertext.")
        if message[head : head + _DIGEST] != key_id:
            raise DeploymentError(
                f"Sample {i} of the batch was encrypted under other keys than the evaluation "
                "keys given: each client must send its own evaluation keys with its ciphertexts."
            )
    sizes = Counter(len(m) for m in ciphertexts)
    if len(sizes) > 1:
        first = len(ciphertexts[0])
        odd = next(i for i, m in enumerate(ciphertexts) if len(m) != first)
        raise DeploymentError(
            f"The batch mixes ciphertexts of different shapes: sample 0 has {first} bytes, "
            f"sample {odd} has {len(ciphertexts[odd])}. Send samples of one model's input "
            "shape, one sample per ciphertext."
        )
    return key_id


# ------------------------------------------------------------------ worker side


class _WorkerState:
    """What one worker process holds: loaded servers and key messages (LRU), counters."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.servers: OrderedDict[str, tuple[FHEModelServer, str]] = OrderedDict()
        self.keys: OrderedDict[bytes, bytes] = OrderedDict()
        self.received: Counter[str] = Counter()
        self.received_bytes: Counter[str] = Counter()
        self.runs = 0

    def server(self, artifact: ServerArtifact) -> FHEModelServer:
        with self.lock:
            entry = self.servers.get(artifact.digest)
            if entry is not None:
                self.servers.move_to_end(artifact.digest)
                return entry[0]
            directory = tempfile.mkdtemp(prefix="fhe_quant_server_")
            server = FHEModelServer(artifact.write(directory), key_cache_size=WORKER_CACHE_ENTRIES)
            self.servers[artifact.digest] = (server, directory)
            self.received["server:" + artifact.digest] += 1
            self.received_bytes["server"] += artifact.size
            while len(self.servers) > WORKER_CACHE_ENTRIES:
                _, (_, old) = self.servers.popitem(last=False)
                shutil.rmtree(old, ignore_errors=True)
            return server

    def key_message(self, key_id: bytes, message: bytes) -> bytes:
        """The one object kept for ``key_id``: the server's key cache is keyed by it."""
        with self.lock:
            kept = self.keys.get(key_id)
            if kept is not None:
                self.keys.move_to_end(key_id)
                if kept is not message:  # the same keys, transferred once more
                    self.received["keys:" + key_id.hex()] += 1
                    self.received_bytes["keys"] += len(message)
                return kept
            self.keys[key_id] = message
            self.received["keys:" + key_id.hex()] += 1
            self.received_bytes["keys"] += len(message)
            while len(self.keys) > WORKER_CACHE_ENTRIES:
                self.keys.popitem(last=False)
            return message


_STATE = _WorkerState()


def _run_sample(
    ciphertext: bytes, index: int, *, artifact: ServerArtifact, keys: bytes, key_id: bytes
) -> bytes:
    """One sample, on a worker."""
    server = _STATE.server(artifact)
    message = _STATE.key_message(key_id, keys)
    try:
        result = server.run(ciphertext, message)
    except DeploymentError as exc:
        raise DeploymentError(f"Sample {index} of the batch: {exc}") from None
    with _STATE.lock:
        _STATE.runs += 1
    return result


def _worker_report() -> dict[str, Any]:
    with _STATE.lock:
        return {
            "pid": os.getpid(),
            "runs": _STATE.runs,
            "received": dict(_STATE.received),
            "received_bytes": dict(_STATE.received_bytes),
        }


def worker_statistics(client: Any = None) -> dict[str, dict[str, Any]]:
    """Per worker address: its pid, samples run, and how many times (and bytes) it
    received each artifact (``server:<digest>``) and client's keys (``keys:<key id>``)."""
    return (client or embedded_client()).run(_worker_report)


# ------------------------------------------------------------------ driver side

_EMBEDDED: dict[str, Any] = {}
_EMBEDDED_LOCK = threading.Lock()


def embedded_client(n_workers: int | None = None) -> Any:
    """The process's embedded cluster's client, started on first use (one worker process
    per core unless ``n_workers``; one thread each; ``OMP_NUM_THREADS=1``)."""
    with _EMBEDDED_LOCK:
        client = _EMBEDDED.get("client")
        if client is not None and client.status == "running":
            return client
        cluster, client = local_cluster(n_workers or os.cpu_count() or 1)
        _EMBEDDED.update(cluster=cluster, client=client)
        return client


def local_cluster(n_workers: int) -> tuple[Any, Any]:
    """A new :class:`distributed.LocalCluster` of ``n_workers`` processes, one thread
    and ``OMP_NUM_THREADS=1`` each, and its client (close both when done)."""
    from distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=n_workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",  # NOTE: a free port: 8787 may be taken by another cluster
        env={"OMP_NUM_THREADS": "1"},
    )
    return cluster, Client(cluster)


@atexit.register
def _close_embedded() -> None:
    with _EMBEDDED_LOCK:
        client, cluster = _EMBEDDED.pop("client", None), _EMBEDDED.pop("cluster", None)
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()


def connect(address: str | None, n_workers: int | None = None) -> Any:
    """A :class:`distributed.Client` for a scheduler address (``tcp://host:8786``), or the
    embedded cluster's for ``None``."""
    if address is None:
        return embedded_client(n_workers)
    from distributed import Client

    try:
        return Client(address, timeout="30s")
    except (OSError, TimeoutError) as exc:
        raise ParameterError(f"Cannot reach the Dask scheduler at {address!r}: {exc}") from None


_SCATTERED: OrderedDict[tuple[str, str], Any] = OrderedDict()
_SCATTERED_LOCK = threading.Lock()


def _scattered(client: Any, name: str, data: Any) -> Any:
    """The future of ``data`` on ``client``'s cluster, broadcast to every worker once."""
    key = (client.id, name)
    with _SCATTERED_LOCK:
        future = _SCATTERED.get(key)
        if future is not None and future.status == "finished":
            _SCATTERED.move_to_end(key)
            return future
    client.wait_for_workers(1)
    future = client.scatter(data, broadcast=True, hash=False)
    with _SCATTERED_LOCK:
        _SCATTERED[key] = future
        keys = [k for k in _SCATTERED if k[1].startswith("keys:")]
        for old in keys[: max(0, len(keys) - DRIVER_SCATTERED_KEYS)]:
            del _SCATTERED[old]
    return future


def forget_keys(key_id: bytes) -> None:
    """Release the cluster's copies of a client's keys (on every client of this process)."""
    with _SCATTERED_LOCK:
        for key in [k for k in _SCATTERED if k[1] == "keys:" + key_id.hex()]:
            del _SCATTERED[key]


def run_batch(
    server: FHEModelServer,
    ciphertexts: Sequence[bytes],
    keys: bytes,
    client: Any = None,
    *,
    key_id: bytes | None = None,
) -> list[bytes]:
    """Run ``server``'s circuit on every ciphertext of a batch, on a Dask cluster.

    Args:
        server: the model's server (its directory is what the workers load).
        ciphertexts: one client's serialized encrypted samples.
        keys: that client's evaluation-key message.
        client: a :class:`distributed.Client`, or ``None`` for the embedded cluster.
        key_id: the SHA-256 of ``keys`` if known (a key store keeps it): saves hashing
            hundreds of MB per call.

    Returns:
        The serialized encrypted results, in the order of ``ciphertexts``.

    Raises:
        DeploymentError: the batch fails :func:`check_batch` (nothing runs), or a sample
            cannot be run (the rest of the batch is cancelled).
    """
    ciphertexts = list(ciphertexts)
    key_id = check_batch(ciphertexts, keys, key_id)
    dask_client = client if client is not None else embedded_client()
    artifact = _artifact_of(server)
    artifact_future = _scattered(dask_client, "server:" + artifact.digest, artifact)
    keys_future = _scattered(dask_client, "keys:" + key_id.hex(), keys)
    futures = dask_client.map(
        _run_sample,
        ciphertexts,
        range(len(ciphertexts)),
        artifact=artifact_future,
        keys=keys_future,
        key_id=key_id,
        pure=False,
    )
    try:
        return list(dask_client.gather(futures))
    except DeploymentError:
        dask_client.cancel(futures)
        raise
    except Exception as exc:
        dask_client.cancel(futures)
        if type(exc).__name__ == "KilledWorker":
            raise DeploymentError(
                "A sample of the batch killed every worker that ran it: the evaluation keys "
                "most likely do not fit this model's circuit (keys of another model)."
            ) from None
        raise
