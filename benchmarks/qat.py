"""Quantization-aware training on digits: 2-3 bit MLPs and a 3-bit CNN against 6-bit PTQ.

The digits MLP (64-64-64-10, ReLU; scikit-learn's digits standardized, 75/25 split,
random_state=0) is trained in float (40 epochs), then either quantized after training
at 6 bits (``compile_torch_model``) or fine-tuned quantization-aware
(``prepare_qat`` + ``fhe_quant.training.fit``, 30 epochs, Adam 1e-3 with cosine decay)
and compiled with ``compile_qat_model``. For each model: float / quantized (full tables)
/ quantized (compiled tables, ``disable``) / simulated test accuracy, the accumulator and
table widths per layer, PBS count, compile and key-generation time, encrypted latency
per sample (``fhe="execute"``) and training time. For QAT rows the same quantized graph
is also lowered with full-width tables (no accumulator bit dropped) and compiled, to
report its PBS count and estimated latency (it is not executed: 8-bit tables are slow).

The CNN rows (``cnn-*``) do the same for the issue's small CNN on the same split, the
standardized pixels reshaped to 1x8x8 images: Conv2d(1, 8, 3) -> ReLU -> AvgPool2d(2) ->
Flatten -> Linear(72, 10), trained in float (30 epochs), then quantized at 6 bits after
training or fine-tuned quantization-aware at 3 bits (30 epochs, Adam 1e-3, cosine). They
also report the widest table input without rounding (the widest accumulator that feeds a
table), which the issue bounds by 8 bits.

The plain-loop rows (``plain-*``) are the recipe users write, with nothing of
fhe_quant's training helper: the same MLP trained in float by a plain torch loop (Adam
``lr=1e-3``, batch 64, 30 epochs, ``CrossEntropyLoss``, no schedule), then
``prepare_qat(net, n_bits=..., X_sample=x_train)`` at its *default* settings, the same
plain loop for 30 epochs, and ``compile_qat_model``. ``plain-*-before`` rows pin the
defaults of before issue 14 part 6 (no accumulator budget, 5-bit tables) for comparison.
Concrete's ``complexity`` is read from the compiled circuit (no key needed).

Writes ``benchmarks/results/qat.json`` and prints a Markdown table.

Run: python benchmarks/qat.py [--execute-samples 2] [--epochs 30] [--only NAME ...]
     (e.g. ``--only cnn-ptq-6bit cnn-qat-3bit``; other rows are kept from the JSON)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import digits_mlp, digits_split, measure_execute, write_results

from fhe_quant.lower import lower
from fhe_quant.model import QuantizedModule
from fhe_quant.qat import compile_qat_model, prepare_qat
from fhe_quant.report import estimate_latency
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

RESULTS = Path(__file__).parent / "results"

#: The QAT variants: name -> prepare_qat keyword arguments.
QAT_RUNS: dict[str, dict[str, Any]] = {
    "qat-3bit-acc8": {"n_bits": 3, "accumulator_bits": 8},
    "qat-3bit": {"n_bits": 3},
    "qat-2bit": {"n_bits": 2},
    "qat-2bit-tables5": {"n_bits": 2, "rounding_bits": 5},
    "qat-3bit-ema": {"n_bits": 3, "activation_scale": "ema", "accumulator_bits": 8},
    "qat-binary-3bit-act": {"n_bits": 3, "weight_mode": "binary"},
}


#: The CNN variants: name -> prepare_qat keyword arguments.
CNN_QAT_RUNS: dict[str, dict[str, Any]] = {
    "cnn-qat-3bit": {"n_bits": 3},
    "cnn-qat-2bit": {"n_bits": 2},
    # 2-bit inputs cannot tell the standardized pixels apart with one step per channel:
    "cnn-qat-2bit-in3": {"n_bits": {"inputs": 3, "weights": 2, "activations": 2, "outputs": 3}},
}

#: The plain-loop variants: name -> prepare_qat keyword arguments (defaults otherwise).
PLAIN_RUNS: dict[str, dict[str, Any]] = {
    "plain-qat-3bit": {"n_bits": 3},
    "plain-qat-2bit": {"n_bits": 2},
    "plain-qat-3bit-before": {"n_bits": 3, "accumulator_bits": None, "rounding_bits": 5},
    "plain-qat-2bit-before": {"n_bits": 2, "accumulator_bits": None, "rounding_bits": 5},
    # 3-bit alternatives to the default (2-bit inputs, budgets 6 / 7 / 7 bits): an
    # explicit budget keeps 3-bit inputs, so acc7 is the default of before the narrower
    # inputs (3-bit inputs, 7 bits in every layer)
    "plain-qat-3bit-acc7": {"n_bits": 3, "accumulator_bits": 7},
    "plain-qat-3bit-acc8": {"n_bits": 3, "accumulator_bits": 8},
}

#: Every row, in the order of the table.
ORDER = ["ptq-6bit", *QAT_RUNS, "cnn-ptq-6bit", *CNN_QAT_RUNS, *PLAIN_RUNS]


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return digits_split()


def digit_images() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The same split, the standardized pixels as 1x8x8 images."""
    x_train, x_test, y_train, y_test = digits_split()
    return x_train.reshape(-1, 1, 8, 8), x_test.reshape(-1, 1, 8, 8), y_train, y_test


def float_mlp(x: np.ndarray, y: np.ndarray) -> tuple[torch.nn.Module, float]:
    model = digits_mlp(0)
    start = time.perf_counter()
    fit(model, x, y, epochs=40, lr=1e-2, seed=0, verbose=False)
    return model, (time.perf_counter() - start) / (40 * -(-len(x) // 64))


def plain_loop(model: torch.nn.Module, x: np.ndarray, y: np.ndarray, epochs: int = 30) -> None:
    """The loop users write: Adam 1e-3, batch 64, cross-entropy, no schedule."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss = torch.nn.CrossEntropyLoss()
    x_all, y_all = torch.tensor(x, dtype=torch.float32), torch.tensor(y)
    for _ in range(epochs):
        model.train()
        for batch in torch.randperm(len(x_all)).split(64):
            optimizer.zero_grad()
            loss(model(x_all[batch]), y_all[batch]).backward()
            optimizer.step()
    model.eval()


def plain_mlp(x: np.ndarray, y: np.ndarray) -> tuple[torch.nn.Module, float]:
    """The digits MLP trained in float by :func:`plain_loop` (30 epochs)."""
    model = digits_mlp(0)
    start = time.perf_counter()
    plain_loop(model, x, y)
    return model, (time.perf_counter() - start) / (30 * -(-len(x) // 64))


def plain_run(
    name: str, model: torch.nn.Module, data: tuple[np.ndarray, ...], epochs: int, samples: int
) -> dict[str, Any]:
    """The user recipe: ``prepare_qat`` at its defaults, :func:`plain_loop`, compile."""
    x_train, x_test, y_train, y_test = data
    options = PLAIN_RUNS[name]
    qat = prepare_qat(model, **options, X_sample=x_train)
    start = time.perf_counter()
    plain_loop(qat, x_train, y_train, epochs)
    train_seconds = time.perf_counter() - start
    qm = compile_qat_model(qat, x_train)
    eval_forward = qat.eval()(x_test).detach().numpy()
    return {
        "name": name,
        "options": options,
        "epochs": epochs,
        "train_seconds": train_seconds,
        "qat_forward_equals_disable": bool(np.array_equal(eval_forward, qm.forward(x_test))),
        **measure(qm, x_test, y_test, samples),
    }


def float_cnn(x: np.ndarray, y: np.ndarray) -> tuple[torch.nn.Module, float]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3),
        torch.nn.ReLU(),
        torch.nn.AvgPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 3 * 3, 10),
    )
    start = time.perf_counter()
    fit(model, x, y, epochs=30, lr=1e-2, seed=0, verbose=False)
    return model, (time.perf_counter() - start) / (30 * -(-len(x) // 64))


def _layers(qm: QuantizedModule) -> dict[str, list[Any]]:
    layers = qm.statistics["layers"]
    return {
        "accumulator_bits": [layer.get("accumulator_bits") for layer in layers],
        "table_input_bits": [layer.get("table_input_bits") for layer in layers],
        "truncated_bits": [layer.get("truncated_bits") for layer in layers],
    }


def measure(qm: QuantizedModule, x_test: np.ndarray, y_test: np.ndarray, samples: int) -> dict:
    """Accuracies, widths, PBS and (with ``samples``) encrypted latency of a compiled model."""
    report = qm.report(x_test, y_test, fhe="simulate")
    stats = qm.statistics
    layers = _layers(qm)
    # NOTE: a table reads its layer's whole accumulator when no bit is rounded away.
    tabled = [
        b for b, t in zip(layers["accumulator_bits"], layers["table_input_bits"], strict=True) if t
    ]
    row: dict[str, Any] = {
        "float_accuracy": report.scores["float"],
        "full_tables_accuracy": report.scores["quantized (full tables)"],
        "disable_accuracy": report.scores["quantized"],
        "simulate_accuracy": report.scores["simulate"],
        **layers,
        "max_table_input_bits_without_rounding": max(tabled, default=None),
        "pbs_count": stats["pbs_count"],
        "pbs_per_precision": {str(k): v for k, v in stats["pbs_per_precision"].items()},
        "max_bit_width": stats["max_bit_width"],
        "compile_seconds": stats["compile_seconds"],
        "complexity": stats["complexity"],
        "estimated_latency_seconds": report.estimated_latency_seconds,
    }
    if samples:
        row.update(measure_execute(qm, x_test, samples))
    return row


def full_width(qm: QuantizedModule, x_train: np.ndarray) -> dict[str, Any]:
    """The same quantized graph with tables over the whole accumulator (no dropped bit)."""
    widest = max(b for b in _layers(qm)["accumulator_bits"][:-1])
    wide = QuantizedModule(qm.graph, qm.quantized, lower(qm.quantized, table_bits=widest))
    wide.compile(x_train)
    stats = wide.statistics
    return {
        "table_input_bits": _layers(wide)["table_input_bits"],
        "pbs_count": stats["pbs_count"],
        "pbs_per_precision": {str(k): v for k, v in stats["pbs_per_precision"].items()},
        "complexity": stats["complexity"],
        "estimated_latency_seconds": estimate_latency(stats["complexity"]),
    }


def qat_run(
    name: str,
    model: torch.nn.Module,
    data: tuple[np.ndarray, ...],
    epochs: int,
    samples: int,
) -> dict[str, Any]:
    x_train, x_test, y_train, y_test = data
    options = {**QAT_RUNS, **CNN_QAT_RUNS}[name]
    qat = prepare_qat(model, **options, X_sample=x_train[:2])
    start = time.perf_counter()
    history = fit(
        qat, x_train, y_train, epochs=epochs, lr=1e-3, schedule="cosine", seed=0, verbose=False
    )
    train_seconds = time.perf_counter() - start
    steps = epochs * -(-len(x_train) // 64)
    # What each training step spends lowering the quantized graph to its program.
    quantized = qat.to_quantized_graph()
    start = time.perf_counter()
    for _ in range(20):
        lower(quantized)
    lower_seconds = (time.perf_counter() - start) / 20
    qm = compile_qat_model(qat, x_train)
    eval_forward = qat.eval()(x_test).detach().numpy()
    row = {
        "name": name,
        "options": options,
        "epochs": epochs,
        "train_seconds": train_seconds,
        "train_seconds_per_step": train_seconds / steps,
        "lower_seconds_per_step": lower_seconds,
        "final_train_loss": history["loss"][-1],
        "qat_forward_equals_disable": bool(np.array_equal(eval_forward, qm.forward(x_test))),
        **measure(qm, x_test, y_test, samples),
        "full_width": full_width(qm, x_train),
    }
    return row


def ptq_run(
    model: torch.nn.Module, data: tuple[np.ndarray, ...], samples: int, name: str = "ptq-6bit"
) -> dict:
    x_train, x_test, _, y_test = data
    qm = compile_torch_model(model, x_train, n_bits=6)
    return {"name": name, "options": {"n_bits": 6}, **measure(qm, x_test, y_test, samples)}


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | float | full tables | disable | simulate | acc bits | table in "
        "| PBS | complexity | est. s | latency s | full-width tables: in / PBS / est. s "
        "| train s | max table in w/o rounding |"
    )
    lines = [head, "|---" * 14 + "|"]
    for r in rows:
        wide = r.get("full_width")
        wide_text = (
            f"{wide['table_input_bits'][:-1]} / {wide['pbs_count']} / "
            f"{wide['estimated_latency_seconds']:.1f}"
            if wide
            else "-"
        )
        train = f"{r['train_seconds']:.0f}" if "train_seconds" in r else "-"
        lines.append(
            f"| {r['name']} | {r['float_accuracy']:.4f} | {r['full_tables_accuracy']:.4f} "
            f"| {r['disable_accuracy']:.4f} | {r['simulate_accuracy']:.4f} "
            f"| {r['accumulator_bits']} | {r['table_input_bits'][:-1]} | {r['pbs_count']} "
            f"| {r.get('complexity', float('nan')):.3g} | {r['estimated_latency_seconds']:.2f} "
            f"| {r.get('execute_seconds_per_sample', float('nan')):.2f} | {wide_text} | {train} "
            f"| {r.get('max_table_input_bits_without_rounding', '-')} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--execute-samples", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--only", nargs="+", default=None, help="run names to (re)run")
    parser.add_argument("--out", default=str(RESULTS / "qat.json"))
    args = parser.parse_args()
    # NOTE: one torch thread, as fhe_quant.training.fit uses (two threads on the shared
    # 2-core machines made the plain loop's epochs many times slower).
    torch.set_num_threads(1)
    names = args.only or ORDER
    unknown = sorted(set(names) - set(ORDER))
    if unknown:
        parser.error(f"unknown run names {unknown}; known: {ORDER}")
    rows = []
    trained: dict[str, tuple[torch.nn.Module, float, tuple[np.ndarray, ...]]] = {}
    for name in names:
        family = name.split("-")[0] if name.startswith(("cnn-", "plain-")) else "mlp"
        if family not in trained:
            data = digit_images() if family == "cnn" else digits()
            train = {"cnn": float_cnn, "plain": plain_mlp}.get(family, float_mlp)
            trained[family] = (*train(data[0], data[2]), data)  # seconds per training step
        model, float_seconds, data = trained[family]
        if name in ("ptq-6bit", "cnn-ptq-6bit"):
            row = ptq_run(model, data, args.execute_samples, name)
        elif family == "plain":
            row = plain_run(name, model, data, args.epochs, args.execute_samples)
        else:
            row = qat_run(name, model, data, args.epochs, args.execute_samples)
        row["float_train_seconds_per_step"] = float_seconds
        rows.append(row)
        print(json.dumps(row), flush=True)
    RESULTS.mkdir(exist_ok=True)
    out = Path(args.out)
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    merged = [r for r in previous if r["name"] not in names] + rows
    merged.sort(key=lambda r: ORDER.index(r["name"]) if r["name"] in ORDER else len(ORDER))
    write_results(out, merged)
    out.with_suffix(".md").write_text(table(merged) + "\n")
    print(table(merged))


if __name__ == "__main__":
    main()
