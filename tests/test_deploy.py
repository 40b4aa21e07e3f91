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
    FHEModelClient(
        root / "client", key_dir=root.parent / "keys_a"
    ).generate_private_and_evaluation_keys()
    files = sorted(p.name for p in (root / "server").iterdir())
    assert files == ["circuit.json", "circuit.mlir", "manifest.json"]
    client_files = sorted(p.name for p in (root / "client").iterdir())
    assert client_files == ["client.zip", "manifest.json", "model.json", "model.npz", "report.json"]
    # keys live only where the client puts them
    assert not any("key" in p.name.lower() for p in root.rglob("*"))
    assert any((root.parent / "keys_a").iterdir())
    # the server holds the circuit as data (MLIR + its compilation options): no key of
    # any kind, no quantization parameter, no compiled library
    options = json.loads((root / "server" / "circuit.json").read_text())
    assert set(options) == {"concrete_python", "options", "program_sha256"}
    assert not any(word in json.dumps(options) for word in ("secret", "py/", "scale"))
    assert "FHELinalg" in (root / "server" / "circuit.mlir").read_text()


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
    forged = deploy.MESSAGE_MAGIC + hashlib.sha256(bad_keys).digest() + b"payload"
    with pytest.raises(DeploymentError, match="not a serialized ciphertext"):
        server.run(forged, bad_keys)
    sealed = client.quantize_encrypt_serialize(x[:1])[0]
    with pytest.raises(DeploymentError, match="not a serialized ciphertext"):
        server.run(sealed[:40] + b"garbage", keys)
    with pytest.raises(InputError, match="shape"):
        client.quantize_encrypt_serialize(np.zeros((1, 7)))


def test_server_key_cache_is_bounded_and_gives_the_same_answers(saved) -> None:
    root, qm, x = saved
    client = FHEModelClient(root / "client", key_dir=root.parent / "keys_a")
    server = FHEModelServer(root / "server", key_cache_size=2)
    keys = client.get_serialized_evaluation_keys()
    ciphertext = client.quantize_encrypt_serialize(x[:1])[0]
    expected = qm.forward_integers(x[:1])
    copies = [bytes(bytearray(keys)) for _ in range(3)]  # equal bytes, distinct objects
    for message in [keys, keys, *copies, keys]:
        result = server.run(ciphertext, message)
        np.testing.assert_array_equal(client.deserialize_decrypt([result]), expected)
        assert len(server._key_cache) <= 2
    assert next(reversed(server._key_cache.values()))[0] is keys
    with pytest.raises(ValueError, match="key_cache_size"):
        FHEModelServer(root / "server", key_cache_size=-1)


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


# ------------------------------------------------------------------ estimators

#: Per-lookup error probability: any mismatch after real encryption is then a bug.
TINY_P_ERROR = 1e-12


def _blobs(n_classes: int, n_features: int = 4, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, size=n)
    centers = rng.normal(scale=2.0, size=(n_classes, n_features))
    return centers[y] + rng.normal(size=(n, n_features)), y


def _logistic_strings() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import LogisticRegression

    x, y = _blobs(2)
    labels = np.array(["benign", "malignant"])[y]
    return LogisticRegression(p_error=TINY_P_ERROR).fit(x, labels), x


def _logistic_multiclass() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import LogisticRegression

    x, y = _blobs(3)
    return LogisticRegression(n_bits=6, p_error=TINY_P_ERROR).fit(x, y + 10), x


def _linear_svc_bools() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import LinearSVC

    x, y = _blobs(2)
    return LinearSVC(p_error=TINY_P_ERROR).fit(x, y == 1), x


def _poisson() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import PoissonRegressor

    x, _ = _blobs(2)
    counts = np.random.default_rng(2).poisson(np.exp(0.3 * x[:, 0] - 0.2 * x[:, 1] + 1.0))
    return PoissonRegressor(p_error=TINY_P_ERROR).fit(x, counts), x


def _mlp_classifier() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import MLPClassifier

    x, y = _blobs(3)
    model = MLPClassifier(
        hidden_layer_sizes=(4,), max_iter=2000, random_state=0, n_bits=2, p_error=TINY_P_ERROR
    )
    return model.fit(x, np.array(["a", "b", "c"], dtype=object)[y]), x


def _qat_classifier() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import NeuralNetClassifier

    x, y = _blobs(3)
    model = NeuralNetClassifier(
        n_bits=2, n_hidden=6, n_layers=2, epochs=3, random_state=0, p_error=TINY_P_ERROR
    )
    return model.fit(x, y), x


def _qat_regressor() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import NeuralNetRegressor

    x, _ = _blobs(2)
    model = NeuralNetRegressor(
        n_bits=2, n_hidden=6, n_layers=2, epochs=3, random_state=0, p_error=TINY_P_ERROR
    )
    return model.fit(x, 5.0 + 3.0 * x[:, 0] - x[:, 1]), x


_NO_LOOKUPS = [_logistic_strings, _logistic_multiclass, _linear_svc_bools, _poisson]
_LOOKUPS = [_mlp_classifier, _qat_classifier, _qat_regressor]


def _check_estimator_round_trip(build, tmp_path: Path) -> None:
    estimator, x = build()
    estimator.compile(x)
    FHEModelDev(tmp_path, estimator).save()
    client = FHEModelClient(tmp_path / "client", key_dir=tmp_path / "keys")
    server = FHEModelServer(tmp_path / "server")
    keys = client.get_serialized_evaluation_keys()
    x = x[:3]
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x)]

    expected = estimator.predict(x, fhe="simulate")
    got = client.predict(results)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    outputs = client.deserialize_decrypt_dequantize(results)
    if hasattr(estimator, "classes_"):
        assert client.post_processing.task == "classifier"
        assert client.post_processing.classes.dtype == np.asarray(estimator.classes_).dtype
        if hasattr(estimator, "predict_proba"):
            np.testing.assert_array_equal(
                client.predict_proba(results), estimator.predict_proba(x, fhe="simulate")
            )
            np.testing.assert_array_equal(outputs, client.predict_proba(results))
        else:
            with pytest.raises(DeploymentError, match="no predict_proba"):
                client.predict_proba(results)
        if hasattr(estimator, "decision_function"):
            expected_decision = estimator.decision_function(x, fhe="simulate")
            np.testing.assert_array_equal(client.decision_function(results), expected_decision)
    else:
        assert client.post_processing.task == "regressor"
        np.testing.assert_array_equal(outputs, expected)
        with pytest.raises(DeploymentError, match="needs the artifact of a classifier"):
            client.predict_proba(results)


@pytest.mark.parametrize("build", _NO_LOOKUPS, ids=lambda f: f.__name__.strip("_"))
def test_estimator_artifact_decodes_like_the_estimator(build, tmp_path: Path) -> None:
    _check_estimator_round_trip(build, tmp_path)


@pytest.mark.slow
@pytest.mark.execute
@pytest.mark.parametrize("build", _LOOKUPS, ids=lambda f: f.__name__.strip("_"))
def test_estimator_with_lookups_decodes_like_the_estimator(build, tmp_path: Path) -> None:
    _check_estimator_round_trip(build, tmp_path)


@pytest.mark.slow
@pytest.mark.execute
def test_qat_module_artifact_gives_its_forward(tmp_path: Path) -> None:
    from fhe_quant.qat import compile_qat_model, prepare_qat

    x, _ = _blobs(3)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    qat = prepare_qat(net, n_bits=2, X_sample=x)
    qat.initialize(x)
    qat.eval()
    qm = compile_qat_model(qat, x, p_error=TINY_P_ERROR)
    FHEModelDev(tmp_path, qm).save()
    client = FHEModelClient(tmp_path / "client", key_dir=tmp_path / "keys")
    server = FHEModelServer(tmp_path / "server")
    keys = client.get_serialized_evaluation_keys()
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x[:2])]
    assert client.post_processing.task == "module"
    np.testing.assert_array_equal(client.deserialize_decrypt_dequantize(results), qm.forward(x[:2]))
    with torch.no_grad():
        in_torch = qat(torch.tensor(x[:2], dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(client.deserialize_decrypt_dequantize(results), in_torch, atol=1e-5)
    with pytest.raises(DeploymentError, match="has no labels"):
        client.predict(results)


def _tree_classifier() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import DecisionTreeClassifier

    x, y = _blobs(3)
    model = DecisionTreeClassifier(max_depth=2, random_state=0, p_error=TINY_P_ERROR)
    return model.fit(x, np.array(["a", "b", "c"])[y]), x


def _forest_regressor() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import RandomForestRegressor

    x, _ = _blobs(2)
    model = RandomForestRegressor(n_estimators=3, max_depth=2, random_state=0)
    return model.fit(x, 2.0 * x[:, 0] - x[:, 1]), x


def _knn_classifier() -> tuple[object, np.ndarray]:
    from fhe_quant.sklearn import KNeighborsClassifier

    x, y = _blobs(3, n=12)
    return KNeighborsClassifier(n_neighbors=3).fit(x, y + 1), x


@pytest.mark.parametrize(
    "build",
    [
        _tree_classifier,
        _forest_regressor,
        pytest.param(_knn_classifier, marks=pytest.mark.slow),  # compiling takes ~8 s
    ],
    ids=lambda f: f.__name__,
)
def test_tree_and_knn_artifacts_decode_like_the_estimator_in_clear(build, tmp_path: Path) -> None:
    """Trees and nearest neighbours follow the same contract: the saved client decodes
    their integer outputs as their own predict does (in clear: ``disable`` equals
    ``simulate`` and ``execute`` bit for bit, which their own tests prove)."""
    estimator, x = build()
    estimator.compile(x[:4])
    FHEModelDev(tmp_path, estimator).save()
    client = FHEModelClient(tmp_path / "client")
    module = estimator.quantized_module_
    np.testing.assert_array_equal(client.processing.quantize(x), module.quantize_input(x))
    raw = client.processing.raw(module.forward_integers(x))
    post = client.post_processing
    expected = estimator.predict(x)
    assert post.predict(raw).dtype == expected.dtype
    np.testing.assert_array_equal(post.predict(raw), expected)
    if hasattr(estimator, "predict_proba"):
        np.testing.assert_array_equal(post.predict_proba(raw), estimator.predict_proba(x))


def test_a_client_that_would_dequantize_wrongly_is_not_saved(tmp_path: Path) -> None:
    model, x = _model(hidden=False)
    qm = compile_torch_model(model, x, n_bits=3)
    shifted = qm.dequantize_output
    qm.dequantize_output = lambda acc: shifted(acc) + 1.0  # not what the artifact saves
    with pytest.raises(DeploymentError, match="client-side forward of QuantizedModule"):
        FHEModelDev(tmp_path, qm).save()
    assert not (tmp_path / "client" / "manifest.json").exists()


def test_estimator_artifact_records_its_task(tmp_path: Path) -> None:
    estimator, x = _logistic_strings()
    estimator.compile(x)
    FHEModelDev(tmp_path, estimator).save()
    info = deploy.artifact_info(tmp_path / "client")
    assert info["task"] == "classifier" and info["output_function"] == "sigmoid"
    assert info["classes"] == ["benign", "malignant"]


def test_a_post_processing_that_would_decode_wrongly_is_not_saved(tmp_path: Path) -> None:
    from fhe_quant.sklearn import LogisticRegression

    class Inverted(LogisticRegression):
        """Decodes against the contract: the other class wins."""

        def _decode(self, raw: np.ndarray) -> np.ndarray:
            return self.classes_[(raw[:, 0] <= 0).astype(np.intp)]

    x, y = _blobs(2)
    estimator = Inverted().fit(x, y)
    estimator.compile(x)
    with pytest.raises(DeploymentError, match="client-side predict of Inverted"):
        FHEModelDev(tmp_path, estimator).save()
    assert not (tmp_path / "client" / "manifest.json").exists()


def test_unfitted_or_uncompiled_models_are_refused(tmp_path: Path) -> None:
    from fhe_quant.sklearn import LogisticRegression

    with pytest.raises(DeploymentError, match="Fit it first"):
        FHEModelDev(tmp_path, LogisticRegression())
    with pytest.raises(DeploymentError, match="compile_torch_model"):
        FHEModelDev(tmp_path, nn.Linear(2, 2))
    estimator, _ = _logistic_strings()
    with pytest.raises(NotCompiledError):
        FHEModelDev(tmp_path, estimator).save()


@pytest.mark.parametrize(
    "classes",
    [
        np.array([3, 7, 11]),
        np.array([-1, 1], dtype=np.int8),
        np.array([0.5, 2.0]),
        np.array([False, True]),
        np.array(["cat", "dog", "emu"]),
        np.array(["no", "yes"], dtype=object),
    ],
    ids=lambda c: str(c.dtype),
)
def test_classes_round_trip_through_json_with_their_dtype(classes: np.ndarray) -> None:
    post = deploy.PostProcessing("classifier", classes=classes, output="softmax")
    back = deploy.PostProcessing.from_dict(json.loads(json.dumps(post.to_dict())))
    assert back.classes.dtype == classes.dtype
    np.testing.assert_array_equal(back.classes, classes)
    raw = np.random.default_rng(0).normal(size=(5, len(classes)))
    got, expected = back.predict(raw), classes[np.argmax(raw, axis=1)]
    assert got.dtype == expected.dtype and got.tolist() == expected.tolist()


def test_post_processing_validates_itself() -> None:
    with pytest.raises(ValueError, match="'task'"):
        deploy.PostProcessing("ranker")
    with pytest.raises(ValueError, match="'classes'"):
        deploy.PostProcessing("classifier")
    with pytest.raises(ValueError, match="'output'"):
        deploy.PostProcessing("regressor", output="tanh")
    with pytest.raises(ValueError, match="target_scale"):
        deploy.PostProcessing("regressor", target_scale=np.ones(1))
    with pytest.raises(DeploymentError, match="numbers, booleans or strings"):
        deploy.PostProcessing(
            "classifier", classes=np.array([1, "a"], dtype=object), output=None
        ).to_dict()
