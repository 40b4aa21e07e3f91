"""Quantization-aware training of a torch module: prepare it, train it, compile it.

:func:`prepare_qat` turns a float ``torch.nn.Module`` (a chain of ``Linear``,
``Conv1d``/``Conv2d``, ``BatchNorm`` (folded), ``AvgPool``/``AdaptiveAvgPool``,
``Flatten`` and elementwise layers) into a :class:`~fhe_quant.qat_module.QATModule`, a
plain ``torch.nn.Module`` whose forward pass runs the very integer program that will be
compiled (see :mod:`fhe_quant.qat_module`); train it with any loop (or
:func:`fhe_quant.training.fit`); :func:`compile_qat_model` then compiles what it learned,
with no calibration: its outputs equal the trained module's eval-mode outputs bit for bit.
Import both from :mod:`fhe_quant.torch`.

The recipe the defaults are made for (``benchmarks/qat.py``, plain-loop rows): train in
float, ``prepare_qat(net, n_bits=3, X_sample=X_train)``, then the loop users write
(Adam ``lr=1e-3``, batch 64, ~30 epochs, no schedule) and :func:`compile_qat_model`.

Examples:
    >>> import numpy as np, torch
    >>> from fhe_quant.training import fit
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = np.random.default_rng(0).normal(size=(128, 4))
    >>> y = (x[:, 0] > 0).astype(int)
    >>> qat = prepare_qat(net, n_bits=3, X_sample=x)
    >>> history = fit(qat, x, y, epochs=2, verbose=False)
    >>> qm = compile_qat_model(qat, x, compile=False)
    >>> bool((qm.forward(x) == qat.eval()(x).detach().numpy()).all())
    True
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fhe_quant.errors import ParameterError, TraceError
from fhe_quant.frontends.torch import trace_module
from fhe_quant.lower import lower
from fhe_quant.model import QuantizedModule, make_config
from fhe_quant.passes import simplify
from fhe_quant.qat_module import QATModule
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.ptq import check_calibration_data
from fhe_quant.quant.qat import QATConfig, default_input_bits, default_table_bits

__all__ = ["prepare_qat", "compile_qat_model", "quantized_module", "NotAQATModuleError"]


class NotAQATModuleError(ParameterError, TypeError):
    """:func:`compile_qat_model` was given something else than a prepared QAT module."""


def _sample(module: nn.Module, X_sample: Any) -> np.ndarray:
    if X_sample is not None:
        if isinstance(X_sample, torch.Tensor):
            X_sample = X_sample.detach().cpu().numpy()
        # NOTE: a copy: tracing hands the sample to torch, which warns on read-only arrays.
        sample = np.array(check_calibration_data(np.asarray(X_sample), None, "X_sample"))
        sample.setflags(write=True)
        return sample
    first = next(
        (m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)), None
    )
    if isinstance(first, nn.Conv1d | nn.Conv2d):
        raise ParameterError(
            f"prepare_qat needs X_sample to know the input shape of {type(module).__name__}: "
            f"its first layer is a {type(first).__name__}, whose input size is not fixed. "
            "Pass X_sample=<a batch of inputs>."
        )
    if first is None:
        raise ParameterError(
            f"prepare_qat needs X_sample to know the input shape: {type(module).__name__} "
            "has no torch.nn.Linear layer to read it from. Pass X_sample=<a batch of inputs>."
        )
    return np.zeros((2, first.in_features))


def _quant_config(n_bits: Any, rounding_bits: Any, narrow_inputs: bool) -> QuantConfig:
    """The bit widths, with QAT's default table width when ``rounding_bits`` is None and,
    with ``narrow_inputs``, an int ``n_bits``'s default input bits
    (:func:`~fhe_quant.quant.qat.default_input_bits`)."""
    quant = make_config(n_bits, rounding_bits=rounding_bits)
    if narrow_inputs and isinstance(n_bits, int) and not isinstance(n_bits, bool):
        roles = ("weights", "activations", "outputs")
        n_bits = {"inputs": default_input_bits(n_bits), **dict.fromkeys(roles, n_bits)}
        quant = make_config(n_bits, rounding_bits=rounding_bits)
    if rounding_bits is not None:
        return quant
    return make_config(n_bits, rounding_bits=default_table_bits(quant.n_bits_activations))


def prepare_qat(
    module: Any,
    n_bits: int | dict[str, int] = 3,
    *,
    X_sample: Any = None,
    activation_scale: str = "lsq",
    weight_mode: str = "uniform",
    rounding_bits: int | None = None,
    accumulator_bits: int | str | None = "auto",
    weight_scale: str = "mse",
    seed: int | None = None,
) -> QATModule:
    """A quantization-aware copy of ``module`` to train, then compile.

    The module is traced (as :func:`fhe_quant.torch.compile_torch_model` traces it: batch
    norm folds, with its running statistics, into the layer before it, which then trains
    as one layer; dropout is removed) into a chain of dense layers, convolutions, average
    poolings, reshapes and elementwise operations (max pooling, residual connections and
    concatenations are refused: quantize such models with ``compile_torch_model``). The
    returned module keeps float shadow weights, learns (or tracks) one activation step
    size per feature, or per channel before a convolution or pooling (initialised on
    ``X_sample``, see :class:`~fhe_quant.quant.qat.activations.ActivationQuantizer`),
    quantizes its weights per output channel at every step, and computes its forward
    pass with the integer program that :func:`compile_qat_model` will compile, so
    training sees exactly what runs encrypted.

    Args:
        module: a ``torch.nn.Module`` taking one tensor (usually trained in float first,
            or freshly initialised); not modified.
        n_bits: bits for every role, or a dict with keys ``inputs``, ``weights``,
            ``activations``, ``outputs`` (the last layer's weights). With the default
            budget (``accumulator_bits="auto"``, uniform weights), an int ``n_bits`` of
            3 gives the inputs of a first ``Linear`` layer (one step per feature) 2
            bits and its accumulator one bit less
            (:func:`~fhe_quant.quant.qat.default_input_bits`: 9% less complexity on
            the digits MLP at the same accuracy); a first convolution or pooling (one
            step per channel) keeps ``n_bits``; a dict sets the inputs as given.
        X_sample: representative inputs (the training set, say): they give the input
            shape and initialise the quantizers (:meth:`QATModule.initialize
            <fhe_quant.qat_module.QATModule.initialize>`, the explicit step that sets
            the step sizes and zero points). Without it, the shape is read from the
            first ``Linear`` layer (convolutional models need it) and the module must be
            initialised before it runs (``qat.initialize(X)``;
            :func:`fhe_quant.training.fit` does it on its training data).
        activation_scale: ``"lsq"`` (learned step sizes, the default) or ``"ema"``
            (moving average of the min/max seen in training, frozen in eval mode).
        weight_mode: ``"uniform"``, ``"binary"`` or ``"binary_stochastic"`` (BinaryConnect;
            binary modes keep the last layer at ``outputs`` bits).
        rounding_bits: width of every table's input (``None``: QAT's default; with the
            default budget one bit more than the activations and at least 4, see
            :func:`~fhe_quant.quant.qat.default_table_bits`).
        accumulator_bits: bound every proven accumulator to this many bits (uniform
            weights only); ``"auto"`` (the default): for activations of 3 or 4 bits,
            the table width plus 3 in every layer, one less per input bit below the
            activations in the first (at 3 bits: 6 bits on the 2-bit inputs, then 7,
            with 4-bit tables; the fast path of ``benchmarks/qat.py``), no
            bound at 2 bits (it cost 3 points there), above 4 bits, nor for binary
            weights
            (:func:`~fhe_quant.quant.qat.default_accumulator_bits`); ``None``: no
            bound.
        weight_scale: uniform weight scales per channel, recomputed at every step:
            ``"mse"`` (least squared error) or ``"max"`` (``max |w| / qmax``).
        seed: seed of the stochastic binarization.

    Returns:
        The :class:`~fhe_quant.qat_module.QATModule`, in training mode, its quantizers
        initialised on ``X_sample`` when given.

    Raises:
        ParameterError: a parameter out of range (bits, modes, no input shape, an
            ``accumulator_bits`` below an average pooling's fixed accumulator).
        UnsupportedOpError: a layer QAT cannot train (named, with its place).
        TraceError: the module cannot be traced (or ``X_sample`` is needed).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> qat = prepare_qat(net, n_bits={"weights": 2, "activations": 3})
        >>> [layer.input_quantizer.bits for layer in qat.layers]
        [3, 3]
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
        ...                           torch.nn.AvgPool2d(2), torch.nn.Flatten(),
        ...                           torch.nn.Linear(2, 2))
        >>> qat = prepare_qat(cnn, n_bits=3, X_sample=np.zeros((1, 1, 4, 4)))
        >>> [(layer.op, layer.input_quantizer.axis) for layer in qat.layers]
        [('conv', 1), ('avg_pool', 1), ('linear', -1)]
        >>> prepare_qat(net, n_bits=9)
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: The 'n_bits' parameter must be an int in [1, 8] \
or a dict with keys {'inputs', 'weights', 'activations', 'outputs'}. Got 9 instead.
    """
    narrow = accumulator_bits == "auto" and weight_mode == "uniform"
    quant = _quant_config(n_bits, rounding_bits, narrow)
    try:
        config = QATConfig(
            quant,
            activation_scale=activation_scale,
            weight_mode=weight_mode,
            accumulator_bits=accumulator_bits,
            weight_scale=weight_scale,
            seed=seed,
        )
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    if not isinstance(module, nn.Module):
        raise ParameterError(
            f"prepare_qat needs a torch.nn.Module. Got {type(module).__name__} instead."
        )
    sample = _sample(module, X_sample)
    try:
        graph = trace_module(module, sample)
    except TraceError as exc:
        if X_sample is not None:
            raise
        raise TraceError(
            f"{exc} The input shape was guessed from the first Linear layer "
            f"({sample.shape[1:]}); pass X_sample=<a batch of inputs>."
        ) from exc
    graph = simplify(graph)
    qat = QATModule(graph, config)
    if narrow and qat.layers and qat.layers[0].op != "linear":
        # NOTE: a convolution or pooling quantizes its input with one step per channel:
        # 2 bits cannot tell standardized pixels apart (benchmarks/qat.py, cnn-qat-2bit).
        qat = QATModule(graph, replace(config, quant=_quant_config(n_bits, rounding_bits, False)))
    if X_sample is not None:
        qat.initialize(sample)
    return qat.train()


def quantized_module(qat_module: QATModule) -> QuantizedModule:
    """The uncompiled :class:`~fhe_quant.model.QuantizedModule` of a QAT module's state."""
    quantized = qat_module.to_quantized_graph()
    return QuantizedModule(quantized.graph, quantized, lower(quantized))


def compile_qat_model(
    qat_module: Any,
    X_calib: Any,
    *,
    p_error: float | None = None,
    global_p_error: float | None = None,
    compile: bool = True,
    verbose: bool = False,
) -> QuantizedModule:
    """Compile a trained QAT module for encrypted inference.

    Nothing is calibrated: the quantizers are the ones the module learned, and the
    integer program is built exactly as the module's forward pass builds it, so the
    compiled model's outputs equal ``qat_module.eval()(x)`` bit for bit.

    Args:
        qat_module: the :class:`~fhe_quant.qat_module.QATModule` from :func:`prepare_qat`,
            trained (or at least initialised).
        X_calib: a few representative inputs, for Concrete to trace the program (bit
            widths are proven, not taken from them).
        p_error: error probability of each table lookup (``None``: Concrete's default).
        global_p_error: error probability of the whole circuit.
        compile: compile with Concrete now (else only ``fhe="disable"`` works until
            ``.compile(X)``).
        verbose: show Concrete's progress.

    Returns:
        A :class:`~fhe_quant.model.QuantizedModule`.

    Raises:
        NotAQATModuleError: ``qat_module`` is not a prepared QAT module.
        NotFittedError: its quantizers were never initialised.
        InputError: ``X_calib`` with NaN/inf or of the wrong shape.

    Examples:
        >>> compile_qat_model(torch.nn.Linear(2, 2), np.zeros((1, 2)))
        Traceback (most recent call last):
        ...
        fhe_quant.qat_prepare.NotAQATModuleError: compile_qat_model needs the QATModule that \
prepare_qat returns (trained). Got Linear instead; for a float module use \
fhe_quant.torch.compile_torch_model (post-training quantization).
    """
    if not isinstance(qat_module, QATModule):
        raise NotAQATModuleError(
            "compile_qat_model needs the QATModule that prepare_qat returns (trained). "
            f"Got {type(qat_module).__name__} instead; for a float module use "
            "fhe_quant.torch.compile_torch_model (post-training quantization)."
        )
    module = quantized_module(qat_module)
    x = module.check_input(X_calib, "calibration data")
    if compile:
        module.compile(x, p_error=p_error, global_p_error=global_p_error, verbose=verbose)
    return module
