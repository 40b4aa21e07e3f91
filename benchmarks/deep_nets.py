"""Deep networks at 8 and 6 bits, post-training quantization at defaults (issue 14):
ResNet-18, MobileNetV2 (width 1.0 and 0.25) and the first two blocks of VGG-16-BN, as
``tests/models/zoo.py`` writes them (torchvision's layer structure, 32x32 inputs, 10
classes, torchvision's random initialization).

Data: scikit-learn's digits upscaled to 32x32x3 (``zoo.digits_images``); images 0..99
calibrate (batch-norm statistics and quantization ranges), images 1000..1063 are held
out. Weights are random, so accuracy has no meaning: the integer program's logits are
compared with the float model's on the held-out images by their centred correlation
(each class's mean over the images removed, so only what depends on the input counts)
and by argmax agreement. Per layer, the SQNR (dB) of the dequantized accumulator against
float (``fhe_quant.report.layer_sqnr``, 16 held-out images) shows where the signal is
lost.

"before" is main's default lowering of the same quantized model (every table
:func:`fhe_quant.quant.widths.auto_table_bits` wide); "after" is the default now, where
a table that would keep too few bits of its observed accumulator is widened
(:func:`fhe_quant.model.signal_table_bits`). The accumulators and their proofs are the
same in both. The circuits are not compiled: tens of thousands of table lookups, up to
16 bits wide, far beyond what these machines compile; ``disable`` mode runs the same
integers, and ``tests/models/test_signal_tables.py`` compiles and simulates small blocks
of each kind with widened tables. Writes ``benchmarks/results/deep_nets.json`` and
``deep_nets.md`` (rows of other models already in the JSON are kept, so models can be
measured in parallel processes).

Run: python benchmarks/deep_nets.py [--models resnet18 ...] [--bits 8 6]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import write_results

from fhe_quant.lower import IntegerProgram, TableStep, lower
from fhe_quant.model import QuantizedModule
from fhe_quant.report import layer_sqnr
from fhe_quant.torch import compile_torch_model

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "models"))
from zoo import DEEP, build, digits_images

RESULTS = Path(__file__).parent / "results"
FINDINGS = (
    "Where the signal is lost (per-layer SQNR): in ResNet-18 and VGG the tables after "
    "the wide 3x3 convolutions keep 1-2 bits of the values that occur (proven "
    "accumulators 20-24 bits, observed spread 16-18 bits per element); widening them "
    "(to 11-14 bits) is what the after rows gain. MobileNetV2's tables keep 3 bits or "
    "more, so none is widened, yet the SQNR falls 1-3 dB per layer from the first "
    "depthwise convolution (16x16 probe: 43.6 dB at the stem, 23 dB after the first "
    "block; with 16-bit tables 36 dB and still 23 dB six layers later): its 52 layers "
    "compound the rounding of 7-bit tables and of the 8-bit codes of its linear "
    "bottlenecks. Compiling: Concrete 2.11 found no parameters for a small residual "
    "block with 21-bit accumulators even at 7-bit tables; after 14-17-bit accumulators "
    "9-bit widened tables compile and simulate bit for bit as disable "
    "(tests/models/test_signal_tables.py). These networks run in disable mode only."
)
N_CALIBRATION, HELD_OUT_START, N_HELD_OUT, N_SQNR = 100, 1000, 64, 16


def centred_correlation(expected: np.ndarray, got: np.ndarray) -> float:
    """Correlation of the logits once each class's mean over the samples is removed."""
    a, b = expected - expected.mean(0), got - got.mean(0)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _program_row(
    qm: QuantizedModule, program: IntegerProgram, x: np.ndarray, expected: np.ndarray
) -> dict[str, Any]:
    module = QuantizedModule(qm.graph, qm.quantized, program)
    got = module.forward(x)
    tables = Counter(s.index_bits for s in program.steps if isinstance(s, TableStep))
    sqnr = layer_sqnr(module, x[:N_SQNR])
    worst = min(sqnr, key=sqnr.get)
    return {
        "centred_correlation": centred_correlation(expected, got),
        "argmax_agreement": float(np.mean(expected.argmax(1) == got.argmax(1))),
        "table_widths": {str(b): n for b, n in sorted(tables.items())},
        "lookups_by_width": {str(w): n for w, n in sorted(program.lookups_by_width().items())},
        "layer_sqnr_db": {k: round(v, 2) for k, v in sqnr.items()},
        "min_sqnr_layer": worst,
        "min_sqnr_db": round(sqnr[worst], 2),
        "output_sqnr_db": round(list(sqnr.values())[-1], 2),
    }


def measure(name: str, n_bits: int) -> list[dict[str, Any]]:
    """The before and after rows of one model at ``n_bits``."""
    model, x = build(name, n_data=N_CALIBRATION, data="digits")
    held_out = digits_images(HELD_OUT_START, N_HELD_OUT)
    with torch.no_grad():
        expected = model(torch.as_tensor(held_out, dtype=torch.float32)).double().numpy()
    start = time.perf_counter()
    qm = compile_torch_model(model, x, n_bits=n_bits, compile=False)
    seconds = time.perf_counter() - start
    acc_bits = [s.acc_bits for s in qm.program.steps if hasattr(s, "acc_bits")]
    common = {
        "model": name,
        "n_bits": n_bits,
        "parameters": sum(p.numel() for p in model.parameters()),
        "max_accumulator_bits": max(acc_bits),
        "accumulator_bits": {str(b): n for b, n in sorted(Counter(acc_bits).items())},
        "build_seconds": round(seconds, 1),
    }
    rows = []
    for tables, program in (("before", lower(qm.quantized)), ("after", qm.program)):
        rows.append({**common, "tables": tables, **_program_row(qm, program, held_out, expected)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(rows: list[dict[str, Any]], load: str) -> str:
    lines = [
        "# Deep networks, PTQ at defaults, 32x32 digits (random weights), `disable` mode",
        "",
        f"Measured with `benchmarks/deep_nets.py`; load average at the start: {load}.",
        f"Calibration: digits 0..{N_CALIBRATION - 1}; held out: digits {HELD_OUT_START}.."
        f"{HELD_OUT_START + N_HELD_OUT - 1}. Centred correlation: per-class mean removed.",
        "before: main's table widths; after: tables widened to keep the observed signal.",
        "Accumulators (and their proofs) are identical in both rows. Not compiled (see the",
        "module docstring): tables up to 16 bits, tens of thousands of lookups.",
        "",
        "| model | bits | tables | centred corr. | argmax agr. | table widths (bits: tables) "
        "| widest acc. | lowest layer SQNR (dB) | output SQNR (dB) |",
        "|---|---:|---|---:|---:|---|---:|---|---:|",
    ]
    for r in rows:
        widths = ", ".join(f"{b}: {n}" for b, n in r["table_widths"].items())
        lines.append(
            f"| {r['model']} | {r['n_bits']} | {r['tables']} | {r['centred_correlation']:.3f} "
            f"| {r['argmax_agreement']:.2f} | {widths} | {r['max_accumulator_bits']} | "
            f"{r['min_sqnr_db']:.1f} ({r['min_sqnr_layer']}) | {r['output_sqnr_db']:.1f} |"
        )
    lines += ["", FINDINGS]
    return "\n".join(lines) + "\n"


def _merged(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    path = RESULTS / "deep_nets.json"
    old = json.loads(path.read_text())["rows"] if path.exists() else []
    done = {(r["model"], r["n_bits"]) for r in rows}
    kept = [r for r in old if (r["model"], r["n_bits"]) not in done]
    order = {name: i for i, name in enumerate(DEEP)}
    return sorted(kept + rows, key=lambda r: (order[r["model"]], -r["n_bits"], r["tables"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEEP), choices=DEEP)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 6])
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows: list[dict[str, Any]] = []
    for name in args.models:
        for n_bits in args.bits:
            rows += measure(name, n_bits)
    rows = _merged(rows)
    write_results(RESULTS / "deep_nets.json", rows)
    (RESULTS / "deep_nets.md").write_text(markdown(rows, load))
    print(markdown(rows, load))


if __name__ == "__main__":
    main()
