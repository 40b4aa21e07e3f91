"""Artifacts that cannot be turned against their user (issue 16, findings 2-4).

Each test names the finding it covers; on the format-2 code every one of them failed
(an empty manifest was accepted, ``../`` names were read, corrupt bytes raised untyped
errors, the server loaded jsonpickle and a shipped ``sharedlib.so``, ...).
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fhe_quant import deploy
from fhe_quant.cli import main
from fhe_quant.deploy import FHEModelClient, FHEModelServer
from fhe_quant.errors import DeploymentError, UnauthenticatedArtifactWarning


def _rewrite_manifest(directory: Path, edit=None) -> None:
    """Recompute every checksum of ``directory`` (as an attacker with write access can),
    after ``edit(manifest)``; the signature, if any, is left as it was."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["sha256"] = {
        name: hashlib.sha256((directory / name).read_bytes()).hexdigest()
        if (directory / name).is_file()
        else digest
        for name, digest in manifest["sha256"].items()
    }
    if edit is not None:
        edit(manifest)
    path.write_text(json.dumps(manifest))


def _server(directory: Path, saved, **kwargs) -> FHEModelServer:
    kwargs.setdefault("verify_key", saved.public_key)
    return FHEModelServer(directory, cache_dir=saved.cache, **kwargs)


def _client(directory: Path, saved, **kwargs) -> FHEModelClient:
    kwargs.setdefault("verify_key", saved.public_key)
    return FHEModelClient(directory, **kwargs)


def _predict(root: Path, saved, x: np.ndarray, **kwargs) -> np.ndarray:
    client = _client(root / "client", saved, **kwargs)
    with _server(root / "server", saved, **kwargs) as server:
        keys = client.get_serialized_evaluation_keys()
        results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x)]
    return client.deserialize_decrypt_dequantize(results)


# ------------------------------------------------------------------ finding 3: the manifest


@pytest.mark.parametrize("role", ["client", "server"])
def test_an_empty_or_partial_file_list_is_refused(signed, tmp_path: Path, role: str) -> None:
    root = signed.copy(tmp_path / "a")
    for listing in (
        {},
        dict(list(json.loads((root / role / "manifest.json").read_text())["sha256"].items())[:1]),
    ):
        manifest = json.loads((root / role / "manifest.json").read_text())
        manifest["sha256"] = listing
        (root / role / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(DeploymentError, match="must list exactly the files"):
            FHEModelServer(root / role, cache_dir=signed.cache) if role == "server" else (
                FHEModelClient(root / role)
            )


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/../model.json"])
def test_names_outside_the_artifact_are_refused_without_revealing_files(
    signed, tmp_path: Path, name: str
) -> None:
    root = signed.copy(tmp_path / "a")
    (tmp_path / "a" / "outside.txt").write_text("secret")  # exists for the first name
    messages = []
    for listed in (name, name.replace("outside", "missing").replace("hostname", "nothere")):

        def edit(manifest, listed=listed):
            manifest["sha256"][listed] = "0" * 64

        _rewrite_manifest(root / "client", edit)
        with pytest.raises(DeploymentError, match="must list exactly the files") as caught:
            FHEModelClient(root / "client")
        messages.append(str(caught.value).replace(listed, "NAME"))
        _rewrite_manifest(root / "client", lambda m, listed=listed: m["sha256"].pop(listed))
    assert messages[0] == messages[1]  # an existing and a missing file: the same error


def test_extra_missing_and_linked_files_are_refused(signed, tmp_path: Path) -> None:
    root = signed.copy(tmp_path / "a")
    (root / "client" / "notes.txt").write_text("hello")
    with pytest.raises(DeploymentError, match=r"not part of a client artifact \['notes.txt'\]"):
        FHEModelClient(root / "client")
    (root / "client" / "notes.txt").unlink()
    (root / "client" / "report.json").unlink()
    with pytest.raises(DeploymentError, match=r"missing \['report.json'\]"):
        FHEModelClient(root / "client")
    (root / "client" / "report.json").symlink_to(signed.root / "client" / "report.json")
    with pytest.raises(DeploymentError, match=r"report\.json is not a regular file"):
        FHEModelClient(root / "client")


# ------------------------------------------------------------------ finding 4: typed errors


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b'{"format_version": 3, \xff}', "manifest.json is not UTF-8"),
        (b'{"format_version": 3,', "manifest.json is not valid JSON"),
        (b"[1, 2]", "must hold a JSON object"),
        (b'{"format_version": 2}', "format version 2, but this fhe_quant"),
        (b'{"format_version": "3", "role": "client"}', "format version '3'"),
        (b'{"format_version": 3, "role": "client"}', "'fhe_quant_version' must be a string"),
        (
            b'{"format_version": 3, "role": "client", "fhe_quant_version": "0", '
            b'"sha256": {"a": 1}}',
            "64-digit hex",
        ),
    ],
)
def test_a_corrupt_manifest_is_a_typed_error_naming_it(
    signed, tmp_path: Path, content: bytes, match: str
) -> None:
    root = signed.copy(tmp_path / "a")
    (root / "client" / "manifest.json").write_bytes(content)
    with pytest.raises(DeploymentError, match=match):
        FHEModelClient(root / "client")


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda d: d.pop("input_shape"), r"model\.json .*missing key 'input_shape'"),
        (lambda d: d.update(input_shape="abc"), r"model\.json .*'input_shape' must be a list"),
        (lambda d: d.update(pre={"a": 1}), r"model\.json .*'pre' must be a list"),
        (lambda d: d["input_quantizer"].update(bits="x"), r"model\.json .*malformed"),
        (lambda d: d["post_processing"].update(task="evil"), r"model\.json .*'task'"),
        (
            lambda d: d.update(
                post=[
                    {
                        "name": "n",
                        "op": "linear",
                        "inputs": [],
                        "attrs": {},
                        "params": {},
                        "source": "",
                    }
                ]
            ),
            r"model\.json .*malformed",
        ),
    ],
)
def test_a_rechecksummed_model_json_is_a_typed_error(
    unsigned, tmp_path: Path, edit, match: str
) -> None:
    root = unsigned.copy(tmp_path / "a")
    data = json.loads((root / "client" / "model.json").read_text())
    edit(data)
    (root / "client" / "model.json").write_text(json.dumps(data))
    _rewrite_manifest(root / "client")
    with pytest.raises(DeploymentError, match=match):
        FHEModelClient(root / "client")
    with pytest.raises(DeploymentError, match=match):
        deploy.artifact_info(root / "client")


def test_corrupt_npz_and_zip_are_typed_errors(unsigned, tmp_path: Path) -> None:
    root = unsigned.copy(tmp_path / "a")
    (root / "client" / "model.npz").write_bytes(b"PK\x03\x04 not a zip")
    _rewrite_manifest(root / "client")
    with pytest.raises(DeploymentError, match=r"model\.npz is not a NumPy \.npz"):
        FHEModelClient(root / "client")
    root = unsigned.copy(tmp_path / "b")
    with zipfile.ZipFile(root / "client" / "client.zip", "w") as archive:
        archive.writestr("client.specs.json", "{}")
        archive.writestr("../../escape.txt", "x")
    _rewrite_manifest(root / "client")
    with pytest.raises(DeploymentError, match=r"client\.zip must hold client\.specs\.json only"):
        FHEModelClient(root / "client")
    assert not (tmp_path / "escape.txt").exists()


def test_the_cli_prints_one_line_and_exits_2_on_a_corrupt_artifact(
    unsigned, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = unsigned.copy(tmp_path / "a")
    (root / "client" / "manifest.json").write_bytes(b"\xff\xfe")
    cases = [
        ["info", str(root / "client")],
        ["info", str(tmp_path / "nowhere")],
        ["info", str(unsigned.root / "client"), "--verify-key", str(tmp_path / "no.pub")],
        ["keygen-signing", str(unsigned.private_key)],  # exists: never overwritten
        [
            "compile",
            "--sklearn",
            str(tmp_path / "none.joblib"),
            "--calibration",
            "x.npy",
            "--out",
            str(tmp_path / "o"),
        ],
    ]
    for argv in cases:
        assert main(argv) == 2, argv
        err = capfd.readouterr().err
        assert err.startswith("fhe-quant: error: ") and err.count("\n") == 1, (argv, err)
        assert "Traceback" not in err


def test_the_cli_reports_the_signature(signed, capfd: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(signed.root / "client"), "--verify-key", str(signed.public_key)]) == 0
    assert "signature verified" in capfd.readouterr().out
    assert main(["info", str(signed.root / "client")]) == 0
    assert "signature not checked" in capfd.readouterr().out


# ------------------------------------------------------------------ temporary dirs and keys


def test_servers_leave_no_temporary_directory(signed, monkeypatch, tmp_path: Path) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    server = _server(signed.root / "server", signed)  # compiled (or cached): nothing left
    assert list(scratch.iterdir()) == []
    server.close()
    with pytest.raises(DeploymentError, match="closed"):
        server.run(b"", deploy.MESSAGE_MAGIC + bytes(16))
    with _server(signed.root / "server", signed, cache=False) as server:
        assert len(list(scratch.iterdir())) == 1  # compiled here, owned by the server
    assert list(scratch.iterdir()) == []
    server = _server(signed.root / "server", signed, cache=False)
    del server
    gc.collect()  # the same finalizer runs at interpreter exit
    assert list(scratch.iterdir()) == []


def test_secret_key_files_are_private(signed, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    client = _client(signed.root / "client", signed, key_dir=keys)
    client.generate_private_and_evaluation_keys()
    assert os.stat(keys).st_mode & 0o777 == 0o700
    files = [p for p in keys.rglob("*") if p.is_file()]
    assert any(p.name == "client_nonce" for p in files) and len(files) > 1
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o600"}
    assert signed.private_key.stat().st_mode & 0o777 == 0o600


# ------------------------------------------------------------------ finding 2: no foreign code

_PAYLOAD = '{{"py/reduce": [{{"py/function": "os.system"}}, {{"py/tuple": ["touch {marker}"]}}]}}'


def test_a_jsonpickle_payload_in_an_artifact_never_runs(unsigned, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _PAYLOAD.format(marker=marker)
    # as circuit.json, re-checksummed: read as plain JSON, refused
    root = unsigned.copy(tmp_path / "a")
    (root / "server" / "circuit.json").write_text(payload)
    _rewrite_manifest(root / "server")
    with pytest.raises(DeploymentError, match=r"circuit\.json must be a JSON object with"):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)
    # as Concrete's own configuration.json inside a server.zip (the format-2 layout)
    root = unsigned.copy(tmp_path / "b")
    with zipfile.ZipFile(root / "server" / "server.zip", "w") as archive:
        archive.writestr("configuration.json", payload)
        archive.writestr("circuit.mlir", (root / "server" / "circuit.mlir").read_text())
        archive.writestr("is_simulated", "0")
    _rewrite_manifest(root / "server", lambda m: m["sha256"].update({"server.zip": "0" * 64}))
    with pytest.raises(DeploymentError, match="server"):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)
    assert not marker.exists()


_FOREIGN_C = """
#include <stdio.h>
__attribute__((constructor)) static void pwn(void) {
    FILE *f = fopen("%s", "w"); if (f) { fputs("ran", f); fclose(f); }
}
"""


def test_a_foreign_shared_library_is_never_loaded(unsigned, tmp_path: Path) -> None:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler to build a foreign library with")
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.c"
    source.write_text(_FOREIGN_C % marker)
    library = tmp_path / "sharedlib.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", library, source], check=True)
    root = unsigned.copy(tmp_path / "a")
    shutil.copy(library, root / "server" / "sharedlib.so")
    with pytest.raises(DeploymentError, match=r"not part of a server artifact \['sharedlib.so'\]"):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)
    # listed in a recomputed manifest, it is still no file of a server artifact
    _rewrite_manifest(root / "server", lambda m: m["sha256"].update({"sharedlib.so": "0" * 64}))
    _rewrite_manifest(root / "server")
    with pytest.raises(DeploymentError, match="must list exactly the files"):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)
    # and a valid artifact beside it predicts without ever loading it
    (root / "server" / "sharedlib.so").unlink()
    _rewrite_manifest(root / "server", lambda m: m["sha256"].pop("sharedlib.so"))
    x = unsigned.x[:1]
    out = _predict(root, unsigned, x, verify_key=None)
    np.testing.assert_allclose(out, unsigned.model.forward(x))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("mlir_edit", "match"),
    [
        (
            lambda t: t.replace("module {", "module {\n  func.func private @system(i64) -> i32", 1),
            "plain definition",
        ),
        (lambda t: t.replace("return", "llvm.call @system() : () -> ()\n    return"), "MLIR"),
        (lambda t: t + "garbage", "not valid MLIR"),
    ],
)
def test_circuits_that_are_not_fhe_arithmetic_are_refused(
    unsigned, tmp_path: Path, mlir_edit, match: str
) -> None:
    root = unsigned.copy(tmp_path / "a")
    path = root / "server" / "circuit.mlir"
    path.write_text(mlir_edit(path.read_text()))
    _rewrite_manifest(root / "server")
    with pytest.raises(DeploymentError, match=match):
        FHEModelServer(root / "server", cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())


def test_the_compiled_circuit_is_cached_by_digest(unsigned, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    FHEModelServer(unsigned.root / "server", cache_dir=cache).close()
    entries = [p for p in cache.iterdir()]
    assert len(entries) == 1 and len(entries[0].name) == 64
    assert cache.stat().st_mode & 0o777 == 0o700

    def no_compile(*args, **kwargs):
        raise AssertionError("compiled again")

    monkeypatch.setattr(deploy.artifact.fhe.Server, "create", no_compile)
    _predict(unsigned.root, unsigned, unsigned.x[:1], verify_key=None)
    os.chmod(cache, 0o777)
    with pytest.raises(DeploymentError, match="writable by no one else"):
        FHEModelServer(unsigned.root / "server", cache_dir=cache)


def test_a_circuit_that_compiles_to_other_keys_is_refused(unsigned, tmp_path: Path) -> None:
    root = unsigned.copy(tmp_path / "a")
    circuit = json.loads((root / "server" / "circuit.json").read_text())
    circuit["program_sha256"] = "0" * 64
    (root / "server" / "circuit.json").write_text(json.dumps(circuit))
    _rewrite_manifest(root / "server")
    with pytest.raises(DeploymentError, match="other keys or encodings"):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda o: o.update(p_error="0.1"), "'p_error' must be null or a float"),
        (lambda o: o.update(composable=1), "'composable' must be true or false"),
        (lambda o: o.update(security_level=7), "'security_level' must be one of"),
        (lambda o: o.update(show_mlir=True), "'options' must have exactly"),
    ],
)
def test_compilation_options_are_checked(unsigned, tmp_path: Path, edit, match: str) -> None:
    root = unsigned.copy(tmp_path / "a")
    circuit = json.loads((root / "server" / "circuit.json").read_text())
    edit(circuit["options"])
    (root / "server" / "circuit.json").write_text(json.dumps(circuit))
    _rewrite_manifest(root / "server")
    with pytest.raises(DeploymentError, match=match):
        FHEModelServer(root / "server", cache_dir=unsigned.cache)


# ------------------------------------------------------------------ signatures


def test_a_signed_artifact_round_trips_with_its_key(signed) -> None:
    x = signed.x[:2]
    np.testing.assert_allclose(_predict(signed.root, signed, x), signed.model.forward(x))
    assert _client(signed.root / "client", signed).signed


def test_unsigned_or_wrongly_signed_artifacts_are_refused_with_a_key(
    signed, other, unsigned, tmp_path: Path
) -> None:
    for role, load in (("client", FHEModelClient), ("server", FHEModelServer)):
        with pytest.raises(DeploymentError, match="unsigned"):
            load(unsigned.root / role, verify_key=signed.public_key)
        with pytest.raises(DeploymentError, match="signature does not verify"):
            load(other.root / role, verify_key=signed.public_key)
    root = signed.copy(tmp_path / "a")
    data = json.loads((root / "client" / "model.json").read_text())
    data["input_quantizer"]["scale"] = [2.0]
    (root / "client" / "model.json").write_text(json.dumps(data))
    _rewrite_manifest(root / "client")  # checksums right, signature now wrong
    with pytest.raises(DeploymentError, match="signature does not verify"):
        FHEModelClient(root / "client", verify_key=signed.public_key)
    shutil.copy(root / "server" / "manifest.sig", root / "client" / "manifest.sig")
    with pytest.raises(DeploymentError, match="signature does not verify"):
        FHEModelClient(root / "client", verify_key=signed.public_key)
    with pytest.raises(DeploymentError, match="not a PEM public key"):
        FHEModelClient(signed.root / "client", verify_key=b"not a key")
    with pytest.raises(DeploymentError, match="not a PEM public key"):
        FHEModelClient(signed.root / "client", verify_key=signed.private_key)


def test_loading_without_a_key_warns_that_it_is_unauthenticated(signed, unsigned) -> None:
    with pytest.warns(UnauthenticatedArtifactWarning, match="is unsigned"):
        FHEModelClient(unsigned.root / "client")
    with pytest.warns(UnauthenticatedArtifactWarning, match="signed but no verify_key"):
        FHEModelServer(signed.root / "server", cache_dir=signed.cache)


def test_keygen_signing_writes_a_private_key_pair(tmp_path: Path, capfd) -> None:
    assert main(["keygen-signing", str(tmp_path / "me")]) == 0
    assert "me.pub" in capfd.readouterr().out
    assert (tmp_path / "me").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "me.pub").read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
