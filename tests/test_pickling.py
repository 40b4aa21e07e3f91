"""Programs are plain data: graphs, quantized graphs, integer programs, modules (compiled
or not) and QAT modules pickle and deep-copy with no custom code, and the copies compute
the same integers; a compiled copy compiles its Concrete circuit again on first use.
Graphs also have a data form (``Graph.to_dict``: JSON values and NumPy arrays)."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import pickle
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from shared_helpers import ProductShuffle
from torch import nn

from fhe_quant.errors import UnsupportedOpError
from fhe_quant.fhe import FHECircuit
from fhe_quant.ir import Graph, Node
from fhe_quant.lower import IntegerProgram, TableFunction, TableStep
from fhe_quant.torch import QATModule, compile_qat_model, compile_torch_model, prepare_qat


def _round_trips(value):
    return [copy.deepcopy(value), pickle.loads(pickle.dumps(value))]


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(40, 4))


def _residual() -> nn.Module:
    class Residual(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.a(t))
            return self.c(torch.relu(self.b(h) + h))

    torch.manual_seed(0)
    return Residual()


@pytest.mark.parametrize("kind", ["chain", "residual"])
def test_ptq_module_and_its_parts_round_trip(kind: str, x: np.ndarray) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 2))
    model = model if kind == "chain" else _residual()
    qm = compile_torch_model(model, x, n_bits=4, compile=False)
    tables = [s for s in qm.program.steps if isinstance(s, TableStep)]
    assert tables and all(isinstance(s.exact, TableFunction) for s in tables)
    expected = qm.forward_integers(x)
    reference = qm.program.run_without_rounding(qm.program.input_quantizer.quantize(x))
    for clone in _round_trips(qm):
        np.testing.assert_array_equal(clone.forward_integers(x), expected)
        np.testing.assert_array_equal(clone.forward(x), qm.forward(x))
        q = clone.program.input_quantizer.quantize(x)
        np.testing.assert_array_equal(clone.program.run_without_rounding(q), reference)
    for part in (qm.graph, qm.quantized, qm.program):
        assert all(type(c) is type(part) for c in _round_trips(part))


def test_qat_module_round_trips_without_custom_code(x: np.ndarray) -> None:
    assert "__getstate__" not in vars(QATModule) and "__deepcopy__" not in vars(QATModule)
    torch.manual_seed(1)
    qat = prepare_qat(nn.Sequential(nn.Linear(4, 6), nn.Softsign(), nn.Linear(6, 2)), n_bits=3)
    qat.initialize(x)
    qat.eval()
    expected = qat(x).detach().numpy()
    for clone in _round_trips(qat):
        np.testing.assert_array_equal(clone.eval()(x).detach().numpy(), expected)
        qm = compile_qat_model(clone, x, compile=False)
        np.testing.assert_array_equal(qm.forward(x), expected)


#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12


def test_a_compiled_module_simulates_after_pickling(x: np.ndarray) -> None:
    assert not {"__getstate__", "__reduce__", "__deepcopy__"} & set(vars(FHECircuit))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    qm = compile_torch_model(model, x, n_bits=4, p_error=TINY_P_ERROR)
    expected = qm.forward_integers(x[:6], fhe="simulate")
    np.testing.assert_array_equal(expected, qm.forward_integers(x[:6]))
    for clone in _round_trips(qm):
        circuit = clone.fhe_circuit
        assert circuit is not qm.fhe_circuit and not circuit.is_compiled
        assert circuit.program is clone.program  # shared, as in the original
        np.testing.assert_array_equal(clone.forward_integers(x[:6], fhe="simulate"), expected)
        assert circuit.is_compiled and clone.statistics["pbs_count"] == qm.statistics["pbs_count"]


def _conv_model() -> nn.Module:
    torch.manual_seed(2)
    return nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(8, 2),
        nn.Sigmoid(),
    )


def _graphs(x: np.ndarray) -> dict[str, tuple[Graph, np.ndarray]]:
    images = np.random.default_rng(1).normal(size=(40, 1, 4, 4))
    chain = nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 2))
    return {
        "chain": (compile_torch_model(chain, x, n_bits=4, compile=False).graph, x),
        "residual": (compile_torch_model(_residual(), x, n_bits=4, compile=False).graph, x),
        "conv": (compile_torch_model(_conv_model(), images, n_bits=4, compile=False).graph, images),
    }


def _to_json(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON text's values, its arrays moved to ``arrays`` (as deploy does)."""
    if isinstance(value, np.ndarray):
        arrays[str(len(arrays))] = value
        return {"array": str(len(arrays) - 1)}
    if isinstance(value, dict):
        return {key: _to_json(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_json(item, arrays) for item in value]
    assert value is None or isinstance(value, (bool, int, float, str)), type(value)
    return value


def _from_json(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(value, dict) and set(value) == {"array"}:
        return arrays[value["array"]]
    if isinstance(value, dict):
        return {key: _from_json(item, arrays) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item, arrays) for item in value]
    return value


@pytest.mark.parametrize("kind", ["chain", "residual", "conv"])
def test_graphs_round_trip_as_json_and_arrays(kind: str, x: np.ndarray) -> None:
    graph, data = _graphs(x)[kind]
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps(_to_json(graph.to_dict(), arrays))
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as stored:
        loaded = {name: stored[name] for name in stored.files}
    again = Graph.from_dict(_from_json(json.loads(text), loaded))
    assert [n.op for n in again.nodes] == [n.op for n in graph.nodes]
    assert json.dumps(_to_json(again.to_dict(), {})) == json.dumps(_to_json(graph.to_dict(), {}))
    for a, b in zip(again.nodes, graph.nodes, strict=True):
        assert a.attrs == b.attrs and a.inputs == b.inputs  # tuples again, not lists
    np.testing.assert_array_equal(again(data), graph(data))


def _bad(data: dict[str, Any], **changes: Any) -> dict[str, Any]:
    return {**copy.deepcopy(data), **changes}


def test_graph_from_dict_refuses_malformed_data() -> None:
    graph = Graph(
        (Node("x", "input"), Node("y", "add_const", ("x",), params={"constant": np.ones(2)})),
        "x",
        "y",
        (2,),
    )
    data = graph.to_dict()
    node = data["nodes"][1]
    bad_nodes = [
        {**node, "params": {"constant": [1.0, 1.0]}},  # a list, not an array
        {**node, "params": {"constant": np.array(["a", "b"])}},
        {**node, "params": {"constant": np.array([np.inf, 0.0])}},
        {**node, "attrs": {"slope": {"a": 1}}},
        {**node, "attrs": {"slope": np.ones(2)}},
        {**node, "inputs": "x"},
        {**node, "inputs": ["z"]},  # reads a node that does not exist
        {**node, "name": 3},
        {key: value for key, value in node.items() if key != "source"},
        {**node, "extra": 1},
    ]
    cases = [_bad(data, nodes=[data["nodes"][0], bad]) for bad in bad_nodes] + [
        _bad(data, input_shape=[0]),
        _bad(data, input_shape=[True]),
        _bad(data, nodes={"x": 1}),
        _bad(data, output_name="missing"),
        [data],
    ]
    for case in cases:
        with pytest.raises(ValueError):
            Graph.from_dict(case)
    with pytest.raises(UnsupportedOpError, match="no_such_op"):
        Graph.from_dict(_bad(data, nodes=[data["nodes"][0], {**node, "op": "no_such_op"}]))
    np.testing.assert_array_equal(Graph.from_dict(data)(np.zeros((1, 2))), [[1.0, 1.0]])


def test_an_onnx_module_round_trips(x: np.ndarray) -> None:
    pytest.importorskip("onnx")
    from fhe_quant.onnx import compile_onnx_model

    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2)).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        torch.onnx.export(
            model,
            (torch.zeros((1, 4)),),
            buffer,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        )
    qm = compile_onnx_model(buffer.getvalue(), x, n_bits=4, compile=False)
    for clone in _round_trips(qm):
        np.testing.assert_array_equal(clone.forward_integers(x), qm.forward_integers(x))
        np.testing.assert_array_equal(clone.forward(x), qm.forward(x))


def _concat() -> nn.Module:
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 2), nn.Linear(5, 2)

        def forward(self, t: torch.Tensor) -> torch.Tensor:
            return self.c(torch.cat([torch.relu(self.a(t)), torch.tanh(self.b(t))], dim=1))

    torch.manual_seed(4)
    return Concat()


def _product_and_shuffle() -> nn.Module:
    torch.manual_seed(5)
    return ProductShuffle()


@pytest.mark.parametrize("kind", ["chain", "residual", "conv", "concat", "product"])
def test_integer_programs_round_trip_as_json_and_arrays(kind: str, x: np.ndarray) -> None:
    images = np.random.default_rng(1).normal(size=(40, 1, 4, 4))
    model, data = {
        "chain": (nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 2)), x),
        "residual": (_residual(), x),
        "conv": (_conv_model(), images),
        "concat": (_concat(), x),
        "product": (_product_and_shuffle(), x),
    }[kind]
    qm = compile_torch_model(model, data, n_bits=4, compile=False)
    program = qm.program
    arrays: dict[str, np.ndarray] = {}
    text = json.dumps(_to_json(program.to_dict(), arrays))
    again = IntegerProgram.from_dict(_from_json(json.loads(text), arrays))
    assert [type(s) for s in again.steps] == [type(s) for s in program.steps]
    if kind == "product":
        kinds = {type(s).__name__ for s in program.steps}
        assert {"ProductStep", "GatherStep"} <= kinds
    assert again.source() == program.source()
    assert again.lookups_by_width() == program.lookups_by_width()
    q = qm.quantize_input(data)
    np.testing.assert_array_equal(again(q), program(q))
    np.testing.assert_array_equal(again.run_without_rounding(q), program.run_without_rounding(q))


def test_integer_program_from_dict_refuses_malformed_data(x: np.ndarray) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    data = compile_torch_model(model, x, n_bits=4, compile=False).program.to_dict()
    linear, table = data["steps"][0], data["steps"][1]
    cases = [
        {**data, "steps": [{**linear, "step_type": "NoSuchStep"}]},
        {**data, "steps": [{key: v for key, v in linear.items() if key != "step_type"}]},
        {**data, "steps": [{**linear, "weight": linear["weight"].tolist()}]},
        {**data, "steps": [{**linear, "weight": np.array(["a"])}]},
        {**data, "steps": [{**linear, "inputs": [1.5]}]},
        {**data, "steps": [{**linear, "name": 1}]},
        {**data, "steps": [{**linear, "extra": 1}]},
        {**data, "steps": [linear, {**table, "lsbs": True}]},
        {**data, "steps": [linear, {**table, "exact": {"scale": 1}}]},
        {**data, "steps": [linear, {**table, "out_shape": "5"}]},
        {**data, "input_shape": [4.0]},
        {**data, "input_quantizer": {"bits": 4}},
        {key: v for key, v in data.items() if key != "steps"},
        [data],
    ]
    for case in cases:
        with pytest.raises(ValueError):
            IntegerProgram.from_dict(case)


def test_a_step_that_is_not_data_has_no_data_form(x: np.ndarray) -> None:
    @dataclasses.dataclass(frozen=True)
    class Lookup:  # data, but of a type from_dict cannot read back
        table: np.ndarray

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    program = compile_torch_model(model, x, n_bits=4, compile=False).program
    table = program.steps[1]
    for exact in (lambda acc: acc, Lookup(np.zeros((5, 2)))):
        step = dataclasses.replace(table, exact=exact)
        with pytest.raises(TypeError, match=r"TableStep\.exact"):
            step.to_dict()
        with pytest.raises(TypeError, match=r"TableStep\.exact"):
            dataclasses.replace(program, steps=(program.steps[0], step)).to_dict()
