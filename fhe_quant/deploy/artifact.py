"""Client/server deployment of a compiled model: the artifacts and both sides.

:mod:`fhe_quant.deploy` re-exports everything public here; its
:class:`~fhe_quant.deploy.FHEModelServer` adds ``run_batch`` (Dask batches, in
:mod:`fhe_quant.batch`, which builds on this module's server).

The model owner compiles once and saves two directories with :class:`FHEModelDev`:

* ``server/``: Concrete's compiled circuit (``server.zip``) and a manifest. The server
  never sees a secret key, a clear input or the quantization parameters.
* ``client/``: Concrete's client specs (``client.zip``), the quantization and
  post-processing parameters (``model.json`` + ``model.npz``), and a manifest.

The model is a compiled torch or QAT :class:`~fhe_quant.model.QuantizedModule` or a
fitted and compiled fhe_quant estimator. For an estimator, ``model.json`` also holds its
post-processing (:class:`PostProcessing`: ``classes_`` with their dtype, the output
function, the target shape), and the client's :meth:`FHEModelClient.predict`,
:meth:`~FHEModelClient.predict_proba` and :meth:`~FHEModelClient.decision_function`
return what the estimator's own methods return. Before writing anything,
:class:`FHEModelDev` checks on random inputs, in clear, that the saved client quantizes
and decodes exactly as the model does.

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

import dataclasses
import errno
import hashlib
import io
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
import weakref
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fhe_quant import __version__
from fhe_quant.errors import DeploymentError, InputError, UnsupportedOpError
from fhe_quant.fhe import native_output as fhe_native_output
from fhe_quant.ir import Node
from fhe_quant.model import QuantizedModule, run_chain
from fhe_quant.process import import_concrete
from fhe_quant.quant.ptq import check_calibration_data
from fhe_quant.quant.quantizer import ThresholdGrid, UniformQuantizer

fhe = import_concrete()
from concrete.fhe.compilation import configuration as _configuration_module  # noqa: E402

__all__ = [
    "FORMAT_VERSION",
    "MESSAGE_MAGIC",
    "TASKS",
    "PostProcessing",
    "FHEModelDev",
    "FHEModelClient",
    "FHEModelServer",
    "artifact_info",
    "is_fhe_quant_message",
]

#: Version of the artifact layout; loading refuses any other. Version 2 added the
#: estimators' post-processing (``post_processing`` in ``model.json``); version 3 holds
#: the server's circuit as data (``circuit.mlir`` + ``circuit.json``, no shared library,
#: no jsonpickle), lists every file exactly and may be signed (``manifest.sig``).
FORMAT_VERSION = 3
_MANIFEST = "manifest.json"
#: The first 4 bytes of every message fhe_quant sends: evaluation-key messages
#: (``MESSAGE_MAGIC + nonce + keys``) and ciphertext envelopes (``MESSAGE_MAGIC + key id +
#: ciphertext``). A server can refuse anything else before parsing it.
MESSAGE_MAGIC = b"FHQ1"
# NOTE: TFHE cannot tell that a ciphertext was encrypted under other keys: the server
# computes garbage. So every ciphertext travels in an envelope naming its keys (the
# SHA-256 of the client's evaluation-key message), and both sides check it. The key
# message starts with a random client nonce: a circuit without bootstrap has empty
# evaluation keys, identical for every client.
_DIGEST = 32
_NONCE = 16


def is_fhe_quant_message(message: object) -> bool:
    """Whether ``message`` is bytes starting with :data:`MESSAGE_MAGIC` (a key message or
    a ciphertext envelope); a cheap check before any parsing.

    Examples:
        >>> is_fhe_quant_message(MESSAGE_MAGIC + bytes(48)), is_fhe_quant_message(b"GET /")
        (True, False)
    """
    return isinstance(message, bytes) and message.startswith(MESSAGE_MAGIC)


def _seal(key_id: bytes, payload: bytes) -> bytes:
    return MESSAGE_MAGIC + key_id + payload


def _open(message: bytes, key_id: bytes, what: str) -> bytes:
    if not is_fhe_quant_message(message) or len(message) <= len(MESSAGE_MAGIC) + _DIGEST:
        raise DeploymentError(f"The {what} is not an fhe_quant message (bad header).")
    if message[4 : 4 + _DIGEST] != key_id:
        raise DeploymentError(
            f"The {what} was encrypted under other keys than the evaluation keys given: "
            "each client must send its own evaluation keys with its ciphertexts."
        )
    return message[4 + _DIGEST :]


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256(path: Path) -> str:
    return _sha256_bytes(path.read_bytes())


#: The files of each role's directory, besides the manifest and its signature: a manifest
#: must list exactly these, and the directory must hold nothing else.
_ROLE_FILES = {
    "client": frozenset({"client.zip", "model.json", "model.npz", "report.json"}),
    "server": frozenset({"circuit.mlir", "circuit.json"}),
}
_SIGNATURE = "manifest.sig"
_MAX_MANIFEST_BYTES = 2**20
_HEX = frozenset("0123456789abcdef")


def _write_manifest(
    directory: Path, role: str, files: list[str], signing_key: Any | None = None
) -> None:
    manifest = {
        "format_version": FORMAT_VERSION,
        "fhe_quant_version": __version__,
        "role": role,
        "sha256": {name: _sha256(directory / name) for name in sorted(files)},
    }
    data = json.dumps(manifest, indent=2).encode()
    if signing_key is not None:
        from fhe_quant import signing

        (directory / _SIGNATURE).write_bytes(signing.sign(signing_key, data))
    (directory / _MANIFEST).write_bytes(data)


@dataclass(frozen=True)
class _Artifact:
    """A checked artifact directory: its manifest and the bytes of each file, read once
    and checked against the manifest (so what is parsed is what was checked).

    Attributes:
        directory: the directory.
        manifest: the parsed manifest.
        files: file name -> its bytes, for exactly the role's files.
        signed: the manifest's signature was verified.
    """

    directory: Path
    manifest: dict[str, Any]
    files: dict[str, bytes]
    signed: bool

    def where(self, name: str) -> Path:
        return self.directory / name

    def text(self, name: str) -> str:
        try:
            return self.files[name].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DeploymentError(f"{self.where(name)} is not UTF-8 text ({exc}).") from None

    def json(self, name: str) -> Any:
        try:
            return json.loads(self.text(name))
        except json.JSONDecodeError as exc:
            raise DeploymentError(f"{self.where(name)} is not valid JSON: {exc}") from None


def _read_regular(path: Path, limit: int | None = None) -> bytes:
    """The bytes of ``path``, a regular file (a symbolic link is refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DeploymentError(f"{path} is not a regular file (a symbolic link).") from None
        raise DeploymentError(f"Cannot read {path}: {exc.strerror}.") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise DeploymentError(f"{path} is not a regular file.")
        data = file.read(limit + 1 if limit is not None else -1)
    if limit is not None and len(data) > limit:
        raise DeploymentError(f"{path} is larger than {limit} bytes: not a manifest.")
    return data


def _parse_manifest(path: Path, data: bytes, role: str) -> dict[str, Any]:
    """The manifest's fields, typed; refuses another format version or role first."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise DeploymentError(f"{path} is not UTF-8 text ({exc}).") from None
    except json.JSONDecodeError as exc:
        raise DeploymentError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(manifest, dict):
        raise DeploymentError(f"{path} must hold a JSON object; got {type(manifest).__name__}.")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise DeploymentError(
            f"{path}: artifact format version {version!r}, but this fhe_quant "
            f"({__version__}) reads version {FORMAT_VERSION} only. Re-export the model with "
            "FHEModelDev(...).save() (or fhe-quant compile)."
        )
    if manifest.get("role") != role:
        raise DeploymentError(
            f"{path.parent} holds a {manifest.get('role')!r} artifact, expected {role!r}."
        )
    if not isinstance(manifest.get("fhe_quant_version"), str):
        raise DeploymentError(f"{path}: 'fhe_quant_version' must be a string.")
    digests = manifest.get("sha256")
    if not isinstance(digests, dict) or not all(
        isinstance(d, str) and len(d) == 64 and set(d) <= _HEX for d in digests.values()
    ):
        raise DeploymentError(
            f"{path}: 'sha256' must map each file name to a 64-digit hex SHA-256."
        )
    expected = _ROLE_FILES[role]
    if set(digests) != expected:
        missing, extra = sorted(expected - set(digests)), sorted(set(digests) - expected)
        raise DeploymentError(
            f"{path} must list exactly the files of a {role} artifact {sorted(expected)}; "
            f"missing {missing}, not allowed {[repr(n)[:80] for n in extra]}."
        )
    return manifest


def _check_signature(
    directory: Path, data: bytes, present: set[str], verify_key: Any | None, warn: bool
) -> bool:
    """Verify the manifest's signature with ``verify_key``; without a key, warn that the
    artifact is unauthenticated. Returns whether a signature was verified."""
    from fhe_quant.errors import UnauthenticatedArtifactWarning

    if verify_key is None:
        if not warn:
            return False
        state = "is signed but no verify_key was given" if _SIGNATURE in present else "is unsigned"
        warnings.warn(
            f"{directory} {state}: its checksums prove the files are intact, not who made "
            "them. Pass verify_key= (the model owner's public key) to refuse artifacts "
            "the owner did not sign.",
            UnauthenticatedArtifactWarning,
            stacklevel=4,
        )
        return False
    from fhe_quant import signing

    key = signing.load_verify_key(verify_key)
    if _SIGNATURE not in present:
        raise DeploymentError(
            f"{directory} is unsigned (no {_SIGNATURE}) but a verify_key was given: refused."
        )
    signature = _read_regular(directory / _SIGNATURE, signing.SIGNATURE_SIZE)
    if len(signature) != signing.SIGNATURE_SIZE:
        raise DeploymentError(f"{directory / _SIGNATURE} is not an Ed25519 signature.")
    signing.verify(key, data, signature, str(directory / _MANIFEST))
    return True


def _check_manifest(
    directory: Path, role: str, verify_key: Any | None = None, warn: bool = True
) -> _Artifact:
    """Read and check an artifact directory: format version, role, that the manifest
    lists exactly the role's files and the directory holds nothing else, the signature
    (with ``verify_key``) and every checksum.

    Raises:
        DeploymentError: naming the file and what is wrong.
    """
    path = directory / _MANIFEST
    try:
        present = set(os.listdir(directory))
    except OSError as exc:
        raise DeploymentError(f"Cannot read the directory {directory}: {exc.strerror}.") from None
    if _MANIFEST not in present:
        raise DeploymentError(f"{directory} is not an fhe_quant {role} artifact: no {_MANIFEST}.")
    data = _read_regular(path, _MAX_MANIFEST_BYTES)
    manifest = _parse_manifest(path, data, role)
    # NOTE: only names from the fixed role list are ever opened, so a manifest cannot make
    # us read (or reveal the existence of) a file outside the directory.
    extra = present - _ROLE_FILES[role] - {_MANIFEST, _SIGNATURE}
    missing = _ROLE_FILES[role] - present
    if extra or missing:
        raise DeploymentError(
            f"{directory}: files do not match the manifest: missing {sorted(missing)}, "
            f"not part of a {role} artifact {sorted(extra)[:5]}."
        )
    signed = _check_signature(directory, data, present, verify_key, warn)
    files = {}
    for name, digest in sorted(manifest["sha256"].items()):
        content = _read_regular(directory / name)
        if _sha256_bytes(content) != digest:
            raise DeploymentError(
                f"{directory / name} does not match its checksum in {_MANIFEST}: the artifact "
                "was modified."
            )
        files[name] = content
    return _Artifact(directory, manifest, files, signed)


# ------------------------------------------------------------------ parameters as data


def _node_to_json(node: Node, arrays: dict[str, np.ndarray], prefix: str) -> dict[str, Any]:
    """:meth:`Node.to_dict`, its constants moved to ``arrays`` (``model.npz``) and named."""
    data = node.to_dict()
    for key, value in data["params"].items():
        array_name = f"{prefix}.{node.name}.{key}"
        arrays[array_name] = value
        data["params"][key] = array_name
    return data


def _node_from_json(data: Any, arrays: dict[str, np.ndarray]) -> Node:
    """:meth:`Node.from_dict` of a node whose constants are named in ``arrays``."""
    if not isinstance(data, dict) or not isinstance(data.get("params"), dict):
        raise TypeError(f"a node must be a JSON object with 'params'; got {data!r:.80}")
    names = data["params"]
    if not all(isinstance(name, str) for name in names.values()):
        raise TypeError(f"the 'params' of a node must name arrays; got {names!r:.80}")
    return Node.from_dict({**data, "params": {key: arrays[name] for key, name in names.items()}})


def _list(value: Any, key: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{key!r} must be a list; got {type(value).__name__}")
    return value


def _int_tuple(value: Any, key: str) -> tuple[int, ...]:
    items = _list(value, key)
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in items):
        raise ValueError(f"{key!r} must be a list of positive integers; got {items!r:.80}")
    return tuple(items)


def _float_array(value: np.ndarray, key: str) -> np.ndarray:
    if value.dtype.kind not in "biuf" or not np.all(np.isfinite(value)):
        raise ValueError(f"array {key!r} must hold finite numbers")
    return value


def _encoding_to_json(
    encoding: UniformQuantizer | ThresholdGrid, arrays: dict[str, np.ndarray]
) -> dict[str, Any]:
    """The client's input encoding as JSON fields; a threshold grid's thresholds go to
    ``model.npz`` as ``input.values`` and ``input.counts``."""
    if isinstance(encoding, ThresholdGrid):
        arrays.update({f"input.{k}": v for k, v in encoding.arrays().items()})
    return {k: v for k, v in encoding.to_dict().items() if k not in ("values", "counts")}


def _encoding_from_json(data: Any, arrays: dict[str, np.ndarray]) -> Any:
    """The input encoding of :func:`_encoding_to_json`: data only, checked on build."""
    if isinstance(data, dict) and data.get("kind") == "threshold_grid":
        names = ("values", "counts")
        return ThresholdGrid.from_dict(data, {k: arrays[f"input.{k}"] for k in names})
    return UniformQuantizer.from_dict(data)


class _ClientProcessing:
    """What the client runs in clear: pre-processing + input quantization, and the
    dequantization + post-processing of the decrypted accumulator."""

    def __init__(
        self,
        input_shape: tuple[int, ...],
        pre: tuple[Node, ...],
        input_quantizer: UniformQuantizer | ThresholdGrid,
        encrypted_shape: tuple[int, ...],
        scale: np.ndarray,
        zero: np.ndarray,
        bias: np.ndarray,
        post: tuple[Node, ...],
        post_processing: PostProcessing,
    ) -> None:
        self.input_shape = input_shape
        self.pre = pre
        self.input_quantizer = input_quantizer
        self.encrypted_shape = encrypted_shape
        self.scale, self.zero, self.bias = scale, zero, bias
        self.post = post
        self.post_processing = post_processing

    @classmethod
    def from_model(
        cls, model: QuantizedModule, post_processing: PostProcessing
    ) -> _ClientProcessing:
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
            post_processing,
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
            "input_quantizer": _encoding_to_json(self.input_quantizer, arrays),
            "pre": [_node_to_json(n, arrays, "pre") for n in self.pre],
            "post": [_node_to_json(n, arrays, "post") for n in self.post],
            "post_processing": self.post_processing.to_dict(),
        }
        (directory / "model.json").write_text(json.dumps(data, indent=2))
        np.savez(directory / "model.npz", **arrays)
        return ["model.json", "model.npz"]

    @classmethod
    def load(cls, directory: Path) -> _ClientProcessing:
        """Read ``model.json`` and ``model.npz`` from ``directory`` (no manifest check)."""
        files = {n: (directory / n).read_bytes() for n in ("model.json", "model.npz")}
        return cls.from_artifact(_Artifact(directory, {}, files, False))

    @classmethod
    def from_artifact(cls, artifact: _Artifact) -> _ClientProcessing:
        """Parse the checked bytes of ``model.json`` and ``model.npz``.

        Raises:
            DeploymentError: naming the file, for any malformed content.
        """
        data = artifact.json("model.json")
        try:
            with np.load(io.BytesIO(artifact.files["model.npz"]), allow_pickle=False) as arrays:
                loaded = {name: arrays[name] for name in arrays.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DeploymentError(
                f"{artifact.where('model.npz')} is not a NumPy .npz of arrays: {exc}"
            ) from None
        try:
            return cls._from_data(data, loaded)
        except KeyError as exc:
            raise DeploymentError(
                f"{artifact.where('model.json')} (with model.npz) is malformed: missing key {exc}."
            ) from None
        except (TypeError, ValueError, AttributeError, IndexError, UnsupportedOpError) as exc:
            raise DeploymentError(
                f"{artifact.where('model.json')} (with model.npz) is malformed: {exc}"
            ) from None

    @classmethod
    def _from_data(cls, data: Any, loaded: dict[str, np.ndarray]) -> _ClientProcessing:
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, got {type(data).__name__}")
        processing = cls(
            _int_tuple(data["input_shape"], "input_shape"),
            tuple(_node_from_json(n, loaded) for n in _list(data["pre"], "pre")),
            _encoding_from_json(data["input_quantizer"], loaded),
            _int_tuple(data["encrypted_shape"], "encrypted_shape"),
            _float_array(loaded["output.scale"], "output.scale"),
            _float_array(loaded["output.zero"], "output.zero"),
            _float_array(loaded["output.bias"], "output.bias"),
            tuple(_node_from_json(n, loaded) for n in _list(data["post"], "post")),
            PostProcessing.from_dict(data["post_processing"]),
        )
        for node in (*processing.pre, *processing.post):
            if node.kind not in ("elementwise", "reshape"):
                raise ValueError(f"node {node.name!r} ({node.op}) cannot run on the client")
        return processing

    def quantize(self, x: Any) -> np.ndarray:
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise InputError(f"The input must hold numbers; got dtype {array.dtype} instead.")
        array = check_calibration_data(array, self.input_shape, "input")
        return self.input_quantizer.quantize(run_chain(self.pre, array)).astype(np.int64)

    def dequantize(self, acc: np.ndarray) -> np.ndarray:
        acc = np.asarray(acc, dtype=np.float64)
        try:
            np.broadcast_shapes(acc.shape, self.scale.shape, self.zero.shape, self.bias.shape)
        except ValueError:
            # NOTE: only an artifact whose model.npz was taken from another model gets here.
            raise DeploymentError(
                f"The artifact's model.npz (output scale {self.scale.shape}) does not match "
                f"its circuit's output {acc.shape[1:]}: the client artifact is corrupt."
            ) from None
        value = self.scale * (acc - self.zero) + self.bias
        return run_chain(self.post, value)

    def raw(self, acc: np.ndarray) -> np.ndarray:
        """The float outputs as the estimators decode them: ``(N, n_outputs)`` float64."""
        value = np.asarray(self.dequantize(acc), dtype=np.float64)
        return value.reshape(len(value), -1)


# ------------------------------------------------------------------ estimators' outputs

#: What a saved model is: a torch/QAT module (float outputs), or a scikit-learn style
#: classifier or regressor (labels, probabilities, predictions).
TASKS = ("module", "classifier", "regressor")


def _classes_to_json(classes: np.ndarray) -> dict[str, Any]:
    """``classes_`` as JSON with its dtype, so the client returns labels of the same type."""
    kind = classes.dtype.kind
    if kind in "biufU":
        return {"dtype": classes.dtype.str, "values": classes.tolist()}
    if kind == "O":
        values = classes.tolist()
        types = {type(v) for v in values}
        if len(types) == 1 and types <= {str, int, float, bool}:
            return {"dtype": "object", "values": values}
        names = sorted(t.__name__ for t in types)
    else:
        names = [str(classes.dtype)]
    raise DeploymentError(
        f"The classes_ of the model must be numbers, booleans or strings (of one type) to be "
        f"saved as JSON; got values of type {', '.join(names)} instead. Re-fit the model "
        "with integer or string labels."
    )


def _classes_from_json(data: dict[str, Any]) -> np.ndarray:
    if data["dtype"] == "object":
        classes = np.empty(len(data["values"]), dtype=object)
        classes[:] = data["values"]
        return classes
    return np.array(data["values"], dtype=np.dtype(data["dtype"]))


@dataclass(frozen=True, eq=False)
class PostProcessing:
    """What the client computes, in clear, from the decrypted float outputs ``raw``
    ``(N, n_outputs)``: labels, probabilities or predictions, exactly as the estimator's
    own ``predict``/``predict_proba``/``decision_function`` do.

    Attributes:
        task: one of :data:`TASKS`.
        classes: a classifier's ``classes_`` (dtype kept); ``None`` otherwise.
        output: the key in ``fhe_quant.frontends.sklearn.OUTPUT_FUNCTIONS`` applied to
            ``raw``: a classifier's probability function (``None``: no probabilities) or
            a regressor's inverse link (``None``: identity).
        ravel: a regressor with one target returns 1-D predictions.
        has_decision_function: the classifier has ``decision_function`` (the raw
            outputs, 1-D for one column).
        target_scale, target_offset: a regressor's predictions are
            ``output(raw) * target_scale + target_offset`` (the QAT regressor's target
            standardization, undone); ``None`` for none.

    Examples:
        >>> post = PostProcessing("classifier", classes=np.array(["no", "yes"]), output="sigmoid")
        >>> raw = np.array([[-0.5], [2.0]])
        >>> post.predict(raw).tolist(), post.predict_proba(raw).round(3).tolist()
        (['no', 'yes'], [[0.622, 0.378], [0.119, 0.881]])
        >>> PostProcessing.from_dict(post.to_dict()).predict(raw).dtype
        dtype('<U3')
    """

    task: str
    classes: np.ndarray | None = None
    output: str | None = None
    ravel: bool = False
    has_decision_function: bool = False
    target_scale: np.ndarray | None = None
    target_offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS

        if self.task not in TASKS:
            raise ValueError(
                f"The 'task' of a PostProcessing must be one of {TASKS}; got {self.task!r}."
            )
        if (self.classes is not None) != (self.task == "classifier"):
            raise ValueError(
                "The 'classes' of a PostProcessing are required for a classifier and only "
                f"for one; got task {self.task!r} with classes {self.classes!r}."
            )
        if self.classes is not None and (self.classes.ndim != 1 or len(self.classes) == 0):
            raise ValueError(
                "The 'classes' of a PostProcessing must be a non-empty 1-D array; got shape "
                f"{self.classes.shape}."
            )
        if self.output is not None and self.output not in OUTPUT_FUNCTIONS:
            raise ValueError(
                f"The 'output' of a PostProcessing must be one of {sorted(OUTPUT_FUNCTIONS)} "
                f"or None; got {self.output!r}."
            )
        if self.task == "module" and (self.output is not None or self.ravel):
            raise ValueError("A PostProcessing of task 'module' has no 'output' and no 'ravel'.")
        if (self.target_scale is None) != (self.target_offset is None) or (
            self.target_scale is not None and self.task != "regressor"
        ):
            raise ValueError(
                "The 'target_scale' and 'target_offset' of a PostProcessing go together, "
                f"for a regressor only; got task {self.task!r}, target_scale "
                f"{self.target_scale!r}, target_offset {self.target_offset!r}."
            )

    # ------------------------------------------------------------------ from a model
    @classmethod
    def from_estimator(cls, estimator: Any) -> PostProcessing:
        """Read a fitted fhe_quant estimator's post-processing from its attributes
        (``classes_``, ``_output``, ``_ravel``; the QAT estimators' ``y_scale_`` and
        ``y_mean_``).

        Raises:
            DeploymentError: an attribute is missing or cannot be saved as JSON.
        """
        from sklearn.base import is_classifier, is_regressor

        name = type(estimator).__name__
        output, ravel = _estimator_output(estimator)
        if is_classifier(estimator):
            return cls(
                "classifier",
                classes=np.asarray(_attribute(estimator, "classes_")),
                output=output,
                has_decision_function=hasattr(estimator, "decision_function"),
            )
        if not is_regressor(estimator):
            raise DeploymentError(
                f"{name} is neither a classifier nor a regressor (scikit-learn's "
                "is_classifier/is_regressor): FHEModelDev cannot tell how to decode its outputs."
            )
        scale, offset = getattr(estimator, "y_scale_", None), getattr(estimator, "y_mean_", None)
        if (scale is None) != (offset is None):
            raise DeploymentError(f"{name} has only one of y_scale_ and y_mean_.")
        return cls(
            "regressor",
            output=output,
            ravel=ravel,
            target_scale=None if scale is None else np.asarray(scale, dtype=np.float64),
            target_offset=None if offset is None else np.asarray(offset, dtype=np.float64),
        )

    # ------------------------------------------------------------------ as JSON
    def to_dict(self) -> dict[str, Any]:
        """JSON-safe form (``classes`` with their dtype; floats round-trip exactly)."""
        data = dataclasses.asdict(self)
        if self.classes is not None:
            data["classes"] = _classes_to_json(self.classes)
        for key in ("target_scale", "target_offset"):
            if data[key] is not None:
                data[key] = np.asarray(data[key], dtype=np.float64).tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PostProcessing:
        data = dict(data)
        if data.get("classes") is not None:
            data["classes"] = _classes_from_json(data["classes"])
        for key in ("target_scale", "target_offset"):
            if data.get(key) is not None:
                data[key] = np.asarray(data[key], dtype=np.float64)
        return cls(**data)

    # ------------------------------------------------------------------ decoding
    def require(self, tasks: tuple[str, ...], method: str) -> None:
        """Raise :class:`DeploymentError` unless this model's task is one of ``tasks``."""
        if self.task not in tasks:
            hint = (
                " A torch or QAT module's artifact has no labels: use "
                "deserialize_decrypt_dequantize for its float outputs."
                if self.task == "module"
                else ""
            )
            raise DeploymentError(
                f"{method} needs the artifact of a {' or '.join(tasks)}; this one holds a "
                f"{self.task}.{hint}"
            )

    def predict(self, raw: np.ndarray) -> np.ndarray:
        """Labels (classifier) or predictions (regressor), as the estimator's ``predict``."""
        if self.task == "classifier":
            assert self.classes is not None
            if len(self.classes) == 1:  # a model fitted on one class predicts it
                return np.repeat(self.classes, len(raw))
            if raw.shape[1] == 1:
                return self.classes[(raw[:, 0] > 0).astype(np.intp)]
            return self.classes[np.argmax(raw, axis=1)]
        self.require(("regressor",), "predict")
        from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS

        out = OUTPUT_FUNCTIONS[self.output or "identity"](raw)
        if self.target_scale is not None:
            out = out * self.target_scale + self.target_offset
        return out.reshape(-1) if self.ravel else out

    def predict_proba(self, raw: np.ndarray) -> np.ndarray:
        """Class probabilities ``(N, n_classes)``, as the estimator's ``predict_proba``."""
        self.require(("classifier",), "predict_proba")
        if self.output is None:
            raise DeploymentError("This classifier has no predict_proba (no probability output).")
        from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS

        return OUTPUT_FUNCTIONS[self.output](raw)

    def decision_function(self, raw: np.ndarray) -> np.ndarray:
        """Decision values, as the estimator's ``decision_function``."""
        self.require(("classifier",), "decision_function")
        if not self.has_decision_function:
            raise DeploymentError("This classifier has no decision_function.")
        return raw[:, 0] if raw.shape[1] == 1 else raw

    def outputs(self, raw: np.ndarray) -> np.ndarray:
        """The default decoding: a module's float outputs as they are; a regressor's
        predictions; a classifier's probabilities (or, without them, its decision values)."""
        if self.task == "module":
            return raw
        if self.task == "regressor":
            return self.predict(raw)
        if self.output is not None:
            return self.predict_proba(raw)
        return raw[:, 0] if raw.shape[1] == 1 else raw


def _attribute(estimator: Any, name: str) -> Any:
    if not hasattr(estimator, name):
        raise DeploymentError(
            f"{type(estimator).__name__} has no attribute {name!r}: FHEModelDev saves fitted "
            "fhe_quant estimators (classes_, _output, _ravel, quantized_module_)."
        )
    return getattr(estimator, name)


def _estimator_output(estimator: Any) -> tuple[str | None, bool]:
    """``(_output, _ravel)`` of an estimator; the QAT estimators, which decode with a
    softmax (classifier) or an identity (regressor), do not set ``_output``."""
    if hasattr(estimator, "_output"):
        return estimator._output, bool(getattr(estimator, "_ravel", False))
    from fhe_quant import qat

    if isinstance(estimator, qat.NeuralNetClassifier):
        return "softmax", False
    if isinstance(estimator, qat.NeuralNetRegressor):
        return None, bool(_attribute(estimator, "_ravel"))
    _attribute(estimator, "_output")  # raises, naming the attribute
    raise AssertionError("unreachable")


def _check_client(model: Any, module: QuantizedModule, processing: _ClientProcessing) -> None:
    """Refuse to save a client that would not reproduce the model: on random inputs, in
    clear, the client's quantization must equal the module's, and its decoding of the
    module's integer outputs must equal the module's ``forward`` (a module) or the
    estimator's own ``predict`` (and ``predict_proba``, ``decision_function``).

    ``processing`` is the client as loaded back from its saved files, so the JSON round
    trip is checked too.
    """
    rng = np.random.default_rng(0)
    x = rng.normal(scale=3.0, size=(16, *module.input_shape))
    name = type(model).__name__
    if not np.array_equal(processing.quantize(x), module.quantize_input(x)):
        raise DeploymentError(
            f"The saved input quantization of {name} does not reproduce the model's: the "
            "artifact would encrypt wrong inputs, so it is not saved. Please report this."
        )
    acc = module.forward_integers(x)
    post = processing.post_processing
    if post.task == "module":
        checks = [("forward", module.forward(x), processing.dequantize(acc))]
    else:
        raw = processing.raw(acc)
        methods = ["predict"]
        if post.task == "classifier" and post.output is not None:
            methods.append("predict_proba")
        if post.task == "classifier" and post.has_decision_function:
            methods.append("decision_function")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            checks = [(m, getattr(model, m)(x), getattr(post, m)(raw)) for m in methods]
    for method, expected, got in checks:
        expected, got = np.asarray(expected), np.asarray(got)
        if expected.dtype.kind in "fc" or got.dtype.kind in "fc":
            # NOTE: the same float operations on the same integers: equal but for rounding
            # in a reimplementation; inf (an overflowing link) compares equal to inf.
            same = expected.shape == got.shape and np.allclose(
                expected, got, rtol=1e-12, atol=0, equal_nan=True
            )
        else:
            same = expected.shape == got.shape and np.array_equal(expected, got)
        if not same:
            raise DeploymentError(
                f"The client-side {method} of {name} (from classes_, _output, _ravel and "
                "the output dequantization) does not reproduce the model's own: the artifact "
                "would decode wrongly, so it is not saved. Please report this."
            )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def artifact_info(path: str | Path, verify_key: Any | None = None) -> dict[str, Any]:
    """What a saved client artifact holds: manifest, input format, statistics, program.

    Checks the manifest (version, files, checksums, and the signature when
    ``verify_key`` is given) first, like :class:`FHEModelClient`; ``"signature"`` says
    ``"verified"``, ``"not checked"`` (signed, no key given) or ``"unsigned"``.

    Raises:
        DeploymentError: naming the file and what is wrong.
    """
    directory = Path(path)
    artifact = _check_manifest(directory, "client", verify_key, warn=False)
    _ClientProcessing.from_artifact(artifact)  # refuses a malformed model.json
    model = artifact.json("model.json")
    report = artifact.json("report.json")
    if not isinstance(report, dict) or not isinstance(report.get("statistics"), dict):
        raise DeploymentError(f"{artifact.where('report.json')} must hold 'statistics'.")
    post = model["post_processing"]
    if artifact.signed:
        signature = "verified"
    else:
        signature = "not checked" if (directory / _SIGNATURE).exists() else "unsigned"
    return {
        "manifest": artifact.manifest,
        "signature": signature,
        "input_shape": model["input_shape"],
        "input_bits": model["input_quantizer"]["bits"],
        "client_pre_processing": [n["op"] for n in model["pre"]],
        "client_post_processing": [n["op"] for n in model["post"]],
        "task": post["task"],
        "classes": (post.get("classes") or {}).get("values"),
        "output_function": post.get("output"),
        **report,
    }


# ------------------------------------------------------------------ the server's circuit as data

#: The compilation options a server artifact carries (``circuit.json``), by type; the
#: server rebuilds its ``fhe.Configuration`` from these and nothing else.
_BOOL_OPTIONS = (
    "loop_parallelize",
    "dataflow_parallelize",
    "auto_parallelize",
    "compress_evaluation_keys",
    "compress_input_ciphertexts",
    "composable",
    "enable_tlu_fusing",
)
_ENUM_OPTIONS = {
    "parameter_selection_strategy": _configuration_module.ParameterSelectionStrategy,
    "multi_parameter_strategy": _configuration_module.MultiParameterStrategy,
    "security_level": _configuration_module.SecurityLevel,
}
#: MLIR operations a server circuit may hold: FHE arithmetic on tensors. Anything else (a
#: call, a declaration of an outside function, LLVM or runtime operations) is refused.
_MLIR_DIALECTS = ("FHE.", "FHELinalg.", "tensor.", "arith.", "linalg.", "scf.")
_MLIR_OPS = frozenset({"builtin.module", "func.func", "func.return"})
_FUNC_ATTRIBUTES = frozenset({"function_type", "sym_name", "arg_attrs", "res_attrs"})


def _circuit_options(server: Any) -> dict[str, Any]:
    """The compilation options of a compiled Concrete server, as JSON-safe data.

    Raises:
        DeploymentError: options this artifact format cannot carry (a GPU backend,
            keyset/range restrictions, composition rules).
    """
    config = server._configuration
    if config is None or server._mlir is None:
        raise DeploymentError("This circuit has no MLIR to save (it was loaded, not compiled).")
    if config.use_gpu or config.keyset_restriction or config.range_restriction:
        raise DeploymentError(
            "Saving a circuit compiled for the GPU or with keyset/range restrictions is not "
            "supported; compile it with the default configuration."
        )
    if server._composition_rules:
        raise DeploymentError("Saving a circuit with composition rules is not supported.")
    options: dict[str, Any] = {k: bool(getattr(config, k)) for k in _BOOL_OPTIONS}
    for key in ("p_error", "global_p_error"):
        value = getattr(config, key)
        options[key] = None if value is None else float(value)
    for key in _ENUM_OPTIONS:
        options[key] = getattr(config, key).value
    return options


def _configuration(options: Any, where: Path) -> Any:
    """Rebuild an ``fhe.Configuration`` from :func:`_circuit_options` data, checking
    every key and type.

    Raises:
        DeploymentError: naming ``where``.
    """
    expected = {*_BOOL_OPTIONS, "p_error", "global_p_error", *_ENUM_OPTIONS}
    if not isinstance(options, dict) or set(options) != expected:
        keys = sorted(options) if isinstance(options, dict) else type(options).__name__
        raise DeploymentError(
            f"{where}: 'options' must have exactly {sorted(expected)}; got {keys}."
        )
    kwargs: dict[str, Any] = {}
    for key in _BOOL_OPTIONS:
        if not isinstance(options[key], bool):
            raise DeploymentError(f"{where}: option {key!r} must be true or false.")
        kwargs[key] = options[key]
    for key in ("p_error", "global_p_error"):
        value = options[key]
        if value is not None and (not isinstance(value, float) or not 0 < value <= 1):
            raise DeploymentError(f"{where}: option {key!r} must be null or a float in (0, 1].")
        kwargs[key] = value
    for key, enum in _ENUM_OPTIONS.items():
        try:
            kwargs[key] = enum(options[key])
        except (ValueError, TypeError):
            allowed = [m.value for m in enum]
            raise DeploymentError(f"{where}: option {key!r} must be one of {allowed}.") from None
    return fhe.Configuration(show_progress=False, verbose=False, **kwargs)


def _program_digest(server: Any) -> str:
    """SHA-256 of the circuit's keys and encodings (what a client's keys must match)."""
    specs = json.loads(server.client_specs.serialize())
    canonical = {"keyset": specs["keyset"], "circuits": specs["circuits"]}
    return _sha256_bytes(json.dumps(canonical, sort_keys=True).encode())


def _check_mlir(text: str, where: Path) -> None:
    """Refuse MLIR that is not plain FHE arithmetic (see :data:`_MLIR_DIALECTS`).

    Raises:
        DeploymentError: it does not parse, or holds another operation.
    """
    import concrete.lang
    from mlir.ir import Context, Module

    with Context() as context:
        concrete.lang.register_dialects(context)
        try:
            module = Module.parse(text)
        except Exception:  # the bindings raise ValueError or MLIRError
            raise DeploymentError(f"{where} is not valid MLIR for Concrete.") from None
        stack = [module.operation]
        while stack:
            op = stack.pop()
            name = op.name
            if name not in _MLIR_OPS and not name.startswith(_MLIR_DIALECTS):
                raise DeploymentError(f"{where}: operation {name!r} is not allowed in a circuit.")
            attributes = {a.name for a in op.attributes}
            if name == "func.func" and (
                not attributes <= _FUNC_ATTRIBUTES or not op.regions[0].blocks
            ):
                raise DeploymentError(
                    f"{where}: a function must be a plain definition; got attributes "
                    f"{sorted(attributes)} (declarations and visibility are not allowed)."
                )
            for region in op.regions:
                for block in region.blocks:
                    stack.extend(o.operation for o in block.operations)


def _save_circuit(server: Any, directory: Path) -> list[str]:
    """Write a compiled server as data: its MLIR and our JSON of its options."""
    (directory / "circuit.mlir").write_text(server._mlir, encoding="utf-8")
    circuit = {
        "concrete_python": fhe.__version__,
        "options": _circuit_options(server),
        "program_sha256": _program_digest(server),
    }
    (directory / "circuit.json").write_text(json.dumps(circuit, indent=2))
    return ["circuit.mlir", "circuit.json"]


def _default_cache_dir() -> Path:
    env = os.environ.get("FHE_QUANT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fhe_quant" / "circuits"


def _private_dir(path: Path) -> Path:
    """``path``, created ``0700`` if missing; refused unless it is ours and private."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if (
        not stat.S_ISDIR(info.st_mode)
        or info.st_uid != os.getuid()
        or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    ):
        raise DeploymentError(
            f"The circuit cache {path} must be a directory owned by this user and writable "
            "by no one else (compiled circuits are loaded from it)."
        )
    return path


def _circuit_key(mlir: str, options: dict[str, Any]) -> str:
    """The cache key of a compiled circuit: what goes into the compilation."""
    canonical = json.dumps({"concrete": fhe.__version__, "options": options}, sort_keys=True)
    return _sha256_bytes(b"fhe_quant circuit 1\0" + canonical.encode() + b"\0" + mlir.encode())


def _compile_circuit(mlir: str, configuration: Any, where: Path) -> tuple[Any, Path]:
    """Compile checked MLIR; returns the server and Concrete's output directory."""
    try:
        server = fhe.Server.create(mlir, configuration)
    except Exception as exc:  # Concrete raises RuntimeError and others
        raise DeploymentError(f"{where}: Concrete cannot compile this circuit: {exc}") from None
    return server, Path(server._library.get_output_dir_path())


def _cached_library(mlir: str, configuration: Any, key: str, cache: Path, where: Path) -> Any:
    """Concrete's library for the circuit from ``cache/key``, compiled there if missing."""
    from concrete.compiler import Library

    entry = cache / key
    if not entry.is_dir():
        _, out = _compile_circuit(mlir, configuration, where)
        staging = cache / f".{key}.{os.getpid()}.{threading.get_ident()}"
        try:
            shutil.copytree(out, staging)
            os.chmod(staging, 0o700)
            try:
                os.rename(staging, entry)
            except OSError:  # another process cached it first
                pass
        finally:
            shutil.rmtree(out, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
    _private_dir(entry)
    return Library(str(entry))


def _load_circuit(
    artifact: _Artifact, cache_dir: str | Path | None, cache: bool
) -> tuple[Any, Path | None]:
    """The server's circuit, rebuilt from the artifact's MLIR and options (never from a
    shipped library); returns it and the temporary directory it owns (no cache)."""
    where = artifact.where("circuit.json")
    circuit = artifact.json("circuit.json")
    keys = {"concrete_python", "options", "program_sha256"}
    if not isinstance(circuit, dict) or set(circuit) != keys:
        raise DeploymentError(f"{where} must be a JSON object with exactly {sorted(keys)}.")
    if not all(isinstance(circuit[k], str) for k in ("concrete_python", "program_sha256")):
        raise DeploymentError(f"{where}: 'concrete_python' and 'program_sha256' must be strings.")
    configuration = _configuration(circuit["options"], where)
    mlir = artifact.text("circuit.mlir")
    _check_mlir(mlir, artifact.where("circuit.mlir"))
    owned = None
    if cache:
        directory = _private_dir(Path(cache_dir) if cache_dir is not None else _default_cache_dir())
        key = _circuit_key(mlir, circuit["options"])
        library = _cached_library(mlir, configuration, key, directory, where)
        server = fhe.Server(library, False, None)
    else:
        server, owned = _compile_circuit(mlir, configuration, where)
    if _program_digest(server) != circuit["program_sha256"]:
        if owned is not None:
            shutil.rmtree(owned, ignore_errors=True)
        raise DeploymentError(
            f"{where}: the circuit compiled here (concrete-python {fhe.__version__}) has other "
            f"keys or encodings than the one saved (concrete-python {circuit['concrete_python']}"
            "): clients' keys would not match. Re-export the model with this version."
        )
    return server, owned


# ------------------------------------------------------------------ the three roles


def _resolve(model: Any) -> tuple[QuantizedModule, PostProcessing | None]:
    """The compiled module of ``model`` and, for an estimator, its post-processing
    (``None`` until checked against the estimator)."""
    if isinstance(model, QuantizedModule):
        return model, None
    module = getattr(model, "quantized_module_", None)
    if isinstance(module, QuantizedModule):
        return module, None
    hint = (
        " Fit it first, then call compile(X)."
        if hasattr(model, "fit") and hasattr(model, "get_params")
        else " For a torch module, compile it first with fhe_quant.torch.compile_torch_model "
        "(or compile_qat_model for a QAT module)."
    )
    raise DeploymentError(
        "FHEModelDev saves a compiled model: a QuantizedModule (compile_torch_model, "
        "compile_qat_model) or a fitted and compiled fhe_quant estimator (with "
        f"quantized_module_). Got {type(model).__name__} instead.{hint}"
    )


class FHEModelDev:
    """Saves a compiled model as a client directory and a server directory.

    Args:
        path: directory to create (``path/client`` and ``path/server`` are written).
        model: a compiled :class:`~fhe_quant.model.QuantizedModule` (torch PTQ or QAT),
            or a fitted and compiled fhe_quant scikit-learn estimator (linear models,
            MLPs, ``NeuralNetClassifier``/``Regressor``, and any estimator with
            ``classes_``, ``_output``, ``_ravel`` and ``quantized_module_``). For an
            estimator, the client's :meth:`FHEModelClient.predict` and
            :meth:`~FHEModelClient.predict_proba` decode the results as its own
            ``predict``/``predict_proba`` do; this is checked before saving.

    Raises:
        DeploymentError: ``model`` is none of these (at construction).
    """

    def __init__(self, path: str | Path, model: Any) -> None:
        self.path = Path(path)
        self.model = model
        self.module, _ = _resolve(model)

    def _client_processing(self) -> _ClientProcessing:
        """The client's processing, checked against the model after a save/load trip."""
        if isinstance(self.model, QuantizedModule):
            post = PostProcessing("module")
        else:
            post = PostProcessing.from_estimator(self.model)
        processing = _ClientProcessing.from_model(self.module, post)
        with tempfile.TemporaryDirectory() as scratch:
            processing.save(Path(scratch))
            _check_client(self.model, self.module, _ClientProcessing.load(Path(scratch)))
        return processing

    def save(self, signing_key: Any | None = None) -> None:
        """Write the artifacts; refuses to overwrite existing ones.

        Args:
            signing_key: the model owner's Ed25519 private key (a key object, PEM bytes
                or a PEM file path, see :mod:`fhe_quant.signing`): each directory's
                manifest is then signed (``manifest.sig``), and loaders given the
                matching ``verify_key`` refuse any other. ``None``: unsigned.

        Raises:
            NotCompiledError: the model has no circuit yet.
            DeploymentError: an artifact exists there already, the signing key cannot be
                read, or the saved client would not quantize or decode exactly as the
                model does (checked in clear on random inputs before anything is written).
        """
        circuit = self.module.circuit  # raises NotCompiledError if not compiled
        key = None
        if signing_key is not None:
            from fhe_quant import signing

            key = signing.load_signing_key(signing_key)
        processing = self._client_processing()
        circuit_options = _circuit_options(circuit.server)  # refuses what it cannot carry
        del circuit_options
        client_dir, server_dir = self.path / "client", self.path / "server"
        for directory in (client_dir, server_dir):
            if (directory / _MANIFEST).exists():
                raise DeploymentError(f"{directory} already holds an artifact; remove it first.")
            directory.mkdir(parents=True, exist_ok=True)
        _write_manifest(server_dir, "server", _save_circuit(circuit.server, server_dir), key)
        circuit.client.save(client_dir / "client.zip")
        _fix_zip_times(client_dir / "client.zip")
        files = ["client.zip", *processing.save(client_dir)]
        summary = {
            "statistics": _untimed(_jsonable(self.module.statistics)),
            "program": self.module.program.source(),
        }
        (client_dir / "report.json").write_text(json.dumps(summary, indent=2))
        files.append("report.json")
        _write_manifest(client_dir, "client", files, key)


#: The date every member of a saved zip archive gets (the earliest a zip can hold), so
#: that saving the same model twice writes the same bytes and the same signatures.
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


def _fix_zip_times(path: Path) -> None:
    """Rewrite the zip archive at ``path`` with every member dated :data:`_ZIP_DATE`
    (Concrete stamps the time of saving); names, contents, compression and
    permissions are unchanged."""
    with zipfile.ZipFile(path) as archive:
        members = [(info, archive.read(info)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for info, data in members:
            fixed = zipfile.ZipInfo(info.filename, date_time=_ZIP_DATE)
            fixed.compress_type = info.compress_type
            fixed.external_attr = info.external_attr
            fixed.create_system = info.create_system
            archive.writestr(fixed, data)


def _untimed(statistics: dict[str, Any]) -> dict[str, Any]:
    """The statistics without their timings (``compile_seconds``, ``keygen_seconds``):
    they differ from one build to the next, and a signed artifact must not.

    Examples:
        >>> _untimed({"pbs_count": 3, "compile_seconds": 1.2, "keygen_seconds": None})
        {'pbs_count': 3}
    """
    return {k: v for k, v in statistics.items() if not k.endswith("_seconds")}


def _key_directory(key_dir: str | Path | None) -> Path | None:
    """``key_dir``, created ``0700`` (an existing one of ours is made ``0700``)."""
    if key_dir is None:
        return None
    path = Path(key_dir)
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.stat(path).st_uid == os.getuid():
            os.chmod(path, 0o700)
    except OSError as exc:
        raise DeploymentError(f"Cannot use the key directory {path}: {exc.strerror}.") from None
    return path


def _protect_keys(key_dir: Path | None) -> None:
    """Make every file Concrete wrote under ``key_dir`` ``0600`` (directories ``0700``)."""
    if key_dir is None:
        return
    for root, dirs, files in os.walk(key_dir):
        for name in dirs:
            os.chmod(Path(root) / name, 0o700)
        for name in files:
            os.chmod(Path(root) / name, 0o600)


def _client_specs(artifact: _Artifact) -> Any:
    """Concrete's client specs from the checked bytes of ``client.zip`` (never unpacked
    to disk)."""
    where = artifact.where("client.zip")
    try:
        with zipfile.ZipFile(io.BytesIO(artifact.files["client.zip"])) as archive:
            names = archive.namelist()
            data = archive.read("client.specs.json") if names == ["client.specs.json"] else None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise DeploymentError(f"{where} is not a readable zip archive: {exc}") from None
    if data is None:
        raise DeploymentError(f"{where} must hold client.specs.json only; got {names[:5]}.")
    try:
        return fhe.ClientSpecs.deserialize(data)
    except Exception as exc:  # Concrete's C++ parser raises RuntimeError and others
        raise DeploymentError(f"{where}: client.specs.json cannot be read: {exc}") from None


class FHEModelClient:
    """The user's side: keys, quantization, encryption, decryption.

    Args:
        path: the ``client`` directory written by :class:`FHEModelDev`.
        key_dir: where secret and evaluation keys are kept (created ``0700`` if missing,
            key files ``0600``); keys found there are reused. ``None`` keeps them in
            memory only.
        verify_key: the model owner's Ed25519 public key (key object, PEM or raw bytes,
            or a PEM file path): the artifact is refused unless its manifest is signed
            by it. ``None``: not checked, with an
            :class:`~fhe_quant.errors.UnauthenticatedArtifactWarning`.

    Raises:
        DeploymentError: the artifact is not a valid client artifact (naming the file and
            what is wrong), or is unsigned or wrongly signed when ``verify_key`` is given.
    """

    def __init__(
        self,
        path: str | Path,
        key_dir: str | Path | None = None,
        *,
        verify_key: Any | None = None,
    ) -> None:
        self.path = Path(path)
        artifact = _check_manifest(self.path, "client", verify_key)
        self.signed = artifact.signed
        self.processing = _ClientProcessing.from_artifact(artifact)
        self.key_dir = _key_directory(key_dir)
        self.client = fhe.Client(_client_specs(artifact), keyset_cache_directory=self.key_dir)
        self._nonce = self._client_nonce()
        self._key_message: bytes | None = None
        self._key_id: bytes | None = None

    def _client_nonce(self) -> bytes:
        if self.key_dir is None:
            return os.urandom(_NONCE)
        path = self.key_dir / "client_nonce"
        if not path.is_file():
            from fhe_quant.signing import write_private_file

            write_private_file(path, os.urandom(_NONCE))
        nonce = path.read_bytes()
        if len(nonce) != _NONCE:
            raise DeploymentError(f"{path} is corrupted ({len(nonce)} bytes, expected {_NONCE}).")
        return nonce

    @property
    def key_id(self) -> bytes:
        """SHA-256 of this client's evaluation-key message: names its keys."""
        # NOTE: computed once: a network's key message is hundreds of MB.
        if self._key_id is None:
            self._key_id = hashlib.sha256(self.get_serialized_evaluation_keys()).digest()
        return self._key_id

    def generate_private_and_evaluation_keys(
        self, force: bool = False, *, verbose: bool = False
    ) -> None:
        """Generate keys (or load them from ``key_dir``); ``force`` makes new ones;
        ``verbose`` lets Concrete's native key-cache messages through."""
        with fhe_native_output(verbose):
            self.client.keygen(force=force)
        _protect_keys(self.key_dir)
        if force:
            self._key_message = self._key_id = None

    def get_serialized_evaluation_keys(self) -> bytes:
        """The public evaluation keys (with this client's nonce), to send to the server."""
        if self._key_message is None:
            keys = self.client.evaluation_keys.serialize()
            _protect_keys(self.key_dir)
            self._key_message = MESSAGE_MAGIC + self._nonce + keys
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

    @property
    def post_processing(self) -> PostProcessing:
        """What the artifact's model is (``task``) and how its outputs are decoded."""
        return self.processing.post_processing

    def deserialize_decrypt_dequantize(self, results: list[bytes]) -> np.ndarray:
        """The server's results, decrypted, dequantized and post-processed.

        * a torch or QAT module: its float outputs, as its ``forward``;
        * a regressor: its predictions (inverse link applied), as its ``predict``;
        * a classifier: its probabilities, as its ``predict_proba``, or its decision
          values for a classifier without probabilities.

        Use :meth:`predict`, :meth:`predict_proba` and :meth:`decision_function` for a
        given one.
        """
        acc = self.deserialize_decrypt(results)
        if self.post_processing.task == "module":
            return self.processing.dequantize(acc)
        return self.post_processing.outputs(self.processing.raw(acc))

    def predict(self, results: list[bytes]) -> np.ndarray:
        """Labels (a classifier's ``classes_``) or predictions of the server's results,
        equal to the estimator's ``predict`` on the same inputs.

        Raises:
            DeploymentError: the artifact holds a torch/QAT module (no labels).
        """
        self.post_processing.require(("classifier", "regressor"), "predict")
        return self.post_processing.predict(self.processing.raw(self.deserialize_decrypt(results)))

    def predict_proba(self, results: list[bytes]) -> np.ndarray:
        """Class probabilities, equal to the estimator's ``predict_proba``.

        Raises:
            DeploymentError: not a classifier, or one without probabilities.
        """
        self.post_processing.require(("classifier",), "predict_proba")
        raw = self.processing.raw(self.deserialize_decrypt(results))
        return self.post_processing.predict_proba(raw)

    def decision_function(self, results: list[bytes]) -> np.ndarray:
        """Decision values, equal to the estimator's ``decision_function``."""
        self.post_processing.require(("classifier",), "decision_function")
        raw = self.processing.raw(self.deserialize_decrypt(results))
        return self.post_processing.decision_function(raw)


class FHEModelServer:
    """The untrusted side: runs the circuit on ciphertexts with evaluation keys.

    Args:
        path: the ``server`` directory written by :class:`FHEModelDev`.
        key_cache_size: how many clients' deserialized evaluation keys to keep between
            calls (the most recently used). Hashing and deserializing a network's keys
            (hundreds of MB) costs about a second, paid once per client instead of once
            per request; each cached entry holds that much memory. Thread-safe.
        verify_key: the model owner's Ed25519 public key (see :class:`FHEModelClient`):
            the artifact is refused unless signed by it. ``None``: not checked, with an
            :class:`~fhe_quant.errors.UnauthenticatedArtifactWarning`.
        cache_dir: where compiled circuits are kept, by the SHA-256 of their MLIR and
            options (default: ``$FHE_QUANT_CACHE_DIR``, else
            ``~/.cache/fhe_quant/circuits``); it must be private to this user.
        cache: ``False`` compiles into a temporary directory removed by :meth:`close`.

    The artifact holds the circuit as data (Concrete's MLIR, checked to be FHE arithmetic
    only, and its compilation options as JSON): the server compiles it on the first load
    and reuses the compiled library from ``cache_dir`` afterwards; no library, pickle or
    jsonpickle from the artifact is ever loaded. Use it as a context manager, or call
    :meth:`close`, to release it (temporary directories are also removed at exit).

    Raises:
        DeploymentError: the artifact is not a valid server artifact (naming the file and
            what is wrong), is unsigned or wrongly signed when ``verify_key`` is given, or
            does not compile to the circuit that was saved.
    """

    def __init__(
        self,
        path: str | Path,
        key_cache_size: int = 2,
        *,
        verify_key: Any | None = None,
        cache_dir: str | Path | None = None,
        cache: bool = True,
    ) -> None:
        if key_cache_size < 0:
            raise ValueError(f"key_cache_size must be >= 0; got {key_cache_size}.")
        self.path = Path(path)
        artifact = _check_manifest(self.path, "server", verify_key)
        self.signed = artifact.signed
        self.server, owned = _load_circuit(artifact, cache_dir, cache)
        self._cleanup = weakref.finalize(
            self, shutil.rmtree, str(owned) if owned else "", ignore_errors=True
        )
        if owned is None:
            self._cleanup.detach()
        self.key_cache_size = key_cache_size
        # NOTE: keyed by the identity of the key message, which the entry keeps alive (so
        # the identity cannot be reused by another object while it is cached).
        self._key_cache: OrderedDict[int, list[Any]] = OrderedDict()
        self._lock = threading.Lock()

    def close(self) -> None:
        """Release the circuit and remove the temporary directory it was compiled in (if
        any); the server cannot run afterwards. Idempotent."""
        self.server = None
        self._key_cache.clear()
        self._cleanup()

    def __enter__(self) -> FHEModelServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _cached(self, message: bytes) -> list[Any]:
        """The cache entry ``[message, key id, deserialized keys or None]`` of a key
        message, created (with its SHA-256) if missing."""
        with self._lock:
            entry = self._key_cache.get(id(message))
            if entry is not None and entry[0] is message:
                self._key_cache.move_to_end(id(message))
                return entry
        entry = [message, hashlib.sha256(message).digest(), None]
        if self.key_cache_size:
            with self._lock:
                self._key_cache[id(message)] = entry
                while len(self._key_cache) > self.key_cache_size:
                    self._key_cache.popitem(last=False)
        return entry

    def run(self, serialized_input: bytes, serialized_evaluation_keys: bytes) -> bytes:
        """Run on one serialized encrypted sample; returns the serialized result."""
        if self.server is None:
            raise DeploymentError(f"The server of {self.path} was closed.")
        if not is_fhe_quant_message(serialized_evaluation_keys):
            raise DeploymentError("The evaluation keys are not an fhe_quant key message.")
        entry = self._cached(serialized_evaluation_keys)
        payload = _open(serialized_input, entry[1], "input")
        try:
            value = fhe.Value.deserialize(payload)
        except Exception as exc:
            raise DeploymentError(f"The input is not a serialized ciphertext: {exc}") from None
        if entry[2] is None:
            try:
                message = serialized_evaluation_keys[len(MESSAGE_MAGIC) + _NONCE :]
                entry[2] = fhe.EvaluationKeys.deserialize(message)
            except Exception as exc:
                raise DeploymentError(f"The evaluation keys cannot be read: {exc}") from None
        key_id, keys = entry[1], entry[2]
        try:
            result = self.server.run(value, evaluation_keys=keys)
        except Exception as exc:
            raise DeploymentError(f"The server could not run this input: {exc}") from None
        return _seal(key_id, result.serialize())
