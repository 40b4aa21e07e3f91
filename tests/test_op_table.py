"""One table per fact: every list of elementwise operations, observers and estimator
errors is derived from its one source, and an operation added as one row of
:data:`fhe_quant.ir.ELEMENTWISE` (Mish, Softsign) works everywhere, bit for bit."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fhe_quant
from fhe_quant import errors, passes
from fhe_quant import qat as public_qat
from fhe_quant import sklearn as fs
from fhe_quant.frontends import torch as torch_frontend
from fhe_quant.frontends.torch import trace_module
from fhe_quant.ir import ELEMENTWISE, OPS, Node
from fhe_quant.qat import NeuralNetClassifier, compile_qat_model, prepare_qat
from fhe_quant.quant import calibrate
from fhe_quant.quant.qat import TORCH_ELEMENTWISE
from fhe_quant.torch import compile_torch_model
from fhe_quant.training import fit

TINY_P_ERROR = 1e-12

# --------------------------------------------------------------------------- drift


def test_the_op_table_and_the_elementwise_rows_agree() -> None:
    assert {op for op, spec in OPS.items() if spec.kind == "elementwise"} == set(ELEMENTWISE)


def test_torch_frontend_tables_are_the_rows() -> None:
    modules = {
        cls: rule(cls(), (2, 3))[0]
        for cls, rule in torch_frontend._MODULES.items()
        if cls.__name__ in {name for row in ELEMENTWISE.values() for name in row.torch_modules}
    }
    expected = {getattr(nn, n): op for op, row in ELEMENTWISE.items() for n in row.torch_modules}
    assert modules == expected
    # Every other module rule is a linear layer, a pooling, a batch norm, a reshape or a
    # move of values (upsampling, channel shuffle).
    others = {cls.__name__ for cls in set(torch_frontend._MODULES) - set(expected)}
    assert others == {
        "Linear", "Conv1d", "Conv2d", "BatchNorm1d", "BatchNorm2d", "AvgPool1d", "AvgPool2d",
        "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "MaxPool1d", "MaxPool2d",
        "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "Flatten", "Unflatten",
        "Upsample", "UpsamplingNearest2d", "ChannelShuffle",
    }  # fmt: skip
    functions = {f: op for f, (op, _) in torch_frontend._ACTIVATION_FUNCTIONS.items()}
    assert functions == {
        torch_frontend._torch_object(name): op
        for op, row in ELEMENTWISE.items()
        for name in row.torch_functions
    }
    methods = {m: op for m, (op, _) in torch_frontend._ACTIVATION_METHODS.items()}
    assert methods == {m: op for op, row in ELEMENTWISE.items() for m in row.torch_methods}


def test_qat_passes_and_estimator_tables_are_the_rows() -> None:
    assert set(TORCH_ELEMENTWISE) == set(ELEMENTWISE)
    assert passes._MONOTONE == {op for op, row in ELEMENTWISE.items() if row.monotone is True}
    assert public_qat._ACTIVATIONS == {
        op: getattr(nn, row.torch_modules[0]) for op, row in ELEMENTWISE.items() if row.estimator
    }
    assert {"mish", "softsign"} <= set(public_qat._ACTIVATIONS)


def test_observers_are_listed_once() -> None:
    assert calibrate.CALIBRATION_METHODS == tuple(calibrate.OBSERVERS)
    for method, cls in calibrate.OBSERVERS.items():
        assert type(calibrate.make_observer(method)) is cls


def test_estimator_errors_live_in_errors() -> None:
    assert fs.EstimatorNotFittedError is errors.EstimatorNotFittedError
    assert fs.EstimatorParameterError is errors.EstimatorParameterError
    assert public_qat.QATNotFittedError is errors.EstimatorNotFittedError
    assert public_qat.QATParameterError is errors.EstimatorParameterError


#: Literals outside ir.py that list elementwise op names for another reason.
_OTHER_FACTS = {
    ("frontends/sklearn/neural.py", "HIDDEN_ACTIVATIONS"): "scikit-learn's activation names",
}


def _op_name_literals(path: pathlib.Path) -> list[tuple[str, int]]:
    """Dict, set, list and tuple literals holding 3 or more elementwise op names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Dict):
            items = node.keys
        elif isinstance(node, ast.Set | ast.List | ast.Tuple):
            items = node.elts
        else:
            continue
        names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in OPS]
        if len({n for n in names if n in ELEMENTWISE}) >= 3:
            found.append((path.name, node.lineno))
    return found


def test_no_other_module_lists_elementwise_ops() -> None:
    root = pathlib.Path(fhe_quant.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root).as_posix()
        if relative == "ir.py":
            continue
        text = path.read_text(encoding="utf-8")
        for _, line in _op_name_literals(path):
            assigned = text.splitlines()[line - 1].split(":")[0].split("=")[0].strip()
            if (relative, assigned) not in _OTHER_FACTS:
                found.append(f"{relative}:{line} ({assigned})")
    assert not found, f"elementwise ops listed outside fhe_quant.ir.ELEMENTWISE: {found}"


def test_the_drift_checker_sees_a_hand_kept_table(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "m.py"
    path.write_text('X = {"relu": 1, "tanh": 2, "sigmoid": 3}\nY = ("relu", "linear")\n')
    assert _op_name_literals(path) == [("m.py", 1)]


# --------------------------------------------------------------------------- Mish, Softsign

NEW = [("mish", nn.Mish, F.mish), ("softsign", nn.Softsign, F.softsign)]


class _Functional(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 6), nn.Linear(6, 3)
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fn(self.fc1(x)))


def _models(act: type[nn.Module], fn) -> list[nn.Module]:
    torch.manual_seed(3)
    return [nn.Sequential(nn.Linear(4, 6), act(), nn.Linear(6, 3)), _Functional(fn)]


@pytest.mark.parametrize(("op", "act", "fn"), NEW, ids=[n for n, _, _ in NEW])
def test_float_op_equals_torch(op: str, act: type[nn.Module], fn) -> None:
    x = np.concatenate([np.linspace(-30.0, 30.0, 601), [-1e3, 1e3, 0.0]])
    node = Node("n", op, ("x",))
    expected = act().double()(torch.tensor(x)).numpy()
    np.testing.assert_allclose(node.evaluate(x), expected, rtol=1e-13, atol=1e-15)
    np.testing.assert_array_equal(fn(torch.tensor(x)).numpy(), expected)


@pytest.mark.parametrize(("op", "act", "fn"), NEW, ids=[n for n, _, _ in NEW])
def test_module_and_functional_forms_trace_to_the_row(op: str, act, fn) -> None:
    x = np.random.default_rng(0).normal(size=(8, 4))
    for model in _models(act, fn):
        graph = trace_module(model, x)
        assert [n.op for n in graph.nodes] == ["input", "linear", op, "linear"]


@pytest.mark.slow
@pytest.mark.parametrize(("op", "act", "fn"), NEW, ids=[n for n, _, _ in NEW])
def test_ptq_simulate_equals_disable(op: str, act, fn) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 4))
    x_test = np.concatenate([rng.normal(size=(6, 4)), rng.normal(size=(2, 4)) * 50])
    for model in _models(act, fn):
        qm = compile_torch_model(model, x, n_bits=4, p_error=TINY_P_ERROR)
        clear = qm.forward_integers(x_test, fhe="disable")
        np.testing.assert_array_equal(qm.forward_integers(x_test, fhe="simulate"), clear)
        assert (
            np.corrcoef(qm.forward(x_test[:6]).ravel(), qm.float_forward(x_test[:6]).ravel())[0, 1]
            > 0.9
        )


@pytest.mark.slow
@pytest.mark.execute
def test_mish_execute_equals_disable() -> None:
    model = _models(nn.Mish, F.mish)[0]
    x = np.random.default_rng(2).normal(size=(40, 4))
    qm = compile_torch_model(model, x, n_bits=3, rounding_bits=4, p_error=TINY_P_ERROR)
    clear = qm.forward_integers(x[:1], fhe="disable")
    np.testing.assert_array_equal(qm.forward_integers(x[:1], fhe="execute"), clear)


@pytest.mark.parametrize(("op", "act", "fn"), NEW, ids=[n for n, _, _ in NEW])
def test_qat_forward_is_the_integer_program(op: str, act, fn) -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(size=(64, 4))
    y = (x[:, 0] > 0).astype(int)
    for model in _models(act, fn):
        qat = prepare_qat(model, n_bits=3)
        fit(qat, x, y, epochs=1, batch_size=32, verbose=False)
        assert [layer for layer in qat.graph.nodes if layer.op == op]
        qm = compile_qat_model(qat, x, compile=False)
        with torch.no_grad():
            np.testing.assert_array_equal(qat.eval()(x).numpy(), qm.forward(x))
        np.testing.assert_array_equal(qat.forward_integers(x), qm.forward_integers(x))


def test_estimators_offer_the_new_activations() -> None:
    x = np.random.default_rng(5).normal(size=(40, 3))
    y = (x[:, 0] > 0).astype(int)
    model = NeuralNetClassifier(n_hidden=4, n_layers=2, activation="softsign", epochs=1)
    model.fit(x, y)
    assert isinstance(model.qat_module_.graph.nodes[2], Node)
    assert [n.op for n in model.qat_module_.graph.nodes].count("softsign") == 1
    with pytest.raises(errors.EstimatorParameterError, match="activation"):
        NeuralNetClassifier(activation="softmax").fit(x, y)
