"""Quickstart: a PyTorch MLP on scikit-learn's digits, quantized after training,
compiled to an encrypted circuit, checked in the simulator and run encrypted.

Run: python examples/quickstart_torch.py [--n-bits 4] [--samples 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit


def make_mlp(n_features: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(n_features, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n-bits", type=int, default=4)
    parser.add_argument("--samples", type=int, default=3, help="samples to run encrypted")
    args = parser.parse_args()

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0)
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)

    model = make_mlp(x_train.shape[1])
    fit(model, x_train, y_train, epochs=60, verbose=True)
    start = time.perf_counter()
    qm = compile_torch_model(model, x_train, n_bits=args.n_bits, verbose=True)
    print(f"compiled in {time.perf_counter() - start:.1f} s")
    print(qm.report(x_test, y_test, fhe="simulate"))

    print(f"\nkey generation: {qm.keygen(verbose=True):.1f} s")
    clear = qm.forward(x_test[: args.samples], fhe="disable").argmax(1)
    for i in range(args.samples):
        start = time.perf_counter()
        out = qm.forward(x_test[i : i + 1], fhe="execute")
        elapsed = time.perf_counter() - start
        print(
            f"sample {i}: encrypted prediction {out.argmax(1)[0]} (clear {clear[i]}, "
            f"label {y_test[i]}) in {elapsed:.2f} s"
        )


if __name__ == "__main__":
    main()
