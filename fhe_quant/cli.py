"""The ``fhe-quant`` command line.

* ``fhe-quant report``: quantize a PyTorch model (a module class named by its import path
  plus a ``torch.save``'d state dict) on calibration data from a ``.npy`` file, compile
  it, and print its report: accuracy in clear, quantized and simulated FHE (when labels
  are given), bits per layer and PBS count.
* ``fhe-quant compile``: the same for a PyTorch model or a trained scikit-learn
  estimator, then write the deployment directory (``OUT/client``, ``OUT/server``).
* ``fhe-quant info``: describe a saved client directory (and check its signature).
* ``fhe-quant keygen-signing``: make an Ed25519 key pair to sign artifacts with.
* ``fhe-quant serve``: serve a server directory (FastAPI, key store, Dask workers).
* ``fhe-quant predict``: encrypt ``.npy``/``.csv`` inputs, run them on a service in
  batches, decrypt; resumable when writing ``--out``.

Run ``fhe-quant <command> --help`` for each command's options.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fhe_quant import __version__
from fhe_quant.errors import FHEQuantError, InputError, ParameterError

__all__ = ["main", "build_parser"]

#: File suffixes ``--sklearn`` reads with joblib (which unpickles: trusted files only).
_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")


def _import_object(spec: str, option: str) -> Any:
    """The object named ``'package.module:Name'`` (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ParameterError(
            f"{option} must look like 'package.module:Name'; got {spec!r} instead."
        )
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, ".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ParameterError(
            f"{option} {spec!r}: cannot import module {module_name!r} ({exc}). Run from the "
            "directory that holds it, or install its package."
        ) from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ParameterError(
            f"{option} {spec!r}: module {module_name!r} has no attribute {attr!r}."
        ) from None


def _parse_kwargs(items: Sequence[str]) -> dict[str, Any]:
    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--kwarg must look like key=value; got {item!r} instead.")
        parsed[key] = int(value) if value.lstrip("-").isdigit() else value
    return parsed


def _existing_file(path: str, option: str) -> Path:
    file = Path(path)
    if not file.is_file():
        raise InputError(f"{option}: no such file {path!r}.")
    return file


def _load_array(path: str, option: str) -> np.ndarray:
    file = _existing_file(path, option)
    try:
        return np.load(file, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise InputError(f"{option}: {path!r} is not a NumPy .npy array ({exc}).") from None


def _load_module(spec: str, state: str | None, kwargs: Sequence[str], option: str) -> Any:
    import torch

    factory = _import_object(spec, option)
    model = factory(**_parse_kwargs(kwargs))
    if not isinstance(model, torch.nn.Module):
        raise ParameterError(
            f"{option} {spec!r} returned a {type(model).__name__}, not a torch.nn.Module."
        )
    if state:
        file = _existing_file(state, "--state")
        # NOTE: weights_only=True reads tensors only: no code from the file runs.
        try:
            loaded = torch.load(file, weights_only=True)
        except Exception as exc:
            raise InputError(f"--state: cannot read {state!r} as a state dict ({exc}).") from None
        try:
            model.load_state_dict(loaded)
        except (RuntimeError, TypeError, AttributeError) as exc:
            raise InputError(f"--state {state!r} does not fit {spec!r}: {exc}") from None
    return model.eval()


def _load_estimator(spec: str, kwargs: Sequence[str]) -> Any:
    """A trained estimator from a joblib/pickle file or from a factory function."""
    if spec.endswith(_PICKLE_SUFFIXES):
        import joblib

        file = _existing_file(spec, "--sklearn")
        # NOTE: unpickling runs code from the file: it must be the user's own, trusted
        # file. Deployment artifacts never use pickle; this is only the model's input.
        return joblib.load(file)
    return _import_object(spec, "--sklearn")(**_parse_kwargs(kwargs))


def _report(args: argparse.Namespace) -> int:
    from fhe_quant.torch import compile_torch_model

    model = _load_module(args.module, args.state, args.kwarg, "--module")
    x = _load_array(args.calib, "--calib")
    qm = compile_torch_model(
        model, x, n_bits=args.n_bits, rounding_bits=args.rounding_bits, verbose=not args.quiet
    )
    x_eval = _load_array(args.data, "--data") if args.data else x
    y = _load_array(args.labels, "--labels") if args.labels else None
    report = qm.report(
        x_eval if y is not None else None, y, fhe="disable" if args.no_simulate else "simulate"
    )
    print(report)
    if args.program:
        print("\n" + report.program)
    return 0


def _compile_sklearn(args: argparse.Namespace, x: np.ndarray) -> Any:
    from fhe_quant.sklearn import from_sklearn

    estimator = _load_estimator(args.sklearn, args.kwarg)
    if hasattr(estimator, "quantized_module_"):  # an fhe_quant estimator, already fitted
        if args.n_bits is not None or args.rounding_bits is not None:
            raise ParameterError(
                f"--sklearn {args.sklearn!r} is an fhe_quant {type(estimator).__name__}, "
                "already quantized: drop --n-bits/--rounding-bits (set them when fitting it)."
            )
        model = estimator
        if args.p_error is not None:
            model.set_params(p_error=args.p_error)
    else:
        model = from_sklearn(
            estimator,
            x,
            n_bits=args.n_bits,
            rounding_bits=args.rounding_bits,
            p_error=args.p_error,
            verbose=not args.quiet,
        )
    model.compile(x)
    return model


def _compile(args: argparse.Namespace) -> int:
    from fhe_quant.deploy import FHEModelDev

    out = Path(args.out)
    if (out / "client" / "manifest.json").exists() or (out / "server" / "manifest.json").exists():
        raise InputError(f"--out {args.out!r} already holds an artifact; remove it first.")
    x = _load_array(args.calibration, "--calibration")
    if args.torch is not None:
        from fhe_quant.torch import compile_torch_model

        module = _load_module(args.torch, args.state, args.kwarg, "--torch")
        model: Any = compile_torch_model(
            module,
            x,
            n_bits=6 if args.n_bits is None else args.n_bits,
            rounding_bits=args.rounding_bits,
            p_error=args.p_error,
            verbose=not args.quiet,
        )
        module_model = model
    else:
        if args.state is not None:
            raise ParameterError("--state goes with --torch only.")
        model = _compile_sklearn(args, x)
        module_model = model.quantized_module_
    FHEModelDev(out, model).save(signing_key=args.signing_key)
    stats = module_model.statistics
    signed = f", signed with {args.signing_key}" if args.signing_key else " (unsigned)"
    print(f"wrote {out / 'client'} and {out / 'server'}{signed}")
    print(
        f"{type(model).__name__}: input shape {list(module_model.input_shape)}, "
        f"{stats['pbs_count']} PBS per sample, max bit width {stats['max_bit_width']}"
    )
    return 0


def _info(args: argparse.Namespace) -> int:
    from fhe_quant.deploy import artifact_info

    info = artifact_info(args.artifact, verify_key=args.verify_key)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    stats = info["statistics"]
    print(
        f"artifact format {info['manifest']['format_version']}, "
        f"fhe_quant {info['manifest']['fhe_quant_version']}, signature {info['signature']}"
    )
    print(
        f"input: shape {info['input_shape']}, {info['input_bits']} bits "
        f"(client pre-processing: {info['client_pre_processing'] or 'none'})"
    )
    print(f"PBS per sample: {stats.get('pbs_count')}, max bit width: {stats.get('max_bit_width')}")
    for layer in stats["layers"]:
        print(f"  {layer}")
    print(f"client post-processing: {info['client_post_processing'] or 'none'}")
    print(f"task: {info['task']}, output function: {info['output_function'] or 'none'}")
    if info["classes"] is not None:
        print(f"classes: {info['classes']}")
    print(info["program"])
    return 0


def _keygen_signing(args: argparse.Namespace) -> int:
    from fhe_quant.signing import write_signing_key_pair

    private, public = write_signing_key_pair(args.out)
    print(f"wrote {private} (private signing key, keep it secret) and {public} (verify key)")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fhe_quant.keystore import parse_size

    try:
        from fhe_quant.serve import ServiceSettings, serve
    except ImportError as exc:
        raise ParameterError(
            f"fhe-quant serve needs FastAPI, uvicorn and Dask ({exc}): "
            "pip install 'fhe-quant[serve]' (or run python -m fhe_quant.http, the "
            "standard-library fallback)."
        ) from None
    settings = ServiceSettings(
        server_dir=args.server_dir,
        key_store=args.key_store,
        key_memory=parse_size(args.key_memory),
        dask=args.dask,
        workers=args.workers,
        max_body_bytes=parse_size(args.max_body_bytes),
        max_concurrent=args.max_concurrent,
    )
    serve(settings, args.host, args.port)
    return 0


def _load_data(path: str) -> np.ndarray:
    """Inputs from a ``.npy`` array or a ``.csv`` table (an optional header row)."""
    if not path.lower().endswith(".csv"):
        return _load_array(path, "--data")
    file = _existing_file(path, "--data")
    for skip in (0, 1):
        try:
            return np.loadtxt(file, delimiter=",", ndmin=2, skiprows=skip)
        except ValueError as exc:
            error = exc
    raise InputError(f"--data: {path!r} is not a CSV table of numbers ({error}).")


def _decode(client: Any, replies: list[bytes]) -> tuple[np.ndarray, np.ndarray | None]:
    """Predictions (labels, predictions or float outputs) and a classifier's
    probabilities (``None`` otherwise)."""
    post = client.post_processing
    if post.task == "module":
        return client.deserialize_decrypt_dequantize(replies), None
    probabilities = (
        client.predict_proba(replies) if post.task == "classifier" and post.output else None
    )
    return client.predict(replies), probabilities


def _print_rows(post: Any, start: int, predictions: np.ndarray, probabilities: Any) -> None:
    if post.task == "module":
        for i, row in enumerate(predictions.reshape(len(predictions), -1)):
            label = f"  argmax {int(row.argmax())}" if row.size > 1 else ""
            print(f"sample {start + i}: {np.array2string(row, precision=6)}{label}")
        return
    # NOTE: one line per sample: the prediction (repr, so labels keep their type),
    # then the probabilities of a classifier that has them.
    for i, prediction in enumerate(predictions):
        extra = (
            f"  probabilities {np.array2string(probabilities[i], precision=6)}"
            if probabilities is not None
            else ""
        )
        if isinstance(prediction, np.ndarray):  # a regressor with several targets
            text = np.array2string(prediction, precision=6)
        else:
            text = repr(prediction.item() if isinstance(prediction, np.generic) else prediction)
        print(f"sample {start + i}: prediction {text}{extra}")


def _predict(args: argparse.Namespace) -> int:
    import uuid

    from tqdm.auto import tqdm

    from fhe_quant.deploy import FHEModelClient
    from fhe_quant.predictions import PredictionFile
    from fhe_quant.service_client import ServiceClient, circuit_id

    if args.batch_size < 1:
        raise ParameterError(f"--batch-size must be >= 1; got {args.batch_size}.")
    client = FHEModelClient(args.client_dir, key_dir=args.key_dir)
    x = _load_data(args.data)[: args.samples]
    output = PredictionFile(args.out, x) if args.out else None
    done = output.rows_done() if output is not None else 0
    api = ServiceClient(args.url, timeout=args.timeout)
    client_id = uuid.uuid4().hex
    if done < len(x):
        api.upload_keys(client_id, client.get_serialized_evaluation_keys(), circuit_id(client))
    post = client.post_processing
    with tqdm(total=len(x), initial=done, desc="predict", unit="sample", disable=args.quiet) as bar:
        for start in range(done, len(x), args.batch_size):
            chunk = x[start : start + args.batch_size]
            replies = api.predict_batch(client_id, client.quantize_encrypt_serialize(chunk))
            predictions, probabilities = _decode(client, replies)
            if output is None:
                _print_rows(post, start, predictions, probabilities)
            else:
                output.append(predictions, probabilities, post)
            bar.update(len(chunk))
    if output is not None:
        path = output.finish()
        if args.quiet is False:
            print(f"wrote {len(x)} predictions to {path}", file=sys.stderr)
    return 0


_COMPILE_DESCRIPTION = """\
Quantize and compile a model, then write the deployment directory OUT/client (for the
user: keys, encryption, decryption, post-processing) and OUT/server (the circuit only).

  fhe-quant compile --torch pkg.module:ClassName --state model.pt \\
      --calibration X.npy --n-bits 4 --out DIR
  fhe-quant compile --sklearn estimator.joblib --calibration X.npy --n-bits 6 --out DIR
  fhe-quant compile --sklearn pkg.module:train_model --calibration X.npy --out DIR

--torch names a torch.nn.Module class (or a function returning one); --kwarg passes its
arguments; --state is a state dict saved with torch.save(model.state_dict()), read with
torch.load(weights_only=True), so it runs no code.

--sklearn takes a fitted scikit-learn estimator of a supported class (or a fitted
fhe_quant estimator), either from a file saved with joblib.dump/pickle or from a
function (pkg.module:name, called with the --kwarg arguments) that returns it. Loading a
joblib/pickle file runs code from it: only pass files you made or trust. The artifacts
written to OUT never use pickle.

The calibration inputs (one sample per row, shaped like the model's inputs) set the
quantization ranges: pass the training data or a representative sample of it.
"""


def _add_serve_parser(sub: Any) -> None:
    srv = sub.add_parser(
        "serve",
        help="serve a server artifact: FastAPI under uvicorn, FHE on a Dask cluster",
        description="Serve a server artifact over HTTP (OpenAPI at /docs). Clients upload "
        "their evaluation keys (PUT /clients/ID/keys, answered with a bearer token) and "
        "send ciphertexts (POST /clients/ID/predict or /predict_batch). Prints its URL "
        "once ready. Needs the 'serve' extra: pip install 'fhe-quant[serve]'.",
    )
    srv.add_argument("server_dir", help="the artifact's server directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    srv.add_argument(
        "--key-store", help="directory of the clients' keys (default: temporary, lost at exit)"
    )
    srv.add_argument("--key-memory", default="4GB", help="keys kept in memory, e.g. 4GB")
    srv.add_argument(
        "--dask", metavar="ADDRESS", help="a Dask scheduler (tcp://host:8786); default: local"
    )
    srv.add_argument("--workers", type=int, help="local worker processes (default: one per core)")
    srv.add_argument("--max-body-bytes", default=str(512 * 2**20), help="largest request body")
    srv.add_argument("--max-concurrent", type=int, default=8, help="predictions at once (429)")
    srv.set_defaults(func=_serve)


def _add_predict_parser(sub: Any) -> None:
    pre = sub.add_parser(
        "predict",
        help="encrypt inputs, run them on a server in batches, decrypt",
        description="Encrypt inputs (.npy or .csv, one sample per row), send them in "
        "batches to a 'fhe-quant serve' service, decrypt and decode the answers. With --out "
        "(.csv or .npy) the predictions are written as each batch comes back: run the same "
        "command again after an interruption and the rows already there are kept and not "
        "sent again. Without --out, one line per sample is printed.",
    )
    pre.add_argument("client_dir", help="the artifact's client directory")
    pre.add_argument("--data", required=True, help=".npy or .csv inputs, one sample per row")
    pre.add_argument("--url", default="http://127.0.0.1:8000")
    pre.add_argument("--batch-size", type=int, default=32, help="samples per request")
    pre.add_argument("--out", help="predictions file, .csv or .npy (resumable)")
    pre.add_argument("--samples", type=int, default=None, help="only the first N samples")
    pre.add_argument("--key-dir", help="where to keep the keys (default: memory)")
    pre.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    pre.add_argument("--quiet", action="store_true", help="no progress bar")
    pre.set_defaults(func=_predict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhe-quant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fhe-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_report_parser(sub)
    _add_compile_parser(sub)
    _add_info_parser(sub)
    _add_serve_parser(sub)
    _add_predict_parser(sub)
    return parser


def _add_report_parser(sub: Any) -> None:
    rep = sub.add_parser("report", help="quantize + compile a torch model and print its report")
    rep.add_argument(
        "--module", required=True, help="import path of the module class or factory, 'pkg.mod:Name'"
    )
    rep.add_argument(
        "--kwarg", action="append", default=[], help="constructor argument key=value (repeatable)"
    )
    rep.add_argument("--state", help="state dict saved with torch.save(model.state_dict())")
    rep.add_argument("--calib", required=True, help=".npy calibration inputs (N, ...)")
    rep.add_argument("--data", help=".npy evaluation inputs (defaults to --calib)")
    rep.add_argument("--labels", help=".npy labels of the evaluation inputs")
    rep.add_argument("--n-bits", type=int, default=6)
    rep.add_argument("--rounding-bits", type=int, default=None)
    rep.add_argument("--no-simulate", action="store_true", help="skip the FHE simulation")
    rep.add_argument("--program", action="store_true", help="print the integer program")
    rep.add_argument("--quiet", action="store_true", help="no progress bars")
    rep.set_defaults(func=_report)


def _add_compile_parser(sub: Any) -> None:
    com = sub.add_parser(
        "compile",
        help="quantize + compile a torch model or a scikit-learn estimator, save the artifact",
        description=_COMPILE_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = com.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--torch",
        metavar="PKG.MODULE:NAME",
        help="the torch.nn.Module class or factory, by import path (with --state)",
    )
    source.add_argument(
        "--sklearn",
        metavar="FILE.joblib|PKG.MODULE:FACTORY",
        help="a trained estimator: a joblib/pickle file (TRUSTED files only: loading it "
        "runs code) or a function returning it",
    )
    com.add_argument(
        "--kwarg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="argument of the class/factory (repeatable; integers are converted)",
    )
    com.add_argument(
        "--state", help="torch state dict, torch.save(model.state_dict()); read weights_only"
    )
    com.add_argument(
        "--calibration", required=True, help=".npy calibration inputs (n_samples, ...)"
    )
    com.add_argument(
        "--n-bits",
        type=int,
        default=None,
        help="quantization bits (default: 6 for torch, the estimator class's default)",
    )
    com.add_argument("--rounding-bits", type=int, default=None, help="table input width")
    com.add_argument("--p-error", type=float, default=None, help="error probability per PBS")
    com.add_argument("--out", required=True, help="directory to write client/ and server/ to")
    com.add_argument("--quiet", action="store_true", help="no progress bars")
    com.add_argument(
        "--signing-key", help="sign the artifact with this Ed25519 key (fhe-quant keygen-signing)"
    )
    com.set_defaults(func=_compile)


def _add_info_parser(sub: Any) -> None:
    info = sub.add_parser("info", help="describe a saved client artifact (FHEModelDev)")
    info.add_argument("artifact", help="the artifact's client directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.add_argument("--verify-key", help="refuse the artifact unless signed by this key")
    info.set_defaults(func=_info)
    sig = sub.add_parser(
        "keygen-signing", help="make an Ed25519 key pair: OUT (private, 0600) and OUT.pub"
    )
    sig.add_argument("out", help="path of the private key; the public key goes to OUT.pub")
    sig.set_defaults(func=_keygen_signing)


def _user_error(message: str) -> int:
    """Print a user error as one line (no traceback); the exit status of user errors."""
    print(f"fhe-quant: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def _show_warning(message: Any, category: type, *args: Any, **kwargs: Any) -> None:
    """fhe_quant's own warnings as one line on stderr; others as Python shows them."""
    from fhe_quant.errors import FHEQuantWarning

    if issubclass(category, FHEQuantWarning):
        print(f"fhe-quant: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, *args, **kwargs)


_SHOW_WARNING = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fhe-quant`` console script."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return int(args.func(args))
    except FHEQuantError as exc:
        return _user_error(str(exc))
    except BrokenPipeError:
        raise
    except OSError as exc:  # a user path that cannot be read or written
        where = f" {exc.filename!r}" if exc.filename else ""
        return _user_error(f"{exc.strerror or exc}{where}")


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
