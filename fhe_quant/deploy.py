"""Client/server deployment of a compiled model.

The model owner compiles once and saves two directories with :class:`FHEModelDev`:

* ``server/``: Concrete's compiled circuit (``server.zip``) and a manifest. The server
  never sees a secret key, a clear input or the quantization parameters.
* ``client/``: Concrete's client specs (``client.zip``), the quantization and
  post-processing parameters (``model.json`` + ``model.npz``), and a manifest.

Nothing is pickled: parameters are JSON and a NumPy ``.npz`` read with
``allow_pickle=False``; circuits and keys use Concrete's own serialization. Every
manifest records the format version and the SHA-256 of each file, and loading checks
both, so an artifact from another version or a modified file is refused by name.

Examples:
    >>> import numpy as np, torch, tempfile
    >>> from fhe_quant.torch import compile_torch_model
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(3, 2))
    >>> x = np.random.default_rng(0).normal(size=(20, 3))
    >>> qm = compile_torch_model(net, x, n_bits=4)
    >>> root = tempfile.mkdtemp()
    >>> FHEModelDev(root, qm).save()
    >>> client = FHEModelClient(root + "/client", key_dir=root + "/keys")
    >>> server = FHEModelServer(root + "/server")
    >>> keys = client.get_serialized_evaluation_keys()
    >>> result = server.run(client.quantize_encrypt_serialize(x[:1])[0], keys)
    >>> bool(np.allclose(client.deserialize_decrypt_dequantize([result]), qm.forward(x[:1])))
    True
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fhe_quant import __version__
from fhe_quant.errors import DeploymentError, InputError
from fhe_quant.ir import Node
from fhe_quant.model import QuantizedModule, run_chain
from fhe_quant.quant.ptq import check_calibration_data
from fhe_quant.quant.quantizer import UniformQuantizer

with warnings.catch_warnings():
    warnings.simplefilter("ignore", UserWarning)  # pkg_resources, imported by concrete
    from concrete import fhe

__all__ = ["FORMAT_VERSION", "FHEModelDev", "FHEModelClient", "FHEModelServer", "artifact_info"]

#: Version of the artifact layout; loading refuses any other.
FORMAT_VERSION = 1
_MANIFEST = "manifest.json"
# NOTE: TFHE cannot tell that a ciphertext was encrypted under other keys: the server
# computes garbage. So every ciphertext travels in an envelope naming its keys (the
# SHA-256 of the client's evaluation-key message), and both sides check it. The key
# message starts with a random client nonce: a circuit without bootstrap has empty
# evaluation keys, identical for every client.
_MAGIC = b"FHQ1"
_DIGEST = 32
_NONCE = 16


def _seal(key_id: bytes, payload: bytes) -> bytes:
    return _MAGIC + key_id + payload


def _open(message: bytes, key_id: bytes, what: str) -> bytes:
    if not isinstance(message, bytes) or not message.startswith(_MAGIC) or len(message) <= 36:
        raise DeploymentError(f"The {what} is not an fhe_quant message (bad header).")
    if message[4 : 4 + _DIGEST] != key_id:
        raise DeploymentError(
            f"The {what} was encrypted under other keys than the evaluation keys given: "
            "each client must send its own evaluation keys with its ciphertexts."
        )
    return message[4 + _DIGEST :]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _write_manifest(directory: Path, role: str, files: list[str]) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "fhe_quant_version": __version__,
        "role": role,
        "sha256": {name: _sha256(directory / name) for name in files},
    }
    (directory / _MANIFEST).write_text(json.dumps(manifest, indent=2))


def _check_manifest(directory: Path, role: str) -> dict[str, Any]:
    path = directory / _MANIFEST
    if not path.is_file():
        raise DeploymentError(f"{directory} is not an fhe_quant {role} artifact: no {_MANIFEST}.")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"{path} is not valid JSON: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise DeploymentError(
            f"{path}: artifact format version {version!r}, but this fhe_quant "
            f"({__version__}) reads version {FORMAT_VERSION}. Re-export the model."
        )
    if manifest.get("role") != role:
        raise DeploymentError(
            f"{directory} holds a {manifest.get('role')!r} artifact, expected {role!r}."
        )
    for name, digest in manifest.get("sha256", {}).items():
        file = directory / name
        if not file.is_file():
            raise DeploymentError(f"{directory}: file {name!r} listed in the manifest is missing.")
        if _sha256(file) != digest:
            raise DeploymentError(
                f"{file} does not match its checksum in {_MANIFEST}: the artifact was modified."
            )
    return manifest


# ------------------------------------------------------------------ parameters as data


def _node_to_json(node: Node, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    params = {}
    for key, value in node.params.items():
        array_name = f"{prefix}.{node.name}.{key}"
        arrays[array_name] = np.asarray(value)
        params[key] = array_name
    attrs = {k: list(v) if isinstance(v, tuple) else v for k, v in node.attrs.items()}
    return {
        "name": node.name,
        "op": node.op,
        "inputs": list(node.inputs),
        "attrs": attrs,
        "params": params,
        "source": node.source,
    }


def _node_from_json(data: dict[str, Any], arrays: Any) -> Node:
    params = {key: arrays[name] for key, name in data["params"].items()}
    return Node(
        data["name"], data["op"], tuple(data["inputs"]), data["attrs"], params, data["source"]
    )


class _ClientProcessing:
    """What the client runs in clear: pre-processing + input quantization, and the
    dequantization + post-processing of the decrypted accumulator."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        pre: tuple[Node, ...],
        input_quantizer: UniformQuantizer,
        encrypted_shape: tuple[int, ...],
        scale: np.ndarray,
        zero: np.ndarray,
        bias: np.ndarray,
        post: tuple[Node, ...],
    ) -> None:
        self.input_shape = input_shape
        self.pre = pre
        self.input_quantizer = input_quantizer
        self.encrypted_shape = encrypted_shape
        self.scale, self.zero, self.bias = scale, zero, bias
        self.post = post

    @classmethod
    def from_model(cls, model: QuantizedModule) -> _ClientProcessing:
        out = model.program.output_step
        return cls(
            model.input_shape,
            model.quantized.pre,
            model.program.input_quantizer,
            model.program.input_shape,
            out.scale,
            out.zero,
            out.bias,
            model.quantized.post,
        )

    def save(self, directory: Path) -> list[str]:
        arrays: dict[str, np.ndarray] = {
            "output.scale": self.scale,
            "output.zero": self.zero,
            "output.bias": self.bias,
        }
        data = {
            "input_shape": list(self.input_shape),
            "encrypted_shape": list(self.encrypted_shape),
            "input_quantizer": self.input_quantizer.to_dict(),
            "pre": [_node_to_json(n, arrays, "pre") for n in self.pre],
            "post": [_node_to_json(n, arrays, "post") for n in self.post],
        }
        (directory / "model.json").write_text(json.dumps(data, indent=2))
        np.savez(directory / "model.npz", **arrays)
        return ["model.json", "model.npz"]

    @classmethod
    def load(cls, directory: Path) -> _ClientProcessing:
        data = json.loads((directory / "model.json").read_text())
        with np.load(directory / "model.npz", allow_pickle=False) as arrays:
            loaded = {name: arrays[name] for name in arrays.files}
        return cls(
            tuple(data["input_shape"]),
            tuple(_node_from_json(n, loaded) for n in data["pre"]),
            UniformQuantizer.from_dict(data["input_quantizer"]),
            tuple(data["encrypted_shape"]),
            loaded["output.scale"],
            loaded["output.zero"],
            loaded["output.bias"],
            tuple(_node_from_json(n, loaded) for n in data["post"]),
        )

    def quantize(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise InputError(f"The input must hold numbers; got dtype {array.dtype} instead.")
        array = check_calibration_data(array, self.input_shape, "input")
        return self.input_quantizer.quantize(run_chain(self.pre, array)).astype(np.int64)

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        value = self.scale * (np.asarray(acc, dtype=np.float64) - self.zero) + self.bias
        return run_chain(self.post, value)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def artifact_info(path: str | Path) -> dict[str, Any]:
    """What a saved client artifact holds: manifest, input format, statistics, program.

    Checks the manifest (version, checksums) first, like :class:`FHEModelClient`.
    """
    directory = Path(path)
    manifest = _check_manifest(directory, "client")
    model = json.loads((directory / "model.json").read_text())
    report = json.loads((directory / "report.json").read_text())
    return {
        "manifest": manifest,
        "input_shape": model["input_shape"],
        "input_bits": model["input_quantizer"]["bits"],
        "client_pre_processing": [n["op"] for n in model["pre"]],
        "client_post_processing": [n["op"] for n in model["post"]],
        **report,
    }


# ------------------------------------------------------------------ the three roles


class FHEModelDev:
    """Saves a compiled model as a client directory and a server directory.

    Args:
        path: directory to create (``path/client`` and ``path/server`` are written).
        model: a compiled :class:`~fhe_quant.model.QuantizedModule`.
    """

    def __init__(self, path: str | Path, model: QuantizedModule) -> None:
        self.path = Path(path)
        self.model = model

    def save(self) -> None:
        """Write the artifacts; refuses to overwrite existing ones."""
        circuit = self.model.circuit  # raises NotCompiledError if not compiled
        client_dir, server_dir = self.path / "client", self.path / "server"
        for directory in (client_dir, server_dir):
            if (directory / _MANIFEST).exists():
                raise DeploymentError(f"{directory} already holds an artifact; remove it first.")
            directory.mkdir(parents=True, exist_ok=True)
        circuit.server.save(server_dir / "server.zip")
        _write_manifest(server_dir, "server", ["server.zip"])
        circuit.client.save(client_dir / "client.zip")
        files = ["client.zip", *_ClientProcessing.from_model(self.model).save(client_dir)]
        summary = {
            "statistics": _jsonable(self.model.statistics),
            "program": self.model.program.source(),
        }
        (client_dir / "report.json").write_text(json.dumps(summary, indent=2))
        files.append("report.json")
        _write_manifest(client_dir, "client", files)


class FHEModelClient:
    """The user's side: keys, quantization, encryption, decryption.

    Args:
        path: the ``client`` directory written by :class:`FHEModelDev`.
        key_dir: where secret and evaluation keys are kept (created if missing); keys
            found there are reused. ``None`` keeps them in memory only.
    """

    def __init__(self, path: str | Path, key_dir: str | Path | None = None) -> None:
        self.path = Path(path)
        _check_manifest(self.path, "client")
        self.processing = _ClientProcessing.load(self.path)
        self.key_dir = Path(key_dir) if key_dir is not None else None
        if self.key_dir is not None:
            self.key_dir.mkdir(parents=True, exist_ok=True)
        self.client = fhe.Client.load(self.path / "client.zip", keyset_cache_directory=self.key_dir)
        self._nonce = self._client_nonce()
        self._key_message: bytes | None = None

    def _client_nonce(self) -> bytes:
        if self.key_dir is None:
            return os.urandom(_NONCE)
        path = self.key_dir / "client_nonce"
        if not path.is_file():
            path.write_bytes(os.urandom(_NONCE))
        nonce = path.read_bytes()
        if len(nonce) != _NONCE:
            raise DeploymentError(f"{path} is corrupted ({len(nonce)} bytes, expected {_NONCE}).")
        return nonce

    @property
    def key_id(self) -> bytes:
        """SHA-256 of this client's evaluation-key message: names its keys."""
        return hashlib.sha256(self.get_serialized_evaluation_keys()).digest()

    def generate_private_and_evaluation_keys(self, force: bool = False) -> None:
        """Generate keys (or load them from ``key_dir``)."""
        self.client.keygen(force=force)

    def get_serialized_evaluation_keys(self) -> bytes:
        """The public evaluation keys (with this client's nonce), to send to the server."""
        if self._key_message is None:
            self._key_message = _MAGIC + self._nonce + self.client.evaluation_keys.serialize()
        return self._key_message

    def quantize_encrypt_serialize(self, x: Any) -> list[bytes]:
        """Quantize and encrypt each sample of ``x``; one serialized ciphertext each."""
        q = self.processing.quantize(x)
        shape = (1, *self.processing.encrypted_shape)
        return [
            _seal(self.key_id, self.client.encrypt(q[i].reshape(shape)).serialize())
            for i in range(len(q))
        ]

    def deserialize_decrypt(self, results: list[bytes]) -> np.ndarray:
        """The integer accumulators of the server's results, one row per sample."""
        out = []
        for i, result in enumerate(results):
            payload = _open(result, self.key_id, f"result {i}")
            try:
                value = fhe.Value.deserialize(payload)
            except Exception as exc:
                raise DeploymentError(f"Result {i} is not a serialized ciphertext: {exc}") from None
            out.append(np.asarray(self.client.decrypt(value), dtype=np.int64))
        return np.concatenate([o.reshape(1, *o.shape[1:]) for o in out])

    def deserialize_decrypt_dequantize(self, results: list[bytes]) -> np.ndarray:
        """The float outputs (as the model's ``forward``) of the server's results."""
        return self.processing.dequantize(self.deserialize_decrypt(results))


class FHEModelServer:
    """The untrusted side: runs the circuit on ciphertexts with evaluation keys.

    Args:
        path: the ``server`` directory written by :class:`FHEModelDev`.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_manifest(self.path, "server")
        self.server = fhe.Server.load(self.path / "server.zip")

    def run(self, serialized_input: bytes, serialized_evaluation_keys: bytes) -> bytes:
        """Run on one serialized encrypted sample; returns the serialized result."""
        if not isinstance(serialized_evaluation_keys, bytes) or not (
            serialized_evaluation_keys.startswith(_MAGIC)
        ):
            raise DeploymentError("The evaluation keys are not an fhe_quant key message.")
        key_id = hashlib.sha256(serialized_evaluation_keys).digest()
        payload = _open(serialized_input, key_id, "input")
        try:
            value = fhe.Value.deserialize(payload)
        except Exception as exc:
            raise DeploymentError(f"The input is not a serialized ciphertext: {exc}") from None
        try:
            keys = fhe.EvaluationKeys.deserialize(serialized_evaluation_keys[4 + _NONCE :])
        except Exception as exc:
            raise DeploymentError(f"The evaluation keys cannot be read: {exc}") from None
        try:
            result = self.server.run(value, evaluation_keys=keys)
        except Exception as exc:
            raise DeploymentError(f"The server could not run this input: {exc}") from None
        return _seal(key_id, result.serialize())
