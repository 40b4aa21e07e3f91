"""Modern CNNs at 8-bit post-training quantization: MobileNetV3-Small (squeeze-and-
excitation products), SqueezeNet 1.1 (Fire modules, ceil-mode max pools) and ShuffleNetV2
x0.5 (chunks, channel shuffles), as ``tests/models/zoo.py`` writes them (torchvision's
layer structure; torchvision itself cannot be installed beside torch 2.13.0).

Random weights, batch-norm statistics gathered on the calibration images (32x32, normal
noise, 16 of them), so accuracy has no meaning: the centred correlation of the integer
program's logits with the float model's says how much of the model the quantization
keeps. For each model and table width (the automatic one, and 10 and 12 bits): table
lookups per sample by input width (width 1: the exact rounding's one-bit bootstraps),
the proven accumulator widths (widest, and how many layers need each width), the
products and what they cost, and the correlation. The circuits are not compiled (tens
to hundreds of thousands of lookups); every block they use is compiled and simulated in
``tests/frontends/test_modern_blocks.py``. Writes ``benchmarks/results/modern_cnns.json``
and ``modern_cnns.md``.

Run: python benchmarks/modern_cnns.py [--models mobilenet_v3_small ...] [--tables 0 10 12]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
from _common import write_results

from fhe_quant.lower import ProductStep
from fhe_quant.torch import compile_torch_model

sys.path.insert(0, str(Path(__file__).parents[1] / "tests" / "models"))
from zoo import ZOO, build

RESULTS = Path(__file__).parent / "results"
NOTE = (
    "Random weights (SqueezeNet's initialized as torchvision does; batch-norm statistics "
    "from the images): "
    "the centred correlation subtracts one mean, so per-class offsets count; the per-class "
    "centred one subtracts each class's mean and measures what depends on the input. "
    "ShuffleNetV2's 56 layers amplify every rounding. These circuits are not compiled: "
    "every block is compiled and simulated on small models in "
    "tests/frontends/test_modern_blocks.py."
)


def measure(name: str, table_bits: int | None, n_data: int) -> dict[str, Any]:
    model, x = build(name, n_data=n_data)
    with torch.no_grad():
        expected = model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()
    start = time.perf_counter()
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=table_bits, compile=False)
    build_seconds = time.perf_counter() - start
    got = qm.forward(x)
    centred = np.corrcoef((expected - expected.mean()).ravel(), (got - got.mean()).ravel())
    # NOTE: centred per class too: how well the input-dependent part of the logits is kept
    per_class = np.corrcoef((expected - expected.mean(0)).ravel(), (got - got.mean(0)).ravel())
    steps = qm.program.steps
    acc_bits = Counter(s.acc_bits for s in steps if hasattr(s, "acc_bits"))
    products = [s for s in steps if isinstance(s, ProductStep)]
    lookups = qm.program.lookups_by_width()
    return {
        "model": name,
        "table_bits": table_bits or "auto",
        "parameters": sum(p.numel() for p in model.parameters()),
        "lookups_by_width": {str(w): n for w, n in sorted(lookups.items())},
        "table_lookups": sum(n for w, n in lookups.items() if w > 1),
        "rounding_bootstraps": lookups.get(1, 0),
        "max_accumulator_bits": max(acc_bits),
        "accumulator_bits": {str(b): n for b, n in sorted(acc_bits.items())},
        "products": len(products),
        "product_elements": sum(int(p.squares[0].table.shape[0]) for p in products),
        "product_lookups": sum(sum(p.lookups_by_width().values()) for p in products),
        "centred_correlation": float(centred[0, 1]),
        "per_class_centred_correlation": float(per_class[0, 1]),
        "build_seconds": build_seconds,
    }


def markdown(rows: list[dict[str, Any]], load: str) -> str:
    lines = [
        "# Modern CNNs, 8-bit PTQ, 32x32 inputs (random weights, 16 calibration images)",
        "",
        f"Measured with `benchmarks/modern_cnns.py`; load average before the run: {load}.",
        "Lookups are per sample; width 1 counts the exact rounding's one-bit bootstraps.",
        "Products: squeeze-and-excitation `x * gate`, 2 lookups per element (quarter squares).",
        "",
        "| model | tables | lookups by width | table lookups | 1-bit | widest acc. | "
        "products (elements, lookups) | centred corr. | per-class centred |",
        "|---|---|---|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        widths = ", ".join(f"{w}b: {n}" for w, n in r["lookups_by_width"].items() if w != "1")
        lines.append(
            f"| {r['model']} | {r['table_bits']} | {widths} | {r['table_lookups']} | "
            f"{r['rounding_bootstraps']} | {r['max_accumulator_bits']} | {r['products']} "
            f"({r['product_elements']}, {r['product_lookups']}) | "
            f"{r['centred_correlation']:.4f} | {r['per_class_centred_correlation']:.4f} |"
        )
    lines += [
        "",
        NOTE,
        "",
        "Proven accumulator widths (bits: layers):",
        "",
    ]
    for r in rows:
        if r["table_bits"] == "auto":
            widths = ", ".join(f"{b}: {n}" for b, n in r["accumulator_bits"].items())
            lines.append(f"- {r['model']}: {widths}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=sorted(ZOO))
    parser.add_argument("--tables", nargs="+", type=int, default=[0, 10, 12])
    parser.add_argument("--samples", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(1)
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for name in args.models:
        for bits in args.tables:
            rows.append(measure(name, bits or None, args.samples))
            print(rows[-1], flush=True)
            write_results(RESULTS / "modern_cnns.json", rows)
    (RESULTS / "modern_cnns.md").write_text(markdown(rows, load))
    print(markdown(rows, load))


if __name__ == "__main__":
    main()
