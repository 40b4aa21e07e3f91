"""The one step protocol (issue 13 part 3): every step of a program runs, lists, counts
and reports itself, so the program, the module's statistics and the report dispatch on
no step type."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar, get_args

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant import lower
from fhe_quant.lower import (
    NUMPY,
    IntegerProgram,
    ProgramStep,
    StepBase,
    StepStatistics,
    run_steps,
    statistics_rows,
)
from fhe_quant.model import QuantizedModule
from fhe_quant.report import layer_sqnr
from fhe_quant.torch import compile_torch_model


def _weights(model: nn.Module, seed: int) -> nn.Module:
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.as_tensor(rng.normal(0, 0.5, size=tuple(p.shape)), dtype=p.dtype))
    return model.eval()


class _Branches(nn.Module):
    """A residual add, a max pool, a concatenation and a product in one model."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 2, 3, padding=1)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.a = nn.Linear(32, 4)
        self.b = nn.Linear(32, 4)
        self.head = nn.Linear(8, 3)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = self.pool(torch.relu(self.conv(h) + h)).flatten(1)
        a, b = torch.relu(self.a(h)), torch.sigmoid(self.b(h))
        return self.head(torch.cat([a * b, a], dim=1))


@pytest.fixture(scope="module")
def branching() -> QuantizedModule:
    x = np.random.default_rng(0).normal(size=(60, 1, 8, 8))
    return compile_torch_model(_weights(_Branches(), 3), x, n_bits=4, compile=False)


@pytest.fixture(scope="module")
def chain() -> QuantizedModule:
    net = _weights(nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)), 1)
    x = np.random.default_rng(0).normal(size=(60, 6))
    return compile_torch_model(net, x, n_bits=4, rounding_bits=4, compile=False)


def _codes(program: IntegerProgram, n: int = 4) -> np.ndarray:
    shape = (n,) + tuple(program.input_shape)
    return np.random.default_rng(1).integers(0, program.input_quantizer.qmax + 1, size=shape)


def test_every_step_type_implements_the_protocol(branching: QuantizedModule) -> None:
    for cls in get_args(lower.Step):
        assert issubclass(cls, StepBase), cls
        for method in ("run", "describe", "lookups_by_width", "statistics", "run_exact"):
            # each step type's own code (or, for a method it has nothing to say in, the
            # documented default)
            assert callable(getattr(cls, method)), (cls, method)
    kinds = {type(step).__name__ for step in branching.program.steps}
    assert {"AddStep", "MaxPoolStep", "ConcatStep", "ProductStep", "TableStep"} <= kinds
    assert all(isinstance(step, ProgramStep) for step in branching.program.steps)


def test_program_lookups_are_the_sum_of_its_steps(branching: QuantizedModule) -> None:
    program = branching.program
    total: dict[int, int] = {}
    for step in program.steps:
        for width, n in step.lookups_by_width().items():
            total[width] = total.get(width, 0) + n
    assert program.lookups_by_width() == total
    pools = [s for s in program.steps if type(s).__name__ == "MaxPoolStep"]
    assert sum(pools[0].lookups_by_width().values()) == pools[0].lookups(pools[0].in_shape)


def test_values_run_the_steps_one_by_one(branching: QuantizedModule) -> None:
    program = branching.program
    q = _codes(program)
    values = program.values(q)
    assert len(values) == len(program.steps) + 1
    np.testing.assert_array_equal(values[-1], program(q))
    for k, step in enumerate(program.steps):
        np.testing.assert_array_equal(
            values[k + 1], step.run(step.operands(values[: k + 1]), NUMPY)
        )
    assert len(run_steps(program.steps[:2], [q], NUMPY)) == 3


def test_exact_run_differs_from_run_only_in_rounded_tables(chain: QuantizedModule) -> None:
    program = chain.program
    rounded = [s for s in program.steps if s.rounding_text("acc") is not None]
    assert rounded, "the chain must drop bits for this test"
    q = _codes(program, 40)
    values = program.values(q)
    exact = [q]
    for k, step in enumerate(program.steps):
        exact.append(step.run_exact(step.operands(exact)))
        if step not in rounded:  # the same step on the same operand: the same output
            np.testing.assert_array_equal(step.run_exact(values[k]), step.run(values[k], NUMPY))
    np.testing.assert_array_equal(program.run_without_rounding(q), exact[-1])
    table = rounded[0]
    acc = values[program.steps.index(table)]
    assert not np.array_equal(table.run_exact(acc), table.run(acc, NUMPY))


def test_statistics_rows_merge_a_table_into_its_layer(chain: QuantizedModule) -> None:
    rows = chain.statistics["layers"]
    assert [row["layer"] for row in rows] == [s.name for s in chain.program.steps[::2]]
    linear, table = chain.program.steps[:2]
    assert rows[0] == {
        **linear.statistics().row(),
        **{k: v for k, v in table.statistics().row().items() if k != "layer"},
    }
    # a table after a row that already has its lookups starts a row of its own
    alone = statistics_rows([table, table])
    assert len(alone) == 2 and alone[0] == table.statistics().row()


def test_statistics_row_leaves_out_missing_figures() -> None:
    row = StepStatistics("pool", table_input_bits=5, lookups=12, lookups_per_output=3.0).row()
    assert row == {"layer": "pool", "table_input_bits": 5, "lookups": 12, "lookups_per_output": 3.0}
    assert list(StepStatistics("fc", 3, 7, 1, 2, 3, 4).row()) == [
        "layer",
        "accumulator_bits",
        "accumulator_max",
        "truncated_bits",
        "table_input_bits",
        "table_output_bits",
        "lookups",
    ]


@dataclass(frozen=True, eq=False)
class _Square(StepBase):
    """A step the program has never heard of: it squares its operand with one lookup."""

    name: str
    inputs: tuple[int, ...]
    bits: int
    multi_operand: ClassVar[bool] = False

    def run(self, x: Any, backend: Any) -> Any:
        return backend.lookup(np.square, x)

    def describe(self, names: Any) -> str:
        return f"{self.operand_names(names)[0]} ** 2  # square"

    def lookups_by_width(self) -> dict[int, int]:
        return {self.bits: 7}

    def statistics(self) -> StepStatistics:
        return StepStatistics(self.name, table_input_bits=self.bits, lookups=7)


def test_a_new_step_needs_no_change_to_the_program_or_the_module(
    branching: QuantizedModule,
) -> None:
    program = branching.program
    square = _Square("square", (len(program.steps),), 9)
    grown = replace(program, steps=(*program.steps, square))
    q = _codes(program)
    np.testing.assert_array_equal(grown(q), program(q) ** 2)
    assert grown.lookups_by_width()[9] == program.lookups_by_width().get(9, 0) + 7
    assert grown.source().splitlines()[-2].endswith(f"v{len(program.steps)} ** 2  # square")
    module = QuantizedModule(branching.graph, branching.quantized, grown)
    assert module.statistics["layers"][-1] == {
        "layer": "square",
        "table_input_bits": 9,
        "lookups": 7,
    }


def test_report_sqnr_reads_the_accumulators_of_layers_and_adds(
    branching: QuantizedModule,
) -> None:
    x = np.random.default_rng(2).normal(size=(10, 1, 8, 8))
    sqnr = layer_sqnr(branching, x)
    produced = {s.name for s in branching.program.steps if s.produces == "accumulator"}
    assert set(sqnr) <= produced and len(sqnr) >= 3
    assert all(np.isfinite(v) or v == float("inf") for v in sqnr.values())
