"""The ``fhe-quant`` command line.

``fhe-quant report`` quantizes a PyTorch model (a module class named by its import path
plus a ``torch.save``'d state dict) on calibration data from a ``.npy`` file, compiles
it, and prints its report: accuracy in clear, quantized and simulated FHE (when labels
are given), bits per layer and PBS count.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from fhe_quant import __version__
from fhe_quant.errors import FHEQuantError

__all__ = ["main", "build_parser"]


def _load_module(spec: str, state: str | None, kwargs: Sequence[str]) -> Any:
    import torch

    if ":" not in spec:
        raise SystemExit(f"--module must look like 'package.module:ClassName', got {spec!r}")
    module_name, attr = spec.split(":", 1)
    sys.path.insert(0, ".")
    factory = getattr(importlib.import_module(module_name), attr)
    parsed = {}
    for item in kwargs:
        key, _, value = item.partition("=")
        parsed[key] = int(value) if value.lstrip("-").isdigit() else value
    model = factory(**parsed)
    if state:
        # NOTE: weights_only=True reads tensors only: no code from the file runs.
        model.load_state_dict(torch.load(state, weights_only=True))
    return model.eval()


def _report(args: argparse.Namespace) -> int:
    from fhe_quant.torch import compile_torch_model

    model = _load_module(args.module, args.state, args.kwarg)
    x = np.load(args.calib)
    qm = compile_torch_model(
        model, x, n_bits=args.n_bits, rounding_bits=args.rounding_bits, verbose=not args.quiet
    )
    x_eval = np.load(args.data) if args.data else x
    y = np.load(args.labels) if args.labels else None
    report = qm.report(
        x_eval if y is not None else None, y, fhe="disable" if args.no_simulate else "simulate"
    )
    print(report)
    if args.program:
        print("\n" + report.program)
    return 0


def _info(args: argparse.Namespace) -> int:
    from fhe_quant.deploy import artifact_info

    info = artifact_info(args.artifact)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    stats = info["statistics"]
    print(
        f"artifact format {info['manifest']['format_version']}, "
        f"fhe_quant {info['manifest']['fhe_quant_version']}"
    )
    print(
        f"input: shape {info['input_shape']}, {info['input_bits']} bits "
        f"(client pre-processing: {info['client_pre_processing'] or 'none'})"
    )
    print(f"PBS per sample: {stats.get('pbs_count')}, max bit width: {stats.get('max_bit_width')}")
    for layer in stats["layers"]:
        print(f"  {layer}")
    print(f"client post-processing: {info['client_post_processing'] or 'none'}")
    print(info["program"])
    return 0


def _serve(args: argparse.Namespace) -> int:
    from fhe_quant.http import serve

    serve(args.server_dir, args.host, args.port, args.max_body_bytes)
    return 0


def _predict(args: argparse.Namespace) -> int:
    import uuid

    from fhe_quant.deploy import FHEModelClient
    from fhe_quant.http import Client

    client = FHEModelClient(args.client_dir, key_dir=args.key_dir)
    x = np.load(args.data, allow_pickle=False)[: args.samples]
    api = Client(args.url, timeout=args.timeout)
    client_id = uuid.uuid4().hex
    api.upload_keys(client_id, client.get_serialized_evaluation_keys())
    replies = [api.predict(client_id, c) for c in client.quantize_encrypt_serialize(x)]
    outputs = client.deserialize_decrypt_dequantize(replies)
    for i, row in enumerate(outputs.reshape(len(outputs), -1)):
        label = f"  argmax {int(row.argmax())}" if row.size > 1 else ""
        print(f"sample {i}: {np.array2string(row, precision=6)}{label}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fhe-quant", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fhe-quant {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
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
    info = sub.add_parser("info", help="describe a saved client artifact (FHEModelDev)")
    info.add_argument("artifact", help="the artifact's client directory")
    info.add_argument("--json", action="store_true", help="print JSON")
    info.set_defaults(func=_info)
    srv = sub.add_parser("serve", help="serve a server artifact over HTTP (fhe_quant.http)")
    srv.add_argument("server_dir", help="the artifact's server directory")
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    srv.add_argument("--max-body-bytes", type=int, default=512 * 2**20)
    srv.set_defaults(func=_serve)
    pre = sub.add_parser("predict", help="encrypt .npy inputs, run them on a server, decrypt")
    pre.add_argument("client_dir", help="the artifact's client directory")
    pre.add_argument("--data", required=True, help=".npy inputs, one sample per row")
    pre.add_argument("--url", default="http://127.0.0.1:8000")
    pre.add_argument("--samples", type=int, default=None, help="only the first N samples")
    pre.add_argument("--key-dir", help="where to keep the keys (default: memory)")
    pre.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    pre.set_defaults(func=_predict)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fhe-quant`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except FHEQuantError as exc:
        print(f"fhe-quant: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
