"""The key store: files per client and key id, mode 0600, atomic, survive a reopen; only
a hash of the token on disk; an LRU in memory under a byte budget (disk untouched)."""

from __future__ import annotations

import hashlib
import stat

import pytest

from fhe_quant.errors import DeploymentError, ParameterError
from fhe_quant.keystore import KeyStore, parse_size


def _keys(n: int, fill: int = 0) -> bytes:
    return b"FHQ1" + bytes([fill]) * n


def test_keys_survive_a_reopen_with_private_files(tmp_path) -> None:
    store = KeyStore(tmp_path / "store", memory_budget=10**6)
    token = store.put("alice", _keys(100), circuit="c1")
    again = KeyStore(tmp_path / "store")
    assert again.clients() == ["alice"] and again.in_memory() == []
    keys = again.get("alice")
    assert keys.message == _keys(100) and keys.circuit == "c1"
    assert keys.key_id == hashlib.sha256(_keys(100)).digest()
    assert again.check_token("alice", token) and not again.check_token("alice", token + "x")
    files = sorted(p.name for p in (tmp_path / "store").iterdir())
    assert files == sorted(["alice.json", f"alice.{keys.key_id.hex()}.keys"])
    for path in (tmp_path / "store").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert token.encode() not in path.read_bytes()  # only its hash is stored


def test_replacing_keys_rotates_the_token_and_removes_the_old_file(tmp_path) -> None:
    evicted = []
    store = KeyStore(tmp_path, on_evict=evicted.append)
    first = store.put("bob", _keys(10, 1), circuit="c")
    old_id = store.get("bob").key_id
    second = store.put("bob", _keys(10, 2), circuit="c")
    assert first != second and store.check_token("bob", second)
    assert not store.check_token("bob", first)
    assert evicted == [old_id]
    assert len(list(tmp_path.glob("bob.*.keys"))) == 1
    assert store.get("bob").message == _keys(10, 2)


def test_memory_budget_evicts_least_recently_used_from_memory_only(tmp_path) -> None:
    evicted = []
    store = KeyStore(tmp_path, memory_budget=250, on_evict=evicted.append)
    for name in ("a", "b"):
        store.put(name, _keys(100, ord(name)), circuit="c")
    store.get("a")  # a is now the most recently used
    store.put("c", _keys(100, ord("c")), circuit="c")
    assert store.in_memory() == ["a", "c"] and store.memory_bytes() == 208
    assert evicted == [hashlib.sha256(_keys(100, ord("b"))).digest()]
    assert store.clients() == ["a", "b", "c"]  # b left memory, not disk
    assert store.get("b").message == _keys(100, ord("b"))
    assert store.in_memory() == ["c", "b"]


def test_bad_ids_damaged_files_and_sizes_are_named(tmp_path) -> None:
    store = KeyStore(tmp_path)
    with pytest.raises(ParameterError, match="client id"):
        store.put("../etc", _keys(1), circuit="c")
    with pytest.raises(KeyError):
        store.get("nobody")
    store.put("eve", _keys(50), circuit="c")
    key_file = next(tmp_path.glob("eve.*.keys"))
    key_file.write_bytes(_keys(50, 9))
    with pytest.raises(DeploymentError, match="modified"):
        KeyStore(tmp_path).get("eve")
    (tmp_path / "eve.json").write_text("{")
    with pytest.raises(DeploymentError, match="cannot be read"):
        KeyStore(tmp_path).get("eve")
    assert parse_size("4GB") == 4 * 10**9 and parse_size("2KiB") == 2048
    with pytest.raises(ParameterError, match="size"):
        parse_size("4 parsecs")
    with pytest.raises(ParameterError, match="budget"):
        KeyStore(tmp_path, memory_budget=-1)
