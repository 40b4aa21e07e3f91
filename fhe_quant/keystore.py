"""Clients' evaluation keys on disk, with the most recently used ones in memory.

A :class:`KeyStore` keeps, per client, two files in its directory: the key message
(``<client>.<key id>.keys``, one file per client and key id) and a record
(``<client>.json``: the current key id, the circuit the keys are for, and the SHA-256 of
the client's bearer token; the token itself is never stored). Every file is written
atomically (a temporary file in the same directory, ``fsync``, then ``os.replace``) with
mode ``0600``, so a crash leaves the old keys or the new ones, never half of them, and
the store survives a restart. In memory, an LRU holds key messages up to a byte budget:
evicted keys leave memory, not disk, and are read back on next use.

Examples:
    >>> import tempfile
    >>> store = KeyStore(tempfile.mkdtemp(), memory_budget=parse_size("1KB"))
    >>> token = store.put("alice", b"FHQ1" + bytes(600), circuit="c0")
    >>> store.check_token("alice", token), store.check_token("alice", "guess")
    (True, False)
    >>> _ = store.put("bob", b"FHQ1" + bytes(600), circuit="c0")
    >>> store.in_memory(), store.clients()
    (['bob'], ['alice', 'bob'])
    >>> len(store.get("alice").message), store.in_memory()
    (604, ['alice'])
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fhe_quant.errors import DeploymentError, ParameterError

__all__ = ["CLIENT_ID_PATTERN", "StoredKeys", "KeyStore", "parse_size"]

#: What a client id must match (it names files in the store).
CLIENT_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(text: str | int) -> int:
    """Bytes of a size such as ``"4GB"``, ``"512MiB"`` or ``1000``.

    Examples:
        >>> parse_size("4GB"), parse_size("1.5 MiB"), parse_size(7)
        (4000000000, 1572864, 7)
        >>> parse_size("lots")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: A size must look like '4GB', ...; got 'lots'.
    """
    if isinstance(text, int) and not isinstance(text, bool) and text >= 0:
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if match is None or unit not in _UNITS:
        raise ParameterError(f"A size must look like '4GB', '512MiB' or '1000'; got {text!r}.")
    return int(float(match.group(1)) * _UNITS[unit])


def _hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600, all or nothing."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass(frozen=True)
class StoredKeys:
    """One client's current keys.

    Attributes:
        message: the evaluation-key message, as the client sent it.
        key_id: its SHA-256 (the id its ciphertexts' envelopes name).
        circuit: the circuit id the client declared with them.
    """

    message: bytes
    key_id: bytes
    circuit: str

    def __post_init__(self) -> None:
        if hashlib.sha256(self.message).digest() != self.key_id:
            raise ValueError("StoredKeys.key_id must be the SHA-256 of the message.")


class KeyStore:
    """Evaluation keys on disk (one file per client and key id), an LRU in memory.

    Args:
        directory: where the files live (created, mode 0700, if missing).
        memory_budget: bytes of key messages kept in memory (the most recently used).
        on_evict: called with the key id of keys that leave memory or are replaced.

    Thread-safe.
    """

    def __init__(
        self,
        directory: str | Path,
        memory_budget: int = 4 * 10**9,
        on_evict: Callable[[bytes], None] | None = None,
    ) -> None:
        if memory_budget < 0:
            raise ParameterError(f"The key memory budget must be >= 0; got {memory_budget}.")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.memory_budget = memory_budget
        self.on_evict = on_evict
        self._memory: OrderedDict[str, StoredKeys] = OrderedDict()
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ files
    @staticmethod
    def check_client_id(client_id: str) -> str:
        if CLIENT_ID_PATTERN.fullmatch(client_id) is None:
            raise ParameterError(
                f"Invalid client id {client_id[:80]!r}: it must match [A-Za-z0-9_-]{{1,64}}."
            )
        return client_id

    def _record_path(self, client_id: str) -> Path:
        return self.directory / f"{self.check_client_id(client_id)}.json"

    def _record(self, client_id: str) -> dict[str, str] | None:
        path = self._record_path(client_id)
        if not path.is_file():
            return None
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise DeploymentError(f"The key store record {path} cannot be read: {exc}") from None
        if not isinstance(record, dict) or not {"key_id", "circuit", "token_sha256"} <= set(record):
            raise DeploymentError(f"The key store record {path} is incomplete.")
        return record

    def clients(self) -> list[str]:
        """The ids of every client with keys on disk, sorted."""
        return sorted(p.stem for p in self.directory.glob("*.json") if not p.stem.startswith("."))

    def has(self, client_id: str) -> bool:
        return self._record(client_id) is not None

    def check_token(self, client_id: str, token: str) -> bool:
        """Whether ``token`` is the client's current bearer token (constant time)."""
        record = self._record(client_id)
        return record is not None and hmac.compare_digest(
            record["token_sha256"], _hash_token(token)
        )

    def put(self, client_id: str, message: bytes, circuit: str) -> str:
        """Store (or replace) a client's keys; returns its new bearer token."""
        self.check_client_id(client_id)
        keys = StoredKeys(message, hashlib.sha256(message).digest(), circuit)
        token = secrets.token_urlsafe(32)
        with self._lock:
            old = self._record(client_id)
            key_file = self.directory / f"{client_id}.{keys.key_id.hex()}.keys"
            _write_atomic(key_file, message)
            record = {"key_id": keys.key_id.hex(), "circuit": circuit}
            record["token_sha256"] = _hash_token(token)
            _write_atomic(self._record_path(client_id), json.dumps(record).encode())
            if old is not None and old["key_id"] != record["key_id"]:
                (self.directory / f"{client_id}.{old['key_id']}.keys").unlink(missing_ok=True)
                self._evicted(bytes.fromhex(old["key_id"]))
            self._memory.pop(client_id, None)
            self._remember(client_id, keys)
        return token

    def get(self, client_id: str) -> StoredKeys:
        """A client's keys (from memory, else read from disk and remembered).

        Raises:
            KeyError: no keys for this client.
            DeploymentError: the files on disk are damaged.
        """
        with self._lock:
            keys = self._memory.get(client_id)
            if keys is not None:
                self._memory.move_to_end(client_id)
                return keys
            record = self._record(client_id)
            if record is None:
                raise KeyError(client_id)
            path = self.directory / f"{client_id}.{record['key_id']}.keys"
            try:
                message = path.read_bytes()
            except OSError as exc:
                raise DeploymentError(f"The keys of {client_id!r} cannot be read: {exc}") from None
            if hashlib.sha256(message).hexdigest() != record["key_id"]:
                raise DeploymentError(f"{path} does not match its key id: the file was modified.")
            keys = StoredKeys(message, bytes.fromhex(record["key_id"]), record["circuit"])
            self._remember(client_id, keys)
            return keys

    # ------------------------------------------------------------------ memory
    def _remember(self, client_id: str, keys: StoredKeys) -> None:
        self._memory[client_id] = keys
        while self._memory and self.memory_bytes() > self.memory_budget:
            _, evicted = self._memory.popitem(last=False)
            self._evicted(evicted.key_id)

    def _evicted(self, key_id: bytes) -> None:
        if self.on_evict is not None:
            self.on_evict(key_id)

    def memory_bytes(self) -> int:
        """Bytes of key messages held in memory."""
        with self._lock:
            return sum(len(k.message) for k in self._memory.values())

    def in_memory(self) -> list[str]:
        """Client ids whose keys are in memory, least recently used first."""
        with self._lock:
            return list(self._memory)
