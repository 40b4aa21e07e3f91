"""ONNX frontend, modern CNN blocks: the models of ``tests/frontends/test_modern_blocks.py``
exported by ``torch.onnx.export`` (``Mul`` of two tensors, ``Transpose``, ``Slice``,
``Split``, ``Resize`` nearest, ``MaxPool``/``AveragePool`` with ``ceil_mode=1``,
``ReduceMean``) compile to the same integers as ``compile_torch_model`` on the modules;
``LayerNormalization`` and non-nearest ``Resize`` are refused by name."""

from __future__ import annotations

import importlib.util
import io
import sys
import warnings
from pathlib import Path
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

TESTS = Path(__file__).parents[1]


def _module(path: Path, name: str) -> Any:
    # NOTE: tests are imported with --import-mode=importlib (no sys.path entry).
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


blocks = _module(TESTS / "frontends" / "test_modern_blocks.py", "_modern_blocks")


def _export(module: nn.Module, shape: tuple[int, ...], **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation
        torch.onnx.export(
            module.eval(),
            (torch.zeros((1, *shape)),),
            buffer,
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
            **kwargs,
        )
    return buffer.getvalue()


EXPECTED_OPS = {
    "se": "Mul",
    "product": "Mul",
    "shuffle_view": "Transpose",
    "shuffle_permute": "Transpose",
    "shuffle_unit": "Slice",
    "max_ceil_3x3": "MaxPool",
    "upsample_scale": "Resize",
    "upsample_size": "Resize",
}


@pytest.mark.parametrize("name", sorted(EXPECTED_OPS))
def test_same_integers_as_compile_torch_model(name: str) -> None:
    model, x = blocks._case(name)
    shape = x.shape[1:]
    data = _export(model, shape)
    assert EXPECTED_OPS[name] in [n.op_type for n in onnx.load_from_string(data).graph.node]
    ours = compile_onnx_model(data, x, n_bits=5, compile=False)
    theirs = compile_torch_model(model, x, n_bits=5, compile=False)
    np.testing.assert_array_equal(ours.forward_integers(x), theirs.forward_integers(x))
    assert ours.program.lookups_by_width() == theirs.program.lookups_by_width()
    np.testing.assert_allclose(ours.forward(x), theirs.forward(x), rtol=1e-6, atol=1e-9)


def test_ceil_mode_average_pooling_follows_onnx() -> None:
    # NOTE: with count_include_pad=1 ONNX divides a window that hangs over the end by the
    # whole kernel (the positions ceil_mode adds count as padding); torch divides by the
    # part inside, and exports count_include_pad=1: the exported model is another function.
    from onnx.reference import ReferenceEvaluator

    model, x = blocks._case("avg_ceil")
    data = _export(model, x.shape[1:])
    ours = compile_onnx_model(data, x, n_bits=6, compile=False)
    (expected,) = ReferenceEvaluator(onnx.load_from_string(data)).run(
        None, {"x": x.astype(np.float32)}
    )
    np.testing.assert_allclose(ours.float_forward(x), expected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(expected, blocks._float(model, x), atol=1e-3)
    excluded = _graph(
        [
            helper.make_node(
                "AveragePool", ["x"], ["y"], kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1
            )
        ],
        [None, 1, 5, 5],
    )
    (reference,) = ReferenceEvaluator(excluded).run(None, {"x": x[:, :1].astype(np.float32)})
    torch_pool = nn.AvgPool2d(2, 2, ceil_mode=True)(torch.as_tensor(x[:, :1], dtype=torch.float32))
    np.testing.assert_allclose(reference, torch_pool.numpy(), rtol=1e-5)


@pytest.mark.slow
def test_mobilenet_v3_small_same_integers_as_torch() -> None:
    zoo = _module(TESTS / "models" / "zoo.py", "_zoo")
    model, x = zoo.build("mobilenet_v3_small", n_data=8)
    data = _export(model, x.shape[1:], training=torch.onnx.TrainingMode.PRESERVE)
    ours = compile_onnx_model(data, x, n_bits=6, compile=False)
    theirs = compile_torch_model(model, x, n_bits=6, compile=False)
    np.testing.assert_array_equal(ours.forward_integers(x), theirs.forward_integers(x))
    assert ours.program.lookups_by_width() == theirs.program.lookups_by_width()


def _graph(nodes: list[Any], shape: list[Any], inits: list[Any] | None = None) -> Any:
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * len(shape))],
        inits or [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_layer_norm_and_linear_resize_are_refused_by_name() -> None:
    inits = [
        numpy_helper.from_array(np.ones(4, np.float32), "gamma"),
        numpy_helper.from_array(np.zeros(4, np.float32), "beta"),
    ]
    norm = _graph(
        [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["y"], name="ln")],
        [None, 4],
        inits,
    )
    with pytest.raises(errors.UnsupportedOpError, match=r"LayerNormalization.*ln.*DESIGN-NOTES"):
        compile_onnx_model(norm, np.ones((4, 4)), compile=False)
    scales = [numpy_helper.from_array(np.float32([1, 1, 2, 2]), "scales")]
    linear = _graph(
        [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", name="up")],
        [None, 1, 2, 2],
        scales,
    )
    with pytest.raises(errors.UnsupportedOpError, match=r"Resize\(mode=linear\).*up"):
        compile_onnx_model(linear, np.ones((4, 1, 2, 2)), compile=False)


def test_transpose_of_the_batch_axis_is_refused() -> None:
    model = _graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0], name="swap")], [None, 4]
    )
    with pytest.raises(errors.UnsupportedOpError, match=r"batch axis.*swap"):
        compile_onnx_model(model, np.ones((4, 4)), compile=False)
