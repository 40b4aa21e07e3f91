"""Client/server artifacts: round trip, no secrets on the server, refusal of bad files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant import deploy
from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_quant.errors import DeploymentError, InputError, NotCompiledError
from fhe_quant.torch import compile_torch_model


def _model(hidden: bool) -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(4, 5)]
    if hidden:
        layers += [nn.ReLU(), nn.Linear(5, 3)]
    layers.append(nn.Sigmoid())  # runs on the client after decryption
    return nn.Sequential(*layers), np.random.default_rng(0).normal(size=(30, 4))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory):
    model, x = _model(hidden=False)
    qm = compile_torch_model(model, x, n_bits=5, p_error=1e-12)
    root = tmp_path_factory.mktemp("artifact")
    FHEModelDev(root, qm).save()
    return root, qm, x


def test_round_trip_matches_the_clear_model(saved) -> None:
    root, qm, x = saved
    client = FHEModelClient(root / "client", key_dir=root.parent / "keys_a")
    server = FHEModelServer(root / "server")
    keys = client.get_serialized_evaluation_keys()
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x[:3])]
    np.testing.assert_array_equal(client.deserialize_decrypt(results), qm.forward_integers(x[:3]))
    np.testing.assert_allclose(client.deserialize_decrypt_dequantize(results), qm.forward(x[:3]))


@pytest.mark.slow
@pytest.mark.execute
def test_round_trip_with_table_lookups(tmp_path: Path) -> None:
    model, x = _model(hidden=True)
    qm = compile_torch_model(model, x, n_bits=3, p_error=1e-12)
    FHEModelDev(tmp_path, qm).save()
    client = FHEModelClient(tmp_path / "client", key_dir=tmp_path / "keys")
    server = FHEModelServer(tmp_path / "server")
    keys = client.get_serialized_evaluation_keys()
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x[:2])]
    np.testing.assert_array_equal(client.deserialize_decrypt(results), qm.forward_integers(x[:2]))


def test_server_directory_holds_no_secret_material(saved) -> None:
    root, _, _ = saved
    files = sorted(p.name for p in (root / "server").iterdir())
    assert files == ["manifest.json", "server.zip"]
    client_files = sorted(p.name for p in (root / "client").iterdir())
    assert client_files == ["client.zip", "manifest.json", "model.json", "model.npz", "report.json"]
    # keys live only where the client puts them
    assert not any("key" in p.name.lower() for p in root.rglob("*"))
    assert any((root.parent / "keys_a").iterdir())


def test_artifacts_are_not_pickles(saved) -> None:
    root, _, _ = saved
    json.loads((root / "client" / "model.json").read_text())
    with np.load(root / "client" / "model.npz", allow_pickle=False) as arrays:
        assert all(arrays[name].dtype != object for name in arrays.files)


def _copy(root: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(root, target)
    return target


def test_tampered_file_is_refused(saved, tmp_path: Path) -> None:
    root, _, _ = saved
    copy = _copy(root, tmp_path)
    data = json.loads((copy / "client" / "model.json").read_text())
    data["input_quantizer"]["bits"] = 2
    (copy / "client" / "model.json").write_text(json.dumps(data))
    with pytest.raises(DeploymentError, match=r"model\.json does not match its checksum"):
        FHEModelClient(copy / "client")


def test_incompatible_version_is_refused(saved, tmp_path: Path) -> None:
    root, _, _ = saved
    copy = _copy(root, tmp_path)
    manifest = json.loads((copy / "server" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (copy / "server" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DeploymentError, match="format version 99"):
        FHEModelServer(copy / "server")


def test_wrong_directory_and_bad_bytes_are_refused(saved) -> None:
    root, _, x = saved
    with pytest.raises(DeploymentError, match="expected 'server'"):
        FHEModelServer(root / "client")
    with pytest.raises(DeploymentError, match="no manifest"):
        FHEModelClient(root)
    server = FHEModelServer(root / "server")
    client = FHEModelClient(root / "client", key_dir=root.parent / "keys_a")
    keys = client.get_serialized_evaluation_keys()
    with pytest.raises(DeploymentError, match="bad header"):
        server.run(b"garbage", keys)
    with pytest.raises(DeploymentError, match="not an fhe_quant key message"):
        server.run(client.quantize_encrypt_serialize(x[:1])[0], b"garbage")
    bad_keys = keys[:20] + b"garbage"
    forged = deploy._seal(hashlib.sha256(bad_keys).digest(), b"payload")
    with pytest.raises(DeploymentError, match="not a serialized ciphertext"):
        server.run(forged, bad_keys)
    sealed = client.quantize_encrypt_serialize(x[:1])[0]
    with pytest.raises(DeploymentError, match="not a serialized ciphertext"):
        server.run(sealed[:40] + b"garbage", keys)
    with pytest.raises(InputError, match="shape"):
        client.quantize_encrypt_serialize(np.zeros((1, 7)))


def test_ciphertexts_under_other_keys_are_refused(saved) -> None:
    root, _, x = saved
    alice = FHEModelClient(root / "client", key_dir=root.parent / "keys_a")
    bob = FHEModelClient(root / "client", key_dir=root.parent / "keys_b")
    server = FHEModelServer(root / "server")
    alice_keys = alice.get_serialized_evaluation_keys()
    with pytest.raises(DeploymentError, match="other keys"):
        server.run(bob.quantize_encrypt_serialize(x[:1])[0], alice_keys)
    result = server.run(alice.quantize_encrypt_serialize(x[:1])[0], alice_keys)
    with pytest.raises(DeploymentError, match="other keys"):
        bob.deserialize_decrypt([result])


def test_artifact_info_reports_the_model(saved) -> None:
    root, qm, _ = saved
    info = deploy.artifact_info(root / "client")
    assert info["input_shape"] == [4] and info["input_bits"] == 5
    assert info["client_post_processing"] == ["sigmoid"]
    assert info["statistics"]["pbs_count"] == qm.statistics["pbs_count"] == 0
    assert info["program"] == qm.program.source()


def test_saving_needs_a_compiled_model_and_never_overwrites(saved, tmp_path: Path) -> None:
    root, qm, _ = saved
    model, x = _model(hidden=False)
    with pytest.raises(NotCompiledError):
        FHEModelDev(tmp_path / "a", compile_torch_model(model, x, compile=False)).save()
    with pytest.raises(DeploymentError, match="already holds"):
        FHEModelDev(root, qm).save()
