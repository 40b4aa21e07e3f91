"""A quantized graph is plain data: ``QuantizedGraph.to_dict`` gives JSON values and NumPy
arrays, ``from_dict`` reads them back checking every field's declared type, and lowering
the copy gives the identical integer program (``IntegerProgram.to_dict`` equal)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from shared_helpers import ProductShuffle, assert_same_data, through_json
from torch import nn

from fhe_quant.errors import InputError, UnsupportedOpError
from fhe_quant.lower import lower
from fhe_quant.quant.ptq import AddOperand, QuantizedDag, QuantizedGraph, QuantizedLinear
from fhe_quant.quant.widths import ProductPlan
from fhe_quant.torch import compile_torch_model


class _Residual(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, width), nn.Linear(width, width), nn.Linear(width, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.a(t))
        return self.c(torch.relu(self.b(h) + h))


class _Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 2)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.c(torch.cat([torch.relu(self.a(t)), torch.tanh(self.b(t))], dim=1))


def _model(kind: str) -> tuple[nn.Module, np.ndarray]:
    torch.manual_seed(3)
    x = np.random.default_rng(0).normal(size=(120, 4))
    images = np.random.default_rng(1).normal(size=(120, 1, 4, 4))
    pool = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 2)
    )
    avg = nn.Sequential(
        nn.Conv2d(1, 2, 3), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(2, 2)
    )
    return {
        "chain": (nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 2), nn.Sigmoid()), x),
        "residual": (_Residual(), x),
        "concat": (_Concat(), x),
        "maxpool": (pool, images),
        "avgpool": (avg, images),
        "product": (ProductShuffle(), x),
    }[kind]


def _quantized(kind: str, **options: Any) -> QuantizedGraph:
    model, x = _model(kind)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return compile_torch_model(model, x, compile=False, **{"n_bits": 4, **options}).quantized


KINDS = ["chain", "residual", "concat", "maxpool", "avgpool", "product"]


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_graphs_round_trip_to_the_identical_program(kind: str) -> None:
    qg = _quantized(kind)
    assert (qg.dag is None) == (kind in ("chain", "avgpool"))
    if kind == "product":
        assert qg.plan.products and isinstance(next(iter(qg.plan.products.values())), ProductPlan)
    again = QuantizedGraph.from_dict(through_json(qg.to_dict()))
    assert_same_data(again.to_dict(), qg.to_dict())
    program, copy = lower(qg), lower(again)
    assert_same_data(copy.to_dict(), program.to_dict())
    q = program.input_quantizer.quantize(_model(kind)[1][:20])
    np.testing.assert_array_equal(copy(q), program(q))


def test_the_plan_classes_each_round_trip() -> None:
    plan = _quantized("residual", accumulator_bits=12).plan
    linear = next(iter(plan.linears.values()))
    operand = next(iter(plan.adds.values()))[0]
    for value in (plan, linear, operand):
        again = type(value).from_dict(value.to_dict())
        assert type(again) is type(value)
        assert_same_data(again.to_dict(), value.to_dict())
    assert isinstance(QuantizedLinear.from_dict(linear.to_dict()).weight_q, np.ndarray)


def _residual_graph(width: int, bits: int, seed: int, per_channel: bool) -> QuantizedGraph:
    torch.manual_seed(seed)
    x = np.random.default_rng(seed).normal(size=(110, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = compile_torch_model(
            _Residual(width), x, n_bits=bits, compile=False, per_channel=per_channel
        )
    return qm.quantized


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    kind=st.sampled_from(["chain", "residual"]),
    width=st.integers(2, 6),
    bits=st.integers(2, 6),
    seed=st.integers(0, 2**16),
    per_channel=st.booleans(),
)
def test_lowering_a_round_tripped_graph_gives_the_identical_program(
    kind: str, width: int, bits: int, seed: int, per_channel: bool
) -> None:
    if kind == "residual":
        qg = _residual_graph(width, bits, seed, per_channel)
    else:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(4, width), nn.GELU(), nn.Linear(width, 3))
        x = np.random.default_rng(seed).normal(size=(110, 4))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qg = compile_torch_model(
                model, x, n_bits=bits, compile=False, per_channel=per_channel
            ).quantized
    again = QuantizedGraph.from_dict(through_json(qg.to_dict()))
    assert_same_data(lower(again).to_dict(), lower(qg).to_dict())


def _edit(data: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    """A deep copy of ``data`` with the item at ``path`` replaced (``...``: removed)."""
    copy = through_json(data)
    target = copy
    for key in path[:-1]:
        target = target[key]
    if value is ...:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return copy


def test_bad_data_is_refused_naming_the_field() -> None:
    data = _quantized("residual").to_dict()
    name = next(iter(data["dag"]["linears"]))
    add = next(iter(data["dag"]["adds"]))
    cases = [
        (("config", "n_bits_weights"), 99, r"QuantizedGraph\.config"),
        (("config", "per_channel"), ..., r"QuantizedGraph\.config.*missing \['per_channel'\]"),
        (("dag", "linears", name, "weight_q"), [[1, 2]], rf"linears\['{name}'\]\.weight_q"),
        (("dag", "linears", name, "weight_q"), np.array(["a"]), r"weight_q must be a numeric"),
        (("dag", "adds", add, 0, "mode"), "sum", rf"adds\['{add}'\]\[0\]\.mode"),
        (("dag", "adds", add, 0, "sign"), True, r"\.sign must be a int"),
        (("dag", "input_quantizer", "bits"), "4", r"QuantizedGraph\.dag\.input_quantizer"),
        (("dag", "tables"), [1], r"QuantizedGraph\.dag\.tables must be a dict"),
        (("dag", "output_name"), 3, r"QuantizedGraph\.dag\.output_name must be a str"),
        (("dag", "extra"), 1, r"QuantizedGraph\.dag: a QuantizedDag .*unknown keys \['extra'\]"),
        (("segments",), {}, r"QuantizedGraph\.segments must be a list"),
        (("graph", "input_shape"), [0], r"QuantizedGraph\.graph: .*positive ints"),
        (("pre",), [{"name": "x"}], r"QuantizedGraph\.pre\[0\]"),
    ]
    for path, value, message in cases:
        with pytest.raises(InputError, match=message):
            QuantizedGraph.from_dict(_edit(data, path, value))
    with pytest.raises(InputError, match="must be a dict"):
        QuantizedGraph.from_dict([data])
    with pytest.raises(UnsupportedOpError, match="no_such_op"):  # as Graph.from_dict does
        QuantizedGraph.from_dict(_edit(data, ("graph", "nodes", 1, "op"), "no_such_op"))
    with pytest.raises(InputError, match=r"ProductPlan has the keys"):
        QuantizedDag.from_dict({**data["dag"], "products": {"p": {"bound_a": 1}}})
    with pytest.raises(InputError, match=r"AddOperand\.node must be a str"):
        AddOperand.from_dict({"node": None, "sign": 1, "mode": "acc"})


def test_a_chain_from_segments_round_trips_with_its_segments() -> None:
    qg = _quantized("chain", accumulator_bits=10)
    assert qg.segments and qg.dag is None
    again = QuantizedGraph.from_dict(qg.to_dict())
    assert again.dag is None and len(again.segments) == len(qg.segments)
    assert again.segments[-1].output_quantizer is None
    assert_same_data(lower(again).to_dict(), lower(qg).to_dict())


def test_a_qat_built_graph_round_trips_to_the_identical_program() -> None:
    from fhe_quant.torch import compile_qat_model, prepare_qat

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qm = compile_qat_model(prepare_qat(net, n_bits=3, X_sample=x), x, compile=False)
    qg = qm.quantized  # built from QAT's segments, not by quantize_graph
    assert qg.dag is None and len(qg.segments) == 2
    again = QuantizedGraph.from_dict(through_json(qg.to_dict()))
    assert_same_data(lower(again).to_dict(), lower(qg).to_dict())
    q = qm.quantize_input(x)
    np.testing.assert_array_equal(lower(again)(q), qm.program(q))
