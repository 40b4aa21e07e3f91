"""Tables that keep the observed signal (issue 14, deep networks): a table whose
accumulator's values on calibration data would keep fewer than ``MIN_KEPT_BITS`` bits
after rounding is widened to keep ``KEPT_BITS`` (``quant.widths.kept_table_bits``,
``model.signal_table_bits``). The accumulators and their proofs do not change; the
widened programs run bit for bit the same in ``disable`` and ``simulate``; small models
whose tables keep enough bits are lowered as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.lower import NUMPY, LinearStep, TableStep, lower
from fhe_quant.model import QuantizedModule, signal_table_bits
from fhe_quant.quant.widths import (
    MAX_TABLE_BITS,
    MIN_KEPT_BITS,
    MIN_WIDENED_ACCUMULATOR_BITS,
    bits_for,
    kept_table_bits,
)
from fhe_quant.report import sqnr_db
from fhe_quant.torch import compile_torch_model

TINY_P_ERROR = 1e-12


@pytest.mark.parametrize("lsbs", range(0, 20))
@pytest.mark.parametrize("observed", range(1, 24))
def test_kept_table_bits_widens_exactly_the_starved_tables(lsbs: int, observed: int) -> None:
    KEPT_BITS = 8
    width = kept_table_bits(7, lsbs, observed, KEPT_BITS)
    kept = observed - lsbs
    if kept >= MIN_KEPT_BITS:
        assert width == 7
    else:
        # never past the accumulator, nor Concrete's limit; otherwise KEPT_BITS kept
        assert width == min(7 + min(KEPT_BITS - kept, lsbs), MAX_TABLE_BITS)
        assert width > 7 or lsbs == 0
        if width < MAX_TABLE_BITS and width - 7 < lsbs:
            assert observed - (lsbs - (width - 7)) == KEPT_BITS


class _Block(nn.Module):
    """A residual block with wide 3x3 convolutions (288 taps: the proof is ~5 bits wider
    than the values that occur), then a linear classifier."""

    def __init__(self, channels: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        h = torch.relu(self.bn2(self.conv2(h)) + x)
        return self.fc(h.mean((2, 3)))


def _block(seed: int = 0, channels: int = 32) -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(seed)
    model = _Block(channels)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    x = np.random.default_rng(seed).normal(size=(48, channels, 3, 3))
    model.train()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        model(torch.as_tensor(x, dtype=torch.float32))
    return model.eval(), x


def _float(model: nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(x, dtype=torch.float32)).double().numpy()


@pytest.fixture(scope="module")
def block() -> tuple[nn.Module, np.ndarray, QuantizedModule]:
    model, x = _block()
    return model, x, compile_torch_model(model, x, n_bits=8, compile=False)


def _tables(program) -> list[TableStep]:
    return [s for s in program.steps if isinstance(s, TableStep)]


def test_starved_tables_are_widened_and_the_proofs_unchanged(block) -> None:
    model, x, qm = block
    before = lower(qm.quantized)  # every table at the automatic width
    assert {t.index_bits for t in _tables(before)} == {7}
    widths = sorted(t.index_bits for t in _tables(qm.program))
    assert widths[-1] > 7, widths  # the wide convolutions' tables were widened
    assert all(w <= MAX_TABLE_BITS for w in widths)
    # the same accumulators with the same proven ranges
    acc = [(s.name, s.acc_bits) for s in before.steps if hasattr(s, "acc_bits")]
    assert acc == [(s.name, s.acc_bits) for s in qm.program.steps if hasattr(s, "acc_bits")]
    # each widened table now keeps about as many bits of its observed spread as it outputs
    values = [qm.quantize_input(x)]
    for step in qm.program.steps:
        operand = values[step.inputs[0]] if getattr(step, "inputs", ()) else values[-1]
        if isinstance(step, TableStep) and step.index_bits > 7:
            spread = operand.reshape(len(x), -1).ptp(axis=0)
            kept = bits_for(int(np.median(spread))) - step.lsbs
            assert kept >= step.out_bits - 1 or step.index_bits == MAX_TABLE_BITS
        if not getattr(step, "multi_operand", False):
            values.append(step(operand, NUMPY))
        else:
            values.append(step(tuple(values[i] for i in step.inputs), NUMPY))
    # and the output is closer to float (on held-out inputs)
    held_out = np.random.default_rng(1).normal(size=(32, 32, 3, 3))
    expected = _float(model, held_out)
    gain = sqnr_db(expected, qm.forward(held_out)) - sqnr_db(
        expected, QuantizedModule(qm.graph, qm.quantized, before).forward(held_out)
    )
    assert gain > 3.0


def test_explicit_rounding_bits_turn_the_widening_off(block) -> None:
    model, x, _ = block
    qm = compile_torch_model(model, x, n_bits=8, rounding_bits=7, compile=False)
    assert {t.index_bits for t in _tables(qm.program)} == {7}


def test_tables_keeping_enough_bits_are_not_widened() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))
    x = np.random.default_rng(0).normal(size=(200, 8))
    # no budget: the default table width of 6-bit activations (7 bits), not widened
    qm = compile_torch_model(model, x, n_bits=6, accumulator_bits=None, compile=False)
    assert signal_table_bits(qm.program, x) == {}
    assert [t.index_bits for t in _tables(qm.program)] == [7]


def test_widths_are_given_per_source_layer(block) -> None:
    _, x, qm = block
    widths = signal_table_bits(lower(qm.quantized), x)
    linear_names = {s.name for s in qm.program.steps if isinstance(s, LinearStep)}
    assert widths and set(widths) <= linear_names | {
        s.name for s in qm.program.steps if not isinstance(s, (LinearStep, TableStep))
    }
    # one source pinned to 9 bits: only its table changes
    name = sorted(widths)[0]
    program = lower(qm.quantized, {name: 9})
    changed = [
        (a.index_bits, b.index_bits)
        for a, b in zip(_tables(lower(qm.quantized)), _tables(program), strict=True)
        if a.index_bits != b.index_bits
    ]
    assert changed == [(7, 9)]


def test_narrow_accumulators_are_not_widened() -> None:
    # 8 channels at 5 bits: 14-bit accumulators, the first table keeps < 3 bits, but a
    # circuit this narrow compiles, and the table width stays the user's trade-off.
    model, x = _block(channels=8)
    qm = compile_torch_model(model, x, n_bits=5, compile=False)
    assert max(t.round_bits for t in _tables(qm.program)) < MIN_WIDENED_ACCUMULATOR_BITS
    assert [t.index_bits for t in _tables(qm.program)] == [6, 6, 6]


@pytest.mark.slow
def test_widened_block_runs_the_same_in_disable_and_simulate() -> None:
    # 8 channels at 6 bits (16-bit accumulators), the first table widened to 9 bits
    # through the same per-source widths the default uses (Concrete 2.11 finds no
    # parameters for the 21-bit accumulators of the 32-channel 8-bit block, even at the
    # automatic 7-bit tables).
    model, x = _block(channels=8)
    qm = compile_torch_model(model, x, n_bits=6, compile=False)
    first = next(s.name for s in qm.program.steps if isinstance(s, LinearStep))
    qm = QuantizedModule(qm.graph, qm.quantized, lower(qm.quantized, {first: 9}))
    assert [t.index_bits for t in _tables(qm.program)][0] == 9
    qm.compile(x[:16], p_error=1e-9)
    sample = np.random.default_rng(2).normal(size=(4, 8, 3, 3))
    np.testing.assert_array_equal(
        qm.forward(sample, fhe="disable"), qm.forward(sample, fhe="simulate")
    )
