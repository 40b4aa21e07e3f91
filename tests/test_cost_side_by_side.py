"""The shared pieces of benchmarks/side_by_side.py (both sides read circuits and merge
rows the same way)."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
import torch

from fhe_quant.cost import circuit_figures
from fhe_quant.torch import compile_torch_model

BENCHMARKS = pathlib.Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture
def side_by_side(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import side_by_side

    return side_by_side


def test_circuit_columns_match_concrete_and_the_program(side_by_side):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU(), torch.nn.Linear(6, 2))
    x = np.random.default_rng(0).normal(size=(64, 4))
    qm = compile_torch_model(net, x, n_bits=3, rounding_bits=3)
    columns = side_by_side.circuit_columns(qm.circuit)
    assert columns["pbs_count"] == qm.circuit.programmable_bootstrap_count
    assert columns["complexity"] == qm.circuit.complexity
    assert columns["key_bytes"] == qm.circuit.size_of_bootstrap_keys + (
        qm.circuit.size_of_keyswitch_keys
    )
    assert sum(n for _, n in columns["pbs_per_parameter"]) == columns["pbs_count"]
    widths = [int(w) for w in columns["lookups_by_input_bits"]]
    assert widths and max(widths) <= columns["max_bit_width"]
    figures = circuit_figures(qm.circuit)
    assert columns["pbs_per_parameter"] == [[list(k), n] for k, n in figures["pbs_per_parameter"]]


def test_merge_keeps_other_sides_and_the_table_shows_every_row(side_by_side, tmp_path):
    row = {
        "side": "concrete-ml",
        "label": "concrete-ml 1.9.0",
        "model": "dt",
        "pbs_count": 55,
        "max_bit_width": 8,
        "lookups_by_input_bits": {"3": 7},
        "complexity": 2.8e9,
        "key_bytes": 9.8e8,
        "accuracy_simulate": 0.94,
        "float_accuracy": 0.94,
        "load_average_before": 7.5,
        "keygen_skipped": "evaluation keys 0.98 GB > --max-key-gb",
    }
    ours = {**row, "side": "fhe_quant", "label": "before", "pbs_count": 13, "keygen_seconds": 3.0}
    ours.pop("keygen_skipped")
    after = {**ours, "label": "after", "pbs_count": 11}
    rows = side_by_side.merge([row, ours], [after])
    assert [r["label"] for r in rows] == ["concrete-ml 1.9.0", "before", "after"]
    rows = side_by_side.merge(rows, [{**after, "pbs_count": 10}])
    assert [r["pbs_count"] for r in rows] == [55, 13, 10]
    table = side_by_side.markdown(rows)
    assert "| dt | fhe_quant before | 13 |" in table and "| dt | fhe_quant after | 10 |" in table
    assert "| dt | concrete-ml 1.9.0 | 55 |" in table and "not keyed" in table
    lines = tmp_path / "rows.jsonl"
    lines.write_text("note\n" + "\n".join(json.dumps(r) for r in rows) + "\n")
    assert side_by_side._read_rows(lines) == rows
