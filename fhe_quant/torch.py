"""Public PyTorch API: post-training quantization and compilation of a ``torch.nn.Module``.

Examples:
    >>> import numpy as np, torch
    >>> from fhe_quant.torch import compile_torch_model
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = np.random.default_rng(0).normal(size=(100, 4))
    >>> qm = compile_torch_model(net, x, n_bits=4, compile=False)
    >>> qm.forward(x[:3], fhe="disable").shape
    (3, 2)
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fhe_quant.errors import ParameterError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.model import (
    QuantizedModule,
    build_quantized_module,
    post_training_module,
    rounding_exact,
)
from fhe_quant.qat_module import QATModule
from fhe_quant.qat_prepare import NotAQATModuleError, compile_qat_model, prepare_qat
from fhe_quant.passes import simplify
from fhe_quant.quant.config import chain_default, default_calibration
from fhe_quant.quant.ptq import check_calibration_data, is_dense_chain

__all__ = [
    "compile_torch_model",
    "prepare_qat",
    "compile_qat_model",
    "QATModule",
    "NotAQATModuleError",
    "QuantizedModule",
]


def compile_torch_model(
    module: Any,
    X_calib: Any,
    n_bits: int | dict[str, int] | str = 6,
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
    max_accuracy_drop: float = 0.01,
    validation: Any = None,
    seed: int = 0,
) -> QuantizedModule:
    """Quantize a trained module after training and compile it for encrypted inference.

    Args:
        module: a trained ``torch.nn.Module`` taking one tensor (not modified).
        X_calib: representative inputs ``(N, *input_shape)`` (NumPy or torch); they set
            the quantization ranges, and inputs outside them are clipped.
        n_bits: bits for every role, or a dict with keys ``inputs``, ``weights``,
            ``activations``, ``outputs`` (the last layer's weights), or ``"auto"``: the
            weight and activation bits, table width (``rounding_bits``) and
            per-channel weights of least estimated latency whose validation metric
            stays within ``max_accuracy_drop`` of the float model's
            (:mod:`fhe_quant.search`; the candidates tried are in the result's
            ``search_report_``). Candidates are compiled, never keyed.
        rounding_bits: width of every table's input; the accumulator's low bits are
            dropped exactly down to it. ``None`` picks a width per layer from its output
            bits (see :func:`fhe_quant.lower.auto_table_bits`).
        rounding: ``"exact"`` drops the low bits exactly (one small bootstrap per bit;
            ``disable``, ``simulate`` and ``execute`` agree bit for bit) or
            ``"approximate"`` lets the table lookup round (no extra bootstrap, much
            faster, but a value near a cell border may land one cell off in FHE).
        per_channel: per-output-channel weight scales (no extra cost in FHE).
        calibration: ``"minmax"``, ``"percentile"``, ``"ema"`` or ``"mse"``; ``None``
            (default): ``"mse"`` with ``accumulator_bits="auto"``, else ``"minmax"``
            (:func:`~fhe_quant.quant.config.default_calibration`).
        accumulator_bits: bound every linear layer's *proven* accumulator to this many
            bits (2 to 16): the integer weights are chosen under that budget, each
            rounding corrected on ``X_calib`` against the quantized model's own values
            (see :mod:`fhe_quant.quant.axe`), so fewer low bits are dropped before each
            table. ``"auto"`` (default): the narrowest width whose calibration SQNR
            stays close to the best (one for the model,
            :func:`~fhe_quant.quant.ptq.model_accumulator_bits`), with 4-bit tables
            unless ``rounding_bits`` is given and activation codes no wider than the
            tables (see :class:`~fhe_quant.quant.config.QuantConfig`); digits MLP at
            ``n_bits=6``: 11-bit accumulators, complexity 5.9e10 (10x less than
            ``None``). Dense chain models only: a branching one (residual adds,
            concatenations, max pooling, products) or one with convolutions or average
            pooling keeps ``None`` (:func:`~fhe_quant.quant.ptq.is_dense_chain` says
            why), which ``result.quantized.config`` records
            (:func:`~fhe_quant.quant.config.chain_default`). ``None``: no bound (weights rounded to nearest; the behaviour
            before the default changed).
        p_error: error probability of each table lookup (``None``: Concrete's default).
        global_p_error: error probability of the whole circuit.
        compile: compile with Concrete now (else only ``fhe="disable"`` works until
            ``.compile(X)`` is called).
        verbose: show progress bars.
        max_accuracy_drop: with ``n_bits="auto"``, the largest drop of the validation
            metric (accuracy for integer labels, else R²) allowed.
        validation: with ``n_bits="auto"``, ``(X_val, y_val)``.
        seed: with ``n_bits="auto"``, picks the validation subset of a large set.

    Returns:
        A :class:`~fhe_quant.model.QuantizedModule`.

    Raises:
        UnsupportedOpError: a layer is not supported (named, with its place).
        TraceError: the module cannot be traced.
        InputError: calibration data with NaN/inf or of the wrong shape.
        ParameterError: ``n_bits`` or another parameter out of range.
        AccumulatorBudgetError: ``accumulator_bits`` too small for a layer (named, with
            the smallest width that works); a :class:`~fhe_quant.errors.RangeError`.
        AccuracyBudgetError: ``n_bits="auto"`` and no candidate meets the budget.
    """
    if isinstance(n_bits, str) and n_bits == "auto":
        calibration = default_calibration(calibration, None)
        return _compile_auto(
            module,
            X_calib,
            validation,
            max_accuracy_drop=max_accuracy_drop,
            rounding_exact=rounding_exact(rounding),
            calibration=calibration,
            seed=seed,
            verbose=verbose,
            compile=compile,
        )
    if validation is not None:
        raise ParameterError(
            f"The 'validation' parameter is only used with n_bits='auto'; got n_bits={n_bits!r}."
        )
    if hasattr(X_calib, "detach"):
        X_calib = X_calib.detach().cpu().numpy()
    graph = None
    if accumulator_bits == "auto":
        graph = trace_module(module, check_calibration_data(np.asarray(X_calib), None))
        accumulator_bits = chain_default(accumulator_bits, is_dense_chain(simplify(graph)))
    return post_training_module(
        lambda x: graph if graph is not None else trace_module(module, x),
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


def _compile_auto(
    module: Any,
    X_calib: Any,
    validation: Any,
    *,
    max_accuracy_drop: float,
    rounding_exact: bool,
    calibration: str,
    seed: int,
    verbose: bool,
    compile: bool,
) -> QuantizedModule:
    """``n_bits="auto"``: trace once, then :func:`fhe_quant.search.search_torch`."""
    from fhe_quant.passes import simplify
    from fhe_quant.search import check_validation, search_torch

    if not compile:
        raise ParameterError(
            "n_bits='auto' compiles its candidates to compare their cost; compile=False "
            "cannot be combined with it."
        )
    if hasattr(X_calib, "detach"):
        X_calib = X_calib.detach().cpu().numpy()
    x = check_calibration_data(np.asarray(X_calib), None)
    graph = simplify(trace_module(module, x))
    x_val, y_val = check_validation(validation, graph.input_shape)

    def build(config: Any) -> QuantizedModule:
        return build_quantized_module(graph, x, config, compile=False)

    return search_torch(
        build,
        graph,
        x,
        (x_val, y_val),
        max_accuracy_drop=max_accuracy_drop,
        rounding_exact=rounding_exact,
        seed=seed,
        verbose=verbose,
        calibration=calibration,
    )
