"""One quantized graph, one lowering path (issue 13 part 1): every graph's plan comes
from quant/ptq.py (quantizers and integer weights), a chain's segments are a view of
it, and the lowering takes the weights from the plan as they are."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from fhe_quant.errors import RangeError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.lower import MAX_TABLE_BITS, LinearStep, lower
from fhe_quant.passes import simplify
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.ptq import QuantizedGraph, chain_segments, quantize_dag, quantize_graph


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(x))
        return self.c(torch.relu(self.b(h) + h))


def _graph(model: nn.Module, x: np.ndarray):
    return simplify(trace_module(model.eval(), x[:1]))


def test_a_chain_plan_and_its_segments_are_one_description() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    x = np.random.default_rng(0).normal(size=(150, 4))
    graph = _graph(model, x)
    config = QuantConfig.from_n_bits(5)
    quantized = quantize_graph(graph, x, config)
    assert quantized.dag is None and len(quantized.segments) == 3
    dag = quantize_dag(graph, graph.run(x), config)
    plan = quantized.plan  # rebuilt from the segments
    assert set(plan.tables) == set(dag.tables) and len(dag.tables) == 2
    for name, quantizer in dag.tables.items():
        assert plan.tables[name] == quantizer
    assert plan.input_quantizer == dag.input_quantizer
    assert (plan.input_name, plan.output_name) == (dag.input_name, dag.output_name)
    for name, linear in dag.linears.items():
        np.testing.assert_array_equal(plan.linears[name].weight_q, linear.weight_q)
        assert plan.linears[name].weight_quantizer == linear.weight_quantizer
    again = chain_segments(graph, plan)
    assert [s.output_quantizer for s in again] == [s.output_quantizer for s in quantized.segments]


def test_the_lowering_takes_the_weights_of_the_plan() -> None:
    x = np.random.default_rng(1).normal(size=(150, 5))
    torch.manual_seed(0)
    graph = _graph(_Residual(), x)
    quantized = quantize_graph(graph, x, QuantConfig.from_n_bits(5))
    assert quantized.dag is not None and set(quantized.dag.linears) == {"a", "b", "c"}
    program = lower(quantized)
    for step in program.steps:
        if isinstance(step, LinearStep):
            np.testing.assert_array_equal(step.weight, quantized.dag.linears[step.name].weight_q)
    # other integer weights in the plan: the program uses them, nothing is re-quantized
    linears = dict(quantized.dag.linears)
    changed = linears["c"].weight_q.copy()
    changed[0, 0] = -changed[0, 0] + 1
    linears["c"] = dataclasses.replace(linears["c"], weight_q=changed)
    edited = QuantizedGraph(
        graph,
        quantized.pre,
        (),
        quantized.config,
        dataclasses.replace(quantized.dag, linears=linears),
    )
    last = lower(edited).steps[-1]
    assert isinstance(last, LinearStep) and last.name == "c"
    np.testing.assert_array_equal(last.weight, changed)


def test_one_range_check_for_chains_and_branching_graphs() -> None:
    rng = np.random.default_rng(2)
    x = rng.normal(size=(150, 5))
    torch.manual_seed(0)
    chain = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    for model in (chain, _Residual()):
        quantized = quantize_graph(_graph(model, x), x, QuantConfig.from_n_bits(4))
        lower(quantized, table_bits=MAX_TABLE_BITS)  # the limit itself is accepted
        with pytest.raises(RangeError, match=f"would read {MAX_TABLE_BITS + 1} bits; Concrete"):
            lower(quantized, table_bits=MAX_TABLE_BITS + 1)
