"""Encrypted inference end to end, the way it is deployed: the main demo.

Two models are trained, quantized, compiled and saved as deployment artifacts; then a
client (keys, encryption, decryption) and a server (the circuit and the client's
evaluation keys, nothing else) run as separate objects that only exchange bytes. The
artifacts are signed by the model owner's key, and client and server check it on load:

1. scikit-learn's LogisticRegression on breast cancer (8 bits; a linear model needs no
   table lookup, so it runs in milliseconds);
2. a PyTorch MLP on digits, trained quantization-aware to 3 bits (one table lookup per
   hidden neuron, plus the exact rounding before each table).

For each, it prints the accuracy in clear and in simulated FHE on the whole test set,
then the encrypted predictions of a few test samples (which must equal the clear
quantized ones) with the time of each step and the sizes of what travels.

Run: python examples/encrypted_inference_demo.py [--samples 3] [--out DIR]
(about a minute on 2 cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer
from fhe_quant.signing import write_signing_key_pair
from fhe_quant.sklearn import LogisticRegression
from fhe_quant.torch import compile_qat_model, prepare_qat
from fhe_quant.training import fit


def split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    return scaler.transform(x_train), scaler.transform(x_test), y_train, y_test


def size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return f"{total / 2**20:.2f} MiB"


def owner_keys(root: Path) -> tuple[Path, Path]:
    """The model owner's signing key pair (made once): artifacts are signed with the
    private key, and client and server refuse any artifact the public key did not sign."""
    private = root / "owner"
    if not private.exists():
        return write_signing_key_pair(private)
    return private, root / "owner.pub"


def run_deployed(
    artifact: Path, x: np.ndarray, decode: Any, expected: np.ndarray, labels: np.ndarray
) -> None:
    """Client and server as separate objects; prints per-step latency."""
    _, public = owner_keys(artifact.parent)
    client = FHEModelClient(artifact / "client", key_dir=artifact / "keys", verify_key=public)
    server = FHEModelServer(artifact / "server", verify_key=public)

    start = time.perf_counter()
    client.generate_private_and_evaluation_keys()
    keys = client.get_serialized_evaluation_keys()  # sent once to the server
    print(f"  key generation {time.perf_counter() - start:.2f} s, evaluation keys {len(keys):,} B")
    print(f"  client dir {size(artifact / 'client')}, server dir {size(artifact / 'server')}")

    for i in range(len(x)):
        t0 = time.perf_counter()
        ciphertext = client.quantize_encrypt_serialize(x[i : i + 1])[0]
        t1 = time.perf_counter()
        reply = server.run(ciphertext, keys)  # the server sees bytes only
        t2 = time.perf_counter()
        prediction = decode(client, [reply])[0]
        t3 = time.perf_counter()
        match = "==" if prediction == expected[i] else "!="
        print(
            f"  sample {i}: encrypted prediction {prediction!r} {match} clear {expected[i]!r} "
            f"(label {labels[i]!r}); encrypt {1e3 * (t1 - t0):.1f} ms, "
            f"server {1e3 * (t2 - t1):.1f} ms, decrypt {1e3 * (t3 - t2):.1f} ms, "
            f"ciphertext {len(ciphertext):,} B, result {len(reply):,} B"
        )
        if prediction != expected[i]:
            raise SystemExit("The encrypted prediction differs from the clear one: a bug.")


def accuracy(predicted: np.ndarray, y: np.ndarray) -> str:
    return f"{100 * float(np.mean(predicted == y)):.1f}%"


def logistic_regression(root: Path, samples: int) -> None:
    print("== scikit-learn LogisticRegression on breast cancer (8 bits) ==")
    x, y = load_breast_cancer(return_X_y=True)
    names = np.array(["malignant", "benign"])  # string labels travel back as strings
    x_train, x_test, y_train, y_test = split(x, names[y])

    model = LogisticRegression(n_bits=8, p_error=1e-9).fit(x_train, y_train)
    start = time.perf_counter()
    model.compile(x_train)
    print(f"  compiled in {time.perf_counter() - start:.2f} s")
    print(
        f"  accuracy: float {accuracy(model.sklearn_model_.predict(x_test), y_test)}, "
        f"quantized {accuracy(model.predict(x_test), y_test)}, "
        f"simulated FHE {accuracy(model.predict(x_test, fhe='simulate'), y_test)}"
    )
    FHEModelDev(root / "logreg", model).save(signing_key=owner_keys(root)[0])
    run_deployed(
        root / "logreg",
        x_test[:samples],
        lambda client, replies: client.predict(replies),
        model.predict(x_test[:samples]),
        y_test[:samples],
    )


def torch_mlp(root: Path, samples: int) -> None:
    print("\n== PyTorch MLP 64-24-10 on digits, quantization-aware training to 3 bits ==")
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = split(x, y)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 24), torch.nn.ReLU(), torch.nn.Linear(24, 10))
    # NOTE: 3-bit weights and activations, every accumulator bounded to 8 bits while
    # training: few, narrow table lookups (post-training quantization to 3 bits loses
    # most of the accuracy; at 6 bits it costs ten times more lookups).
    qat = prepare_qat(net, n_bits=3, X_sample=x_train, accumulator_bits=8)
    start = time.perf_counter()
    fit(qat, x_train, y_train, epochs=30, lr=3e-3, verbose=False)
    print(f"  trained in {time.perf_counter() - start:.1f} s")

    start = time.perf_counter()
    qm = compile_qat_model(qat, x_train, p_error=1e-9)
    print(
        f"  compiled in {time.perf_counter() - start:.2f} s: "
        f"{qm.statistics['pbs_count']} PBS per sample, "
        f"max bit width {qm.statistics['max_bit_width']}"
    )
    clear = qm.forward(x_test).argmax(1)
    simulated = qm.forward(x_test, fhe="simulate").argmax(1)
    print(f"  accuracy: clear {accuracy(clear, y_test)}, simulated {accuracy(simulated, y_test)}")
    FHEModelDev(root / "mlp", qm).save(signing_key=owner_keys(root)[0])
    run_deployed(
        root / "mlp",
        x_test[:samples],
        # a torch model's artifact returns its float outputs: the argmax is the class
        lambda client, replies: client.deserialize_decrypt_dequantize(replies).argmax(1),
        clear[:samples],
        y_test[:samples],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="test samples run encrypted")
    parser.add_argument("--out", type=Path, help="where to keep the artifacts (default: temp)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = args.out if args.out is not None else Path(scratch)
        logistic_regression(root, args.samples)
        torch_mlp(root, args.samples)


if __name__ == "__main__":
    main()
