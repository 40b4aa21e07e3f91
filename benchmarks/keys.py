"""Evaluation keys of issue 14's models: what sets their size, and how it compares with
Concrete ML 1.9.

For each model: Concrete's ``complexity``, the parameters its optimizer chose for every
evaluation key (``fhe_quant.fhe.key_parameters``: input LWE dimension, GLWE dimension x
polynomial size, decomposition levels), and three sizes:

* ``stat GB``: Concrete's ``size_of_bootstrap_keys + size_of_keyswitch_keys`` statistic,
  the figure ``benchmarks/trees.py`` reported until now (it is not what is serialized);
* ``plain GB``: the keys serialized without compression (from the parameters);
* ``sent GB``: the keys as deployed, with ``compress_evaluation_keys`` (seed + bodies);
  with ``--keygen``, also measured: ``len(circuit.keys.evaluation.serialize())``
  after key generation, and the key generation time.

Models: RandomForest 20 trees depth 4 on breast cancer and DecisionTree depth 5 on wine
(70/30, ``random_state=0``, defaults, plus the forest on a 4-bit grid), the digits MLP
64-64-64-10 post-training quantized at 6 bits, and the same MLP trained by the plain QAT
recipe at 3 bits (``benchmarks/qat.py``'s ``plain-qat-3bit``).

What sets the sizes (measured with this script and small Concrete circuits, 2.11):

* Key generation time follows the *plain* size (every mask is drawn even when only the
  seed is sent): about 65 s per plain GB at load average 13 on these 2 cores.
* Concrete's ``size_of_*_keys`` statistic matches the plain size for the forest but
  overstates it 3.8x for the tree (1.10 GB against 0.29 GB: its keys have GLWE
  dimensions 6 and 4, where the statistic and the serialization differ).
* The forest's 4096-coefficient polynomials come from the *number* of 5-bit lookups
  sharing ``global_p_error=1e-5``: 192 5-bit lookups on fresh inputs alone get
  ``1x4096``, 20 of them ``1x2048``; the group weights (up to 8) and the width of the
  leaf sum do not change the choice (same keys with weights 1, and with ``leaf_bits=8``).
  A 4-bit grid (``n_bits=4``) gives ``1x2048`` and 0.060 GB sent, at the same accuracy.
* The tree's second key (``4x512``) has 2 levels for its 8-bit leaf sum (clear leaf
  values up to 255 weigh the lookups' outputs): ``leaf_bits=6`` keeps them,
  ``leaf_bits=4`` gets 1 level, 0.026 GB sent, complexity 6.35e8, same test accuracy.

Usage::

    python benchmarks/keys.py [--keygen] [--only RandomForest ...]

Writes ``benchmarks/results/keys.json`` (rows not run are kept from it) and ``keys.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

RESULTS = Path(__file__).parent / "results"
#: Concrete ML 1.9's measured figures (issue 14): evaluation keys and key generation.
CONCRETE_ML = {
    "RandomForest": {"keys_gb": 0.08, "keygen_s": 5.1},
    "DecisionTree": {"keys_gb": 0.06, "keygen_s": None},
    "MLP PTQ 6-bit": {"keys_gb": 0.57, "keygen_s": 39.0},
    "MLP QAT 3-bit": {"keys_gb": 0.57, "keygen_s": None},
}


def _tree(name: str, n_bits: Any) -> tuple[Any, float]:
    from sklearn.datasets import load_breast_cancer, load_wine
    from sklearn.model_selection import train_test_split

    import fhe_quant.sklearn as fs

    loader = load_breast_cancer if name == "RandomForest" else load_wine
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=0)
    kwargs = {} if n_bits == "default" else {"n_bits": n_bits}
    if name == "RandomForest":
        model = fs.RandomForestClassifier(random_state=0, **kwargs)
    else:
        model = fs.DecisionTreeClassifier(max_depth=5, random_state=0, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(x_train, y_train)
        model.compile(x_train)
    return model.quantized_module_, float((model.predict(x_test) == y_test).mean())


def _mlp(kind: str) -> tuple[Any, float]:
    import torch
    from _common import digits_split
    from digits_mlp import train_mlp
    from qat import plain_loop, plain_mlp

    from fhe_quant.qat import compile_qat_model, prepare_qat
    from fhe_quant.torch import compile_torch_model

    torch.set_num_threads(1)
    x_train, x_test, y_train, y_test = digits_split()
    if kind == "ptq":
        qm = compile_torch_model(train_mlp(x_train, y_train), x_train, n_bits=6)
    else:
        model, _ = plain_mlp(x_train, y_train)
        qat = prepare_qat(model, n_bits=3, X_sample=x_train)
        plain_loop(qat, x_train, y_train)
        qm = compile_qat_model(qat, x_train)
    return qm, float((qm.forward(x_test).argmax(axis=1) == y_test).mean())


#: The rows: label -> (model name for CONCRETE_ML, builder).
MODELS = {
    "RandomForest": ("RandomForest", lambda: _tree("RandomForest", "default")),
    "RandomForest n_bits=4": ("RandomForest", lambda: _tree("RandomForest", 4)),
    "DecisionTree": ("DecisionTree", lambda: _tree("DecisionTree", "default")),
    "DecisionTree leaf_bits=4": (
        "DecisionTree",
        lambda: _tree("DecisionTree", {"inputs": 5, "outputs": 4}),
    ),
    "MLP PTQ 6-bit": ("MLP PTQ 6-bit", lambda: _mlp("ptq")),
    "MLP QAT 3-bit": ("MLP QAT 3-bit", lambda: _mlp("qat")),
}


def _keys(statistics: Any) -> list[str]:
    """Each evaluation key, e.g. ``bsk 811->1x4096 l1`` or ``ksk 4096->811 l5``."""
    out = []
    for key in statistics.keys:
        if key.kind == "bootstrap":
            shape = f"{key.glwe_dimension}x{key.polynomial_size}"
            out.append(f"bsk {key.input_lwe_dimension}->{shape} l{key.level_count}")
        else:
            out.append(
                f"ksk {key.input_lwe_dimension}->{key.output_lwe_dimension} l{key.level_count}"
            )
    return out


def row(label: str, keygen: bool) -> dict[str, Any]:
    from dataclasses import replace

    name, build = MODELS[label]
    module, accuracy = build()
    circuit = module.fhe_circuit
    statistics = circuit.statistics
    stats = circuit.circuit.statistics
    plain = [replace(key, compressed=False) for key in statistics.keys]
    out: dict[str, Any] = {
        "model": label,
        "accuracy": accuracy,
        "complexity": statistics.complexity,
        "lookups_by_width": {str(k): v for k, v in statistics.pbs_per_precision.items()},
        "keys": _keys(statistics),
        "stat_gb": (stats["size_of_bootstrap_keys"] + stats["size_of_keyswitch_keys"]) / 1e9,
        "plain_gb": sum(key.serialized_bytes for key in plain) / 1e9,
        "sent_gb": statistics.evaluation_key_bytes / 1e9,
        "concrete_ml": CONCRETE_ML[name],
    }
    if keygen:
        start = time.perf_counter()
        circuit.keygen(force=True)
        out["keygen_seconds"] = time.perf_counter() - start
        out["measured_sent_gb"] = len(circuit.circuit.keys.evaluation.serialize()) / 1e9
    out["load_average_1min"] = os.getloadavg()[0]
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| model | accuracy | complexity | lookups | keys chosen | stat GB | plain GB | "
        "sent GB (measured) | CML GB | keygen s (CML) | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        cml = r["concrete_ml"]
        measured = f" ({r['measured_sent_gb']:.3f})" if "measured_sent_gb" in r else ""
        keygen = f"{r['keygen_seconds']:.1f}" if "keygen_seconds" in r else "-"
        cml_keygen = "-" if cml["keygen_s"] is None else f"{cml['keygen_s']:.1f}"
        lines.append(
            f"| {r['model']} | {r['accuracy']:.4f} | {r['complexity']:.3g} | "
            f"{r['lookups_by_width']} | {'; '.join(r['keys'])} | {r['stat_gb']:.3f} | "
            f"{r['plain_gb']:.3f} | {r['sent_gb']:.3f}{measured} | {cml['keys_gb']:.2f} | "
            f"{keygen} ({cml_keygen}) | {r['load_average_1min']:.1f} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keygen", action="store_true", help="generate keys and time it")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import write_results

    np.seterr(all="ignore")
    rows = [row(label, args.keygen) for label in args.only]
    out = RESULTS / "keys.json"
    previous = json.loads(out.read_text())["rows"] if out.exists() else []
    rows = [r for r in previous if r["model"] not in args.only] + rows
    rows.sort(key=lambda r: list(MODELS).index(r["model"]) if r["model"] in MODELS else 99)
    write_results(out, rows)
    lines = table(rows)
    (RESULTS / "keys.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
