"""Deployment measurements: artifact sizes and round-trip latency over HTTP.

For each model: compile, save the artifacts (``FHEModelDev``), start the HTTP server
(``python -m fhe_quant.http``) in its own process on 127.0.0.1, then as a client:
generate keys, upload the evaluation keys once, and send N predictions one after the
other. Reported: sizes of the client and server directories, of the client's key
directory and of the serialized evaluation keys, ciphertext and result; key generation
and upload time; per prediction the client's encryption, the HTTP request (transfer +
server computation), the decryption, and the total (medians over N); and whether every
decrypted answer equals the clear integer program's.

Models: scikit-learn's LogisticRegression on breast cancer at its default 8 bits (no
table lookup) and a PyTorch MLP 64-24-10 on digits trained quantization-aware to 3 bits
(8-bit accumulators).

Wire compression (Concrete's ``compress_evaluation_keys`` and
``compress_input_ciphertexts``, on by default since fhe_quant.fhe.WIRE_COMPRESSION): for
each model, the same integer program compiled with compression off and on, in the same
run: serialized evaluation keys, one input ciphertext and one result, key generation,
the server's first run with fresh keys (it expands compressed keys then) and a later
run, Concrete's ``complexity`` (must not change), and whether both decrypt to the clear
program's integers. Written to ``deployment_wire.json`` and ``deployment_wire.md``.

Run: python benchmarks/deployment.py [--n 3] [--out benchmarks/results/deployment.json]
The machine's load average is recorded with the results: on a shared machine latencies
grow with it.
"""

from __future__ import annotations

import argparse
import os
import select
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import digits_split, write_results
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.deploy import FHEModelClient, FHEModelDev
from fhe_quant.fhe import compile_program
from fhe_quant.http import Client
from fhe_quant.model import QuantizedModule

P_ERROR = 1e-9


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def logistic_regression() -> tuple[Any, QuantizedModule, np.ndarray]:
    from fhe_quant.sklearn import LogisticRegression

    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, _ = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    model = LogisticRegression(p_error=P_ERROR).fit(x_train, y_train)
    model.compile(x_train)
    return model, model.quantized_module_, x_test


def qat_mlp() -> tuple[Any, QuantizedModule, np.ndarray]:
    from fhe_quant.torch import compile_qat_model, prepare_qat
    from fhe_quant.training import fit

    x_train, x_test, y_train, _ = digits_split()
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    qat = prepare_qat(net, n_bits=3, X_sample=x_train, accumulator_bits=8)
    fit(qat, x_train, y_train, epochs=30, lr=3e-3, verbose=False)
    qm = compile_qat_model(qat, x_train, p_error=P_ERROR)
    return qm, qm, x_test


MODELS: dict[str, tuple[str, Callable[[], tuple[Any, QuantizedModule, np.ndarray]]]] = {
    "logistic_regression": ("LogisticRegression, breast cancer, 8 bits", logistic_regression),
    "qat_mlp": ("torch MLP 64-24-10, digits, QAT 3 bits", qat_mlp),
}


def _start_server(server_dir: Path) -> tuple[subprocess.Popen, str]:
    command = [sys.executable, "-m", "fhe_quant.http", str(server_dir), "--port", "0"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline().decode().strip() if ready else ""
    if not line.startswith("http://"):
        proc.kill()
        raise SystemExit(f"The HTTP server did not start (printed {line!r}).")
    return proc, line


def measure(name: str, root: Path, n: int) -> dict[str, Any]:
    label, build = MODELS[name]
    start = time.perf_counter()
    model, qm, x_test = build()
    build_seconds = time.perf_counter() - start
    artifact = root / name
    FHEModelDev(artifact, model).save()

    proc, url = _start_server(artifact / "server")
    try:
        client = FHEModelClient(artifact / "client", key_dir=root / f"{name}_keys")
        start = time.perf_counter()
        client.generate_private_and_evaluation_keys()
        keys = client.get_serialized_evaluation_keys()
        keygen_seconds = time.perf_counter() - start
        api = Client(url, timeout=3600)
        client_id = uuid.uuid4().hex
        start = time.perf_counter()
        api.upload_keys(client_id, keys)
        upload_seconds = time.perf_counter() - start

        expected = qm.forward_integers(x_test[:n])
        steps: dict[str, list[float]] = {"encrypt": [], "request": [], "decrypt": [], "total": []}
        equal = True
        for i in range(n):
            t0 = time.perf_counter()
            ciphertext = client.quantize_encrypt_serialize(x_test[i : i + 1])[0]
            t1 = time.perf_counter()
            reply = api.predict(client_id, ciphertext)
            t2 = time.perf_counter()
            answer = client.deserialize_decrypt([reply])
            client.deserialize_decrypt_dequantize([reply])  # the post-processing, timed too
            t3 = time.perf_counter()
            for key, seconds in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
                steps[key].append(seconds)
            equal &= bool(np.array_equal(answer, expected[i : i + 1]))
    finally:
        proc.terminate()
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()

    return {
        "name": name,
        "model": label,
        "pbs_count": qm.statistics["pbs_count"],
        "max_bit_width": qm.statistics["max_bit_width"],
        "build_and_compile_seconds": build_seconds,
        "client_dir_bytes": _size(artifact / "client"),
        "server_dir_bytes": _size(artifact / "server"),
        "client_key_dir_bytes": _size(root / f"{name}_keys"),
        "evaluation_keys_bytes": len(keys),
        "ciphertext_bytes": len(ciphertext),
        "result_bytes": len(reply),
        "keygen_seconds": keygen_seconds,
        "key_upload_seconds": upload_seconds,
        "n_predictions": n,
        **{f"median_{key}_seconds": statistics.median(v) for key, v in steps.items()},
        "decrypted_equals_clear": equal,
        "load_average_1min_after": os.getloadavg()[0],
    }


def measure_wire(name: str) -> list[dict[str, Any]]:
    """Sizes and times with compression off, then on, for one model's program."""
    label, build = MODELS[name]
    _, qm, x_test = build()
    q = qm.quantize_input(x_test[:2])
    calibration = qm.quantize_input(x_test)
    expected = np.asarray(qm.program(q), dtype=np.int64)
    rows = []
    for compress in (False, True):
        fc = compile_program(qm.program, calibration, p_error=P_ERROR, compress=compress)
        circuit = fc.circuit
        keygen = fc.keygen()
        keys = circuit.client.evaluation_keys.serialize()
        server_keys = type(circuit.client.evaluation_keys).deserialize(keys)
        ciphertexts = [circuit.encrypt(q[i : i + 1]) for i in range(len(q))]
        runs, answers = [], []
        for ciphertext in ciphertexts:
            start = time.perf_counter()
            result = circuit.server.run(ciphertext, evaluation_keys=server_keys)
            runs.append(time.perf_counter() - start)
            answers.append(np.asarray(circuit.decrypt(result)).reshape(1, -1))
        rows.append(
            {
                "name": name,
                "model": label,
                "compressed": compress,
                "complexity": fc.statistics.complexity,
                "pbs_count": fc.statistics.pbs_count,
                "evaluation_keys_bytes": len(keys),
                "ciphertext_bytes": len(ciphertexts[0].serialize()),
                "result_bytes": len(result.serialize()),
                "keygen_seconds": keygen,
                "first_run_seconds": runs[0],
                "later_run_seconds": runs[-1],
                "equals_clear": bool(
                    np.array_equal(np.concatenate(answers), expected.reshape(2, -1))
                ),
                "load_average_1min": os.getloadavg()[0],
            }
        )
    return rows


def wire_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | compressed | complexity | eval keys MiB | ciphertext B | result B "
        "| keygen s | 1st run s | later run s | exact | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['compressed']} | {r['complexity']:.4g} "
            f"| {_mib(r['evaluation_keys_bytes'])} | {r['ciphertext_bytes']} "
            f"| {r['result_bytes']} | {r['keygen_seconds']:.2f} | {r['first_run_seconds']:.3f} "
            f"| {r['later_run_seconds']:.3f} | {r['equals_clear']} | {r['load_average_1min']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'model':42} {'PBS':>4} {'client':>8} {'server':>8} {'eval keys':>10} "
        f"{'ctxt':>7} {'keygen':>7} {'upload':>7} {'encrypt':>8} {'request':>8} "
        f"{'decrypt':>8} {'total':>8} {'exact':>5}"
    )
    print(header)
    print(f"{'':42} {'':>4} {'MiB':>8} {'MiB':>8} {'MiB':>10} {'MiB':>7} " + f"{'s':>7} " * 6)
    for r in rows:
        print(
            f"{r['model']:42} {r['pbs_count']:>4} {_mib(r['client_dir_bytes']):>8} "
            f"{_mib(r['server_dir_bytes']):>8} {_mib(r['evaluation_keys_bytes']):>10} "
            f"{_mib(r['ciphertext_bytes']):>7} {r['keygen_seconds']:>7.2f} "
            f"{r['key_upload_seconds']:>7.2f} {r['median_encrypt_seconds']:>8.3f} "
            f"{r['median_request_seconds']:>8.3f} {r['median_decrypt_seconds']:>8.3f} "
            f"{r['median_total_seconds']:>8.3f} {r['decrypted_equals_clear']!s:>5}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=3, help="predictions per model")
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument(
        "--wire-only", action="store_true", help="only the compression off/on comparison"
    )
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "deployment.json"
    )
    args = parser.parse_args()
    wire = [row for name in args.models for row in measure_wire(name)]
    wire_out = args.out.with_name(args.out.stem + "_wire.json")
    write_results(wire_out, wire)
    wire_out.with_suffix(".md").write_text(wire_table(wire))
    print(wire_table(wire))
    if args.wire_only:
        return
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            rows.append(measure(name, Path(scratch), args.n))
            print(f"measured {name}", flush=True)
    write_results(args.out, rows)
    print_table(rows)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
