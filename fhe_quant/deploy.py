"""Client/server deployment of a compiled model.

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
import hashlib
import json
import os
import tempfile
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fhe_quant import __version__
from fhe_quant.errors import DeploymentError, InputError
from fhe_quant.ir import Node
from fhe_quant.model import QuantizedModule, run_chain
from fhe_quant.process import import_concrete
from fhe_quant.quant.ptq import check_calibration_data
from fhe_quant.quant.quantizer import UniformQuantizer

fhe = import_concrete()

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
#: estimators' post-processing (``post_processing`` in ``model.json``).
FORMAT_VERSION = 2
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
            "input_quantizer": self.input_quantizer.to_dict(),
            "pre": [_node_to_json(n, arrays, "pre") for n in self.pre],
            "post": [_node_to_json(n, arrays, "post") for n in self.post],
            "post_processing": self.post_processing.to_dict(),
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
            PostProcessing.from_dict(data["post_processing"]),
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
        "task": model["post_processing"]["task"],
        "classes": (model["post_processing"]["classes"] or {}).get("values"),
        "output_function": model["post_processing"]["output"],
        **report,
    }


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

    def save(self) -> None:
        """Write the artifacts; refuses to overwrite existing ones.

        Raises:
            NotCompiledError: the model has no circuit yet.
            DeploymentError: an artifact exists there already, or the saved client would
                not quantize or decode exactly as the model does (checked in clear on
                random inputs before anything is written).
        """
        circuit = self.module.circuit  # raises NotCompiledError if not compiled
        processing = self._client_processing()
        client_dir, server_dir = self.path / "client", self.path / "server"
        for directory in (client_dir, server_dir):
            if (directory / _MANIFEST).exists():
                raise DeploymentError(f"{directory} already holds an artifact; remove it first.")
            directory.mkdir(parents=True, exist_ok=True)
        circuit.server.save(server_dir / "server.zip")
        _write_manifest(server_dir, "server", ["server.zip"])
        circuit.client.save(client_dir / "client.zip")
        files = ["client.zip", *processing.save(client_dir)]
        summary = {
            "statistics": _jsonable(self.module.statistics),
            "program": self.module.program.source(),
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
        self._key_id: bytes | None = None

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
        # NOTE: computed once: a network's key message is hundreds of MB.
        if self._key_id is None:
            self._key_id = hashlib.sha256(self.get_serialized_evaluation_keys()).digest()
        return self._key_id

    def generate_private_and_evaluation_keys(self, force: bool = False) -> None:
        """Generate keys (or load them from ``key_dir``); ``force`` makes new ones."""
        self.client.keygen(force=force)
        if force:
            self._key_message = self._key_id = None

    def get_serialized_evaluation_keys(self) -> bytes:
        """The public evaluation keys (with this client's nonce), to send to the server."""
        if self._key_message is None:
            keys = self.client.evaluation_keys.serialize()
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
    """

    def __init__(self, path: str | Path, key_cache_size: int = 2) -> None:
        if key_cache_size < 0:
            raise ValueError(f"key_cache_size must be >= 0; got {key_cache_size}.")
        self.path = Path(path)
        _check_manifest(self.path, "server")
        self.server = fhe.Server.load(self.path / "server.zip")
        self.key_cache_size = key_cache_size
        # NOTE: keyed by the identity of the key message, which the entry keeps alive (so
        # the identity cannot be reused by another object while it is cached).
        self._key_cache: OrderedDict[int, list[Any]] = OrderedDict()
        self._lock = threading.Lock()

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
