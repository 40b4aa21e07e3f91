"""ONNX frontend: torch models exported to ONNX compile to the same integers as the
modules themselves; unsupported ops, malformed files and opsets are refused by name."""

from __future__ import annotations

import io
import warnings
from typing import Any

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
torch = pytest.importorskip("torch")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402
from torch import nn  # noqa: E402

from fhe_quant import errors  # noqa: E402
from fhe_quant.onnx import compile_onnx_model  # noqa: E402
from fhe_quant.torch import compile_torch_model  # noqa: E402

TINY_P_ERROR = 1e-12


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.stem(x))
        return self.head(torch.flatten(self.pool(y + torch.relu(self.conv(y))), 1))


def _models() -> dict[str, tuple[nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    return {
        "mlp": (
            nn.Sequential(
                nn.Linear(6, 12),
                nn.ReLU(),
                nn.Dropout(0.1),
                nn.Linear(12, 8),
                nn.Sigmoid(),
                nn.Linear(8, 3),
            ),
            (6,),
        ),
        "cnn_bn": (
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.BatchNorm2d(4),
                nn.LeakyReLU(0.1),
                nn.AvgPool2d(2),
                nn.Conv2d(4, 4, 3),
                nn.ReLU6(),
                nn.Flatten(),
                nn.Linear(4 * 2 * 2, 3),
            ),
            (1, 8, 8),
        ),
        "residual": (Residual(), (1, 8, 8)),
        "max_pool": (
            nn.Sequential(
                nn.Conv2d(1, 4, 3, padding=1),
                nn.ReLU(),
                nn.MaxPool2d(2),
                nn.Conv2d(4, 4, 1),
                nn.Tanh(),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
                nn.Linear(4, 2),
            ),
            (1, 8, 8),
        ),
    }


def _randomize_batch_norm(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def _export(module: nn.Module, shape: tuple[int, ...], **kwargs: Any) -> bytes:
    # NOTE: torch 2.13's default (dynamo) exporter needs onnxscript, which is not
    # installed (and not needed): the TorchScript exporter, deprecated but kept, is used.
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the deprecation, and advice on constant folding
        _torch_export(module, shape, buffer, **kwargs)
    return buffer.getvalue()


def _torch_export(module: nn.Module, shape: tuple[int, ...], buffer: Any, **kwargs: Any) -> None:
    torch.onnx.export(
        module.eval(),
        (torch.zeros((1, *shape)),),
        buffer,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
        **kwargs,
    )


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual", "max_pool"])
def test_same_integers_as_compile_torch_model(name: str) -> None:
    module, shape = _models()[name]
    with torch.no_grad():
        _randomize_batch_norm(module)
    x = np.random.default_rng(0).normal(size=(64, *shape))
    # NOTE: TrainingMode.PRESERVE on an eval module keeps BatchNormalization nodes (the
    # default EVAL mode folds them into the conv in float32, a different float model).
    data = _export(module, shape, training=torch.onnx.TrainingMode.PRESERVE)
    ours = compile_onnx_model(data, x, n_bits=5, compile=False)
    theirs = compile_torch_model(module, x, n_bits=5, compile=False)
    np.testing.assert_array_equal(ours.forward_integers(x), theirs.forward_integers(x))
    # NOTE: the dequantized outputs agree to float32's precision only: ONNX stores batch
    # norm's epsilon as a float32 (1e-5 becomes 9.99999975e-06).
    np.testing.assert_allclose(ours.forward(x), theirs.forward(x), rtol=1e-6, atol=1e-9)
    assert ours.program.lookups_by_width() == theirs.program.lookups_by_width()
    ops = [n.op_type for n in onnx.load_from_string(data).graph.node]
    if name == "cnn_bn":
        assert "BatchNormalization" in ops


def test_accumulator_budget_gives_the_same_integers_as_torch() -> None:
    module, shape = _models()["mlp"]
    x = np.random.default_rng(1).normal(size=(64, *shape))
    data = _export(module, shape)
    ours = compile_onnx_model(data, x, n_bits=5, accumulator_bits=9, compile=False)
    theirs = compile_torch_model(module, x, n_bits=5, accumulator_bits=9, compile=False)
    np.testing.assert_array_equal(ours.forward_integers(x), theirs.forward_integers(x))
    assert ours.program.lookups_by_width() == theirs.program.lookups_by_width()


def test_folded_batch_norm_export_is_close(tmp_path: Any) -> None:
    module, shape = _models()["cnn_bn"]
    with torch.no_grad():
        _randomize_batch_norm(module)
    x = np.random.default_rng(1).normal(size=(64, *shape))
    path = tmp_path / "cnn.onnx"
    path.write_bytes(_export(module, shape))
    assert "BatchNormalization" not in [n.op_type for n in onnx.load(path).graph.node]
    ours = compile_onnx_model(path, x, n_bits=6, compile=False)
    np.testing.assert_allclose(
        ours.float_forward(x),
        module(torch.as_tensor(x, dtype=torch.float32)).detach().numpy(),
        rtol=1e-4,
        atol=1e-4,
    )


@pytest.mark.slow
def test_simulate_equals_disable() -> None:
    module, shape = _models()["max_pool"]
    x = np.random.default_rng(2).normal(size=(32, *shape))
    qm = compile_onnx_model(_export(module, shape), x, n_bits=3, p_error=TINY_P_ERROR)
    np.testing.assert_array_equal(
        qm.forward_integers(x[:4], fhe="simulate"), qm.forward_integers(x[:4])
    )


@pytest.mark.slow
@pytest.mark.execute
def test_execute() -> None:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    x = np.random.default_rng(3).normal(size=(32, 4))
    qm = compile_onnx_model(_export(module, (4,)), x, n_bits=3, p_error=TINY_P_ERROR)
    assert qm.statistics["max_bit_width"] <= 8
    np.testing.assert_array_equal(
        qm.forward_integers(x[:1], fhe="execute"), qm.forward_integers(x[:1])
    )


# --------------------------------------------------------------------------- bad input


def _tiny(nodes: list[Any], opset: int = 17, inits: list[Any] | None = None) -> Any:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, None])],
        inits or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_unsupported_op_is_named_with_its_node() -> None:
    model = _tiny([helper.make_node("Softmax", ["x"], ["y"], name="the_softmax")])
    with pytest.raises(errors.UnsupportedOpError, match=r"'Softmax' at 'the_softmax \(Softmax\)'"):
        compile_onnx_model(model, np.ones((4, 4)), compile=False)
    quotient = _tiny([helper.make_node("Div", ["x", "x"], ["y"], name="ratio")])
    with pytest.raises(errors.UnsupportedOpError, match=r"two encrypted operands.*ratio"):
        compile_onnx_model(quotient, np.ones((4, 4)), compile=False)


def test_unsupported_opset_and_malformed_files(tmp_path: Any) -> None:
    old = _tiny([helper.make_node("Relu", ["x"], ["y"])], opset=11)
    with pytest.raises(errors.UnsupportedOpError, match="opset 11"):
        compile_onnx_model(old, np.ones((4, 4)), compile=False)
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"\x08\x07garbage that is not protobuf \xff\xff")
    with pytest.raises(errors.InputError, match="Not a valid ONNX model"):
        compile_onnx_model(broken, np.ones((4, 4)), compile=False)
    with pytest.raises(errors.InputError, match="Cannot read"):
        compile_onnx_model(tmp_path / "missing.onnx", np.ones((4, 4)), compile=False)
    dangling = _tiny([helper.make_node("Relu", ["nowhere"], ["y"])])
    with pytest.raises(errors.InputError, match="Not a valid ONNX model"):
        compile_onnx_model(dangling, np.ones((4, 4)), compile=False)
    with pytest.raises(errors.InputError):
        compile_onnx_model(_tiny([helper.make_node("Relu", ["x"], ["y"])]), [[np.nan] * 4])


def test_gemm_attributes_and_constant_arithmetic() -> None:
    rng = np.random.default_rng(4)
    w = rng.normal(size=(3, 4)).astype(np.float32)
    c = rng.normal(size=(3,)).astype(np.float32)
    nodes = [
        helper.make_node("Sub", ["x", "shift"], ["s"]),
        helper.make_node("Gemm", ["s", "w", "c"], ["g"], alpha=0.5, beta=2.0, transB=1),
        helper.make_node("Clip", ["g", "lo", "hi"], ["y"]),
    ]
    inits = [
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(c, "c"),
        numpy_helper.from_array(np.float32([0.1, 0.2, 0.3, 0.4]), "shift"),
        numpy_helper.from_array(np.float32(-1.0), "lo"),
        numpy_helper.from_array(np.float32(1.0), "hi"),
    ]
    x = rng.normal(size=(40, 4))
    qm = compile_onnx_model(_tiny(nodes, inits=inits), x, n_bits=8, compile=False)
    expected = np.clip(0.5 * (x - [0.1, 0.2, 0.3, 0.4]) @ w.T.astype(np.float64) + 2 * c, -1, 1)
    np.testing.assert_allclose(qm.float_forward(x), expected, atol=1e-5)
    assert [n.op for n in qm.graph.nodes][-1] == "hardtanh"


def test_numpy_stays_below_2_next_to_concrete() -> None:
    import concrete  # noqa: F401 - installed next to numpy

    assert int(np.__version__.split(".")[0]) < 2, (
        f"numpy {np.__version__} is installed beside concrete-python, which needs numpy<2: "
        "an extra (onnx >= 1.18, ml-dtypes >= 0.5) moved it; see pyproject.toml's pins."
    )
