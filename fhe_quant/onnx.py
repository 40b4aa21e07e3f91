"""Public ONNX API: compile a model exported by any ONNX exporter (torch, tf2onnx,
skl2onnx, ...) like :func:`fhe_quant.torch.compile_torch_model` compiles a module.

Needs the ``onnx`` package (``pip install 'fhe-quant[onnx]'``).

Examples:
    >>> import numpy as np
    >>> onnx = __import__("pytest").importorskip("onnx")
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> w = numpy_helper.from_array(np.array([[1.0, -1.0], [0.5, 2.0]], np.float32), "w")
    >>> graph = helper.make_graph(
    ...     [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["y"])],
    ...     "tiny",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
    ...     [w],
    ... )
    >>> model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    >>> x = np.random.default_rng(0).normal(size=(50, 2))
    >>> qm = compile_onnx_model(model, x, n_bits=6, compile=False)
    >>> qm.forward(x[:3]).shape
    (3, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fhe_quant.frontends.onnx import MAX_OPSET, MIN_OPSET, load_onnx, onnx_to_graph
from fhe_quant.model import QuantizedModule, post_training_module
from fhe_quant.passes import simplify
from fhe_quant.quant.config import chain_default, default_calibration
from fhe_quant.quant.ptq import check_calibration_data, is_dense_chain

__all__ = ["compile_onnx_model", "load_onnx", "MIN_OPSET", "MAX_OPSET"]


def compile_onnx_model(
    model: Any,
    X_calib: Any,
    n_bits: int | dict[str, int] = 6,
    *,
    rounding_bits: int | None = None,
    rounding: str = "exact",
    per_channel: bool = True,
    calibration: str | None = None,
    accumulator_bits: int | str | None = "auto",
    p_error: float | None = None,
    global_p_error: float | None = None,
    compile: bool = True,
    verbose: bool = False,
) -> QuantizedModule:
    """Quantize an ONNX model after training and compile it for encrypted inference.

    Args:
        model: a path to a ``.onnx`` file, its bytes, or an ``onnx.ModelProto``
            (opset 13 to 21); it is read as data, nothing in it runs.
        X_calib: representative inputs ``(N, *input_shape)``; they set the
            quantization ranges (inputs outside them are clipped).
        n_bits, rounding_bits, rounding, per_channel, calibration, accumulator_bits,
            p_error, global_p_error, compile, verbose: as in
            :func:`fhe_quant.torch.compile_torch_model`.

    Returns:
        A :class:`~fhe_quant.model.QuantizedModule`; for a model exported from torch,
        the same integer program as ``compile_torch_model`` on the module.

    Raises:
        InputError: a malformed file, or calibration data with NaN/inf or the wrong shape.
        UnsupportedOpError: an opset, op or option that cannot be compiled (its op type
            and node named).
        TraceError: the translated graph does not reproduce the ONNX model.
        ParameterError: ``n_bits`` or another parameter out of range.
    """
    graph = None
    if accumulator_bits == "auto":
        graph = onnx_to_graph(model, check_calibration_data(np.asarray(X_calib), None))
        accumulator_bits = chain_default(accumulator_bits, is_dense_chain(simplify(graph)))
    return post_training_module(
        lambda x: graph if graph is not None else onnx_to_graph(model, x),
        X_calib,
        n_bits,
        rounding_bits=rounding_bits,
        rounding=rounding,
        per_channel=per_channel,
        calibration=default_calibration(calibration, accumulator_bits),
        accumulator_bits=accumulator_bits,
        p_error=p_error,
        global_p_error=global_p_error,
        compile=compile,
        verbose=verbose,
    )
