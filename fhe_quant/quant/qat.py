"""Quantization-aware training whose forward pass *is* the integer program.

A :class:`QATModule` holds float shadow weights and the quantizers of a traced chain of
linear-kind layers (dense, 1-d/2-d convolution with any stride, zero padding, dilation
and groups, average pooling) with reshapes and elementwise operations between them (a
simplified :class:`~fhe_quant.ir.Graph`, cut into segments as PTQ cuts it, see
:func:`split_chain`). Every forward pass, in training and in evaluation:

1. builds the :class:`~fhe_quant.quant.ptq.QuantizedGraph` of the current state (input
   scales, weights folded and quantized per output channel) and lowers it to the
   :class:`~fhe_quant.lower.IntegerProgram` that would be compiled, exactly as
   :func:`fhe_quant.qat.compile_qat_model` will;
2. runs that program in NumPy (``step(value, NUMPY)``) and takes its exact integers (the
   codes entering each layer, the last accumulator) as the forward values;
3. computes the same layers in torch with fake quantization and straight-through
   estimators (STE), only to carry gradients: each torch value is replaced by the exact
   one with ``exact + (t - t.detach())``, whose value is ``exact`` bit for bit and whose
   gradient is ``t``'s. The torch layers are :func:`torch_linear` (the same map as the
   op table's ``linear_apply``, padding and groups included), so the gradients follow
   the real geometry.

The program is cached while the parameters and buffers are unchanged (eval mode); in
training it is rebuilt at every step, which is cheap for the models FHE can run: on the
digits MLP (64-64-64-10) quantizing the weights and lowering take about 2 ms of a ~10 ms
training step (``lower`` alone ~0.5 ms; a float step is ~2 ms).

So the eval-mode output of a :class:`QATModule` equals, bit for bit, the compiled model's
``fhe="disable"`` output (and ``simulate``/``execute``): what the model trains on is what
runs encrypted, including the accumulator bits dropped before each table. Gradients flow
as if there were no rounding (STE) to the float shadow weights (BinaryConnect style) and
to the learned step sizes (LSQ).

Batch norm is folded into the layer before it when the model is prepared, from its
running statistics (``w' = w * gamma / sqrt(var + eps)``, ``b' = (b - mean) * gamma /
sqrt(var + eps) + beta``, :func:`fhe_quant.passes.fold_affine_into_linear`), and the
folded layer trains as one. Keeping batch norm in float during training and folding at
compile time would break the parity above: the integer program only has the folded
weights (and their quantization error depends on the folded values), and batch
statistics differ from the running ones that the compiled model would use. QAT usually
fine-tunes a model trained in float, whose running statistics are already meaningful;
the folded affine map is exactly what the eval-mode float model computes.

Average pooling trains nothing: its weights ``1/k`` quantize exactly to 1 (the step
size ``s_in / k`` goes into the scale), so its accumulator is ``qmax * k`` at most
whatever is learned; the step sizes of its input are learned (LSQ) like any other.

Quantizers:

* Activations (every tensor entering a linear layer, inputs included): unsigned affine,
  one step size per feature, integer zero point fixed at initialisation. The features
  are the axis the layer mixes with its weights, as in PTQ: the last axis for a dense
  layer, the channels (axis 1) for a convolution or a pooling (one step size shared by
  all positions of a channel, so that it folds into the weights).
  ``"lsq"``: the step sizes are parameters learned with LSQ's gradient (the STE through
  ``round`` and ``clamp`` gives it exactly) scaled by ``1 / sqrt(N * Qp)``, initialised
  on the first training batch (or :meth:`QATModule.initialize`) to each feature's
  clipping range of least squared error on the float model's values there (a better
  start than min/max at 2-3 bits, and it sets the zero point too). A feature that is
  exactly 0 there (a constant pixel, a dead unit) gets a tiny step, so that its folded
  weights quantize to 0 and cost nothing in the proven accumulator range.
  ``"ema"``: the step sizes follow a moving average of each feature's min/max seen in
  training (frozen in eval mode).
* Weights: symmetric per output channel, their scale recomputed at every step from the
  folded weights ``w * s_in`` (dynamic: the scale of least squared error by default,
  which at 2 bits keeps far more non-zero weights than ``max |w| / qmax``), or binary
  ``{-1, +1} * alpha_j`` with ``alpha_j = mean |w_j * s_in|`` (deterministic sign, or
  stochastic with a hard sigmoid probability in training). An optional accumulator
  budget (``accumulator_bits``) bounds every proven accumulator, A2Q style (see
  :func:`quantize_weight`): ``qmax_in * sum |codes|`` over an output channel's fan-in
  (``in_features``, or ``in_channels / groups * kernel area`` for a convolution), which
  zero padding can only lower. The weights of a convolution ``(out, in / groups,
  *kernel)`` are quantized as the rows ``(out, -1)``.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fhe_quant.errors import InputError, NotFittedError, ParameterError, UnsupportedOpError
from fhe_quant.ir import ELEMENTWISE, OPS, ConvGeometry, Graph, Node, weight_input_channels
from fhe_quant.lower import (
    MAX_AUTO_TABLE_BITS,
    NUMPY,
    IntegerProgram,
    TableStep,
    auto_table_bits,
    lower,
)
from fhe_quant.quant.calibrate import MSEObserver
from fhe_quant.quant.config import MAX_ROUNDING_BITS, QuantConfig
from fhe_quant.quant.ptq import (
    QuantizedGraph,
    QuantizedLinear,
    Segment,
    check_calibration_data,
)
from fhe_quant.quant.quantizer import UniformQuantizer

__all__ = [
    "ACTIVATION_SCALES",
    "WEIGHT_MODES",
    "WEIGHT_SCALES",
    "DEAD_FEATURE_SCALE",
    "QATConfig",
    "AUTO_BUDGET_MAX_BITS",
    "AUTO_DROPPED_BITS",
    "AUTO_MIN_TABLE_BITS",
    "default_table_bits",
    "default_accumulator_bits",
    "TORCH_ELEMENTWISE",
    "torch_elementwise",
    "round_ste",
    "scale_gradient",
    "fake_codes",
    "quantize_weight",
    "ActivationQuantizer",
    "QAT_LINEAR_OPS",
    "torch_linear",
    "split_chain",
    "QATLinear",
    "QATModule",
]

#: Ways the activation step sizes are set: learned (LSQ) or moving-average min/max.
ACTIVATION_SCALES = ("lsq", "ema")

#: Ways the weights are quantized.
WEIGHT_MODES = ("uniform", "binary", "binary_stochastic")

#: Step size of a feature that is exactly 0 on the initialisation data (a constant input
#: pixel, a dead ReLU): its folded weights become 0, so it costs nothing in the proven
#: accumulator ranges, and any value it takes later saturates harmlessly.
DEAD_FEATURE_SCALE = 1e-6

#: Number of clipping ratios tried by the least-squares weight scale.
_SCALE_GRID = 41

#: Bisection steps of the accumulator-budget scale (relative precision ~1e-9).
_BUDGET_STEPS = 32

#: Elements computed at once by the scale search (bounds its memory).
_SCALE_CHUNK = 1 << 20

#: Ways the uniform weight scales are set from the weights at every step.
WEIGHT_SCALES = ("mse", "max")

#: Smallest learned step size (LSQ may push one towards 0 or below).
_MIN_STEP = 1e-8

_OWNER = "QATConfig"

#: Activations up to this many bits get QAT's default accumulator budget (``"auto"``).
AUTO_BUDGET_MAX_BITS = 4

#: Accumulator bits the ``"auto"`` budget leaves above the table input (one more in the
#: first layer): the low bits dropped exactly before each table, one small bootstrap each.
AUTO_DROPPED_BITS = 2

#: Narrowest table input of QAT's default (``rounding_bits=None``): measured on the
#: digits MLP (docs/DESIGN-NOTES.md §16), a 4-bit lookup costs Concrete about a third of
#: a 5-bit one, and 3-bit tables lost 5-8 points of accuracy at 2-bit activations.
AUTO_MIN_TABLE_BITS = 4


# --------------------------------------------------------------------------- config


def default_table_bits(activation_bits: int) -> int:
    """QAT's table input width when ``rounding_bits`` is not given: one bit more than
    the activations, at least :data:`AUTO_MIN_TABLE_BITS`, at most
    :data:`fhe_quant.lower.MAX_AUTO_TABLE_BITS` (as post-training quantization's).

    Examples:
        >>> [default_table_bits(b) for b in range(1, 9)]
        [4, 4, 4, 5, 6, 7, 7, 7]
    """
    return min(max(AUTO_MIN_TABLE_BITS, activation_bits + 1), MAX_AUTO_TABLE_BITS)


def default_accumulator_bits(activation_bits: int, table_bits: int, first: bool) -> int | None:
    """QAT's accumulator budget of a layer for ``accumulator_bits="auto"``: the table
    width plus 2 (2 low bits dropped exactly before each table), plus 3 for the first
    layer, which reads the client's inputs (the usual practice of a finer first layer:
    on the digits MLP, 2 bits there cost 1-2 points, 3 bits cost ~10% more than 2);
    ``None`` (no budget) for activations of more than :data:`AUTO_BUDGET_MAX_BITS` bits,
    where a fan-in of 64 codes leaves too few weight codes in so narrow an accumulator.

    Examples:
        >>> [default_accumulator_bits(3, 4, first) for first in (True, False)]
        [7, 6]
        >>> default_accumulator_bits(6, 7, first=False) is None
        True
    """
    if activation_bits > AUTO_BUDGET_MAX_BITS:
        return None
    return table_bits + (AUTO_DROPPED_BITS + 1 if first else AUTO_DROPPED_BITS)


def _check_choice(value: Any, name: str, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(
            f"The {name!r} parameter of {_OWNER} must be one of "
            f"{', '.join(repr(c) for c in choices)}. Got {value!r} instead."
        )
    return value


@dataclass(frozen=True)
class QATConfig:
    """How a :class:`QATModule` quantizes.

    Attributes:
        quant: bit widths per role and table width (``rounding_bits``); the
            ``calibration`` field is not used (QAT learns its ranges).
        activation_scale: ``"lsq"`` (learned step sizes) or ``"ema"`` (moving average
            of the min/max seen in training).
        weight_mode: ``"uniform"``, ``"binary"`` or ``"binary_stochastic"``. Binary modes
            apply to every linear layer but the last, whose weights take
            ``quant.n_bits_outputs`` bits (uniform), as is usual for binary networks.
        weight_scale: how uniform weight scales follow the weights at every step:
            ``"mse"`` (least squared error per channel, the default) or ``"max"``.
        accumulator_bits: ``"auto"``: QAT's default budget per layer
            (:func:`default_accumulator_bits`, uniform weights only; average poolings
            keep their fixed accumulator). When set to an int (2 to 16), every layer's
            proven accumulator range fits
            in this many bits (uniform weights only; an average pooling, whose weights are
            fixed, is refused when its ``qmax * k`` does not fit); ``None``: no
            constraint.
        ema_momentum: weight of each new batch in the moving averages (``"ema"``).
        seed: seed of the stochastic binarization (``None``: torch's global generator).

    Examples:
        >>> QATConfig(QuantConfig.from_n_bits(3), weight_mode="binary").weight_mode
        'binary'
        >>> QATConfig(QuantConfig.from_n_bits(3), activation_scale="max")
        Traceback (most recent call last):
        ...
        ValueError: The 'activation_scale' parameter of QATConfig must be one of 'lsq', \
'ema'. Got 'max' instead.
    """

    quant: QuantConfig
    activation_scale: str = "lsq"
    weight_mode: str = "uniform"
    weight_scale: str = "mse"
    accumulator_bits: int | str | None = None
    ema_momentum: float = 0.1
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.quant, QuantConfig):
            raise ValueError(
                f"The 'quant' parameter of {_OWNER} must be a QuantConfig. "
                f"Got {type(self.quant).__name__} instead."
            )
        _check_choice(self.activation_scale, "activation_scale", ACTIVATION_SCALES)
        _check_choice(self.weight_mode, "weight_mode", WEIGHT_MODES)
        _check_choice(self.weight_scale, "weight_scale", WEIGHT_SCALES)
        quant = self.quant
        if self.weight_mode == "uniform" and quant.n_bits_weights < 2:
            raise ValueError(
                f"The weights need at least 2 bits with weight_mode='uniform' (symmetric "
                f"codes {{-1, 0, 1}}). Got n_bits weights={quant.n_bits_weights} instead; "
                "use weight_mode='binary' for 1-bit weights."
            )
        if quant.n_bits_outputs < 2:
            raise ValueError(
                "The last layer's weights ('outputs' in n_bits) need at least 2 bits. "
                f"Got {quant.n_bits_outputs} instead."
            )
        if self.accumulator_bits is not None and self.accumulator_bits != "auto":
            value = self.accumulator_bits
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, numbers.Integral)
                or not 2 <= int(value) <= MAX_ROUNDING_BITS
            ):
                raise ValueError(
                    f"The 'accumulator_bits' parameter of {_OWNER} must be 'auto', None or "
                    f"an int in [2, {MAX_ROUNDING_BITS}]. Got {value!r} instead."
                )
            if self.weight_mode != "uniform":
                raise ValueError(
                    f"The 'accumulator_bits' parameter of {_OWNER} needs "
                    f"weight_mode='uniform' (binary weights cannot be zero, so their "
                    f"accumulator is fixed). Got weight_mode={self.weight_mode!r}."
                )
            object.__setattr__(self, "accumulator_bits", int(value))
        momentum = self.ema_momentum
        if (
            isinstance(momentum, bool)
            or not isinstance(momentum, numbers.Real)
            or not 0 < float(momentum) <= 1
        ):
            raise ValueError(
                f"The 'ema_momentum' parameter of {_OWNER} must be a float in (0, 1]. "
                f"Got {momentum!r} instead."
            )
        object.__setattr__(self, "ema_momentum", float(momentum))
        if self.seed is not None and (
            isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral)
        ):
            raise ValueError(
                f"The 'seed' parameter of {_OWNER} must be None or an int. "
                f"Got {self.seed!r} instead."
            )

    def layer_accumulator_bits(self, index: int, table_bits: int) -> int | None:
        """The accumulator budget of linear layer ``index`` (``None``: no budget), its
        table reading ``table_bits`` bits."""
        if self.accumulator_bits != "auto":
            return self.accumulator_bits  # type: ignore[return-value]
        if self.weight_mode != "uniform":
            return None
        return default_accumulator_bits(self.input_bits(index), table_bits, index == 0)

    def is_binary(self, last: bool) -> bool:
        """Whether a layer's weights are binary (never the last layer's)."""
        return self.weight_mode != "uniform" and not last

    def weight_bits(self, last: bool) -> int:
        """Bits of a layer's uniform weights (the last layer takes the ``outputs`` role)."""
        return self.quant.n_bits_outputs if last else self.quant.n_bits_weights

    def input_bits(self, index: int) -> int:
        """Bits of the codes entering linear layer ``index`` (0: the model inputs)."""
        return self.quant.n_bits_inputs if index == 0 else self.quant.n_bits_activations


# --------------------------------------------------------------------------- torch ops

TorchFn = Callable[[Node, Tensor, Mapping[str, Tensor]], Tensor]


def _tensor(value: np.ndarray, dtype: torch.dtype) -> Tensor:
    # NOTE: a copy: node constants are read-only arrays, which torch refuses to share.
    return torch.tensor(np.array(value), dtype=dtype)


def _torch_rule(op: str) -> TorchFn:
    """QAT's torch version of an elementwise op, from its row of the op table:
    ``f(x, *params, **attrs)`` with the row's torch function (the identity if none)."""
    row = ELEMENTWISE[op]
    if row.torch_function is None:
        return lambda n, x, p: x
    fn = functools.reduce(getattr, row.torch_function.split(".")[1:], torch)

    def apply(node: Node, x: Tensor, params: Mapping[str, Tensor]) -> Tensor:
        attrs = {name: node.attrs.get(name, default) for name, default in row.attrs}
        return fn(x, *(params[name] for name in row.params), **attrs)

    return apply


#: Torch version of every elementwise operation of :data:`fhe_quant.ir.OPS`, for the
#: gradients of the QAT forward (its values are replaced by the integer program's),
#: derived from :data:`fhe_quant.ir.ELEMENTWISE`. ``params`` holds the node's constant
#: or trainable tensors (a PReLU's slopes).
TORCH_ELEMENTWISE: Mapping[str, TorchFn] = {op: _torch_rule(op) for op in ELEMENTWISE}


def torch_elementwise(node: Node, x: Tensor, params: Mapping[str, Tensor] | None = None) -> Tensor:
    """Apply an elementwise or reshape ``node`` to a torch batch ``x``.

    Args:
        node: an ``"elementwise"`` or ``"reshape"`` node of a graph.
        x: the batch (leading batch dimension).
        params: trainable tensors of the node (``{"weight": slopes}`` for PReLU); the
            node's own constants otherwise.

    Raises:
        UnsupportedOpError: the operation has no torch version here.

    Examples:
        >>> node = Node("r", "leaky_relu", ("x",), {"negative_slope": 0.5})
        >>> torch_elementwise(node, torch.tensor([[-2.0, 3.0]])).tolist()
        [[-1.0, 3.0]]
    """
    if node.op == "reshape":
        return x.reshape((x.shape[0],) + tuple(node.attrs["shape"]))
    fn = TORCH_ELEMENTWISE.get(node.op)
    if fn is None:
        raise UnsupportedOpError(
            node.op,
            node.source or node.name,
            "Quantization-aware training has no torch version of it.",
        )
    if params is None:
        params = {k: _tensor(v, x.dtype) for k, v in node.params.items()}
    return fn(node, x, params)


# --------------------------------------------------------------------------- STE pieces


def round_ste(x: Tensor) -> Tensor:
    """Round to nearest (ties to even) forward, identity backward.

    Examples:
        >>> x = torch.tensor([0.4, 1.6], requires_grad=True)
        >>> y = round_ste(x)
        >>> y.sum().backward()
        >>> y.tolist(), x.grad.tolist()
        ([0.0, 2.0], [1.0, 1.0])
    """
    return x + (torch.round(x) - x).detach()


def scale_gradient(x: Tensor, factor: float) -> Tensor:
    """``x`` forward (up to rounding), gradient multiplied by ``factor`` backward.

    Examples:
        >>> s = torch.tensor(2.0, requires_grad=True)
        >>> scale_gradient(s, 0.25).backward()
        >>> s.grad.item()
        0.25
    """
    return (x - x * factor).detach() + x * factor


def fake_codes(x: Tensor, step: Tensor, zero_point: Tensor, qmax: int) -> Tensor:
    """STE codes ``clamp(round(x / step) + z, 0, qmax)`` as floats.

    Forward: the codes of :meth:`UniformQuantizer.quantize` (up to float rounding).
    Backward: ``1 / step`` inside the range, 0 where clamped; towards ``step`` the LSQ
    gradient ``-x / step**2`` inside the range (multiplied by the step itself in the
    dequantized value ``step * (codes - z)``, it gives LSQ's ``round(x/s) - x/s``).

    Examples:
        >>> fake_codes(torch.tensor([[-1.0, 0.26, 9.0]]), torch.tensor(0.5), torch.tensor(1),
        ...            3).tolist()
        [[0.0, 2.0, 3.0]]
    """
    codes = torch.clamp(x / step + zero_point, 0.0, float(qmax))
    return round_ste(codes)


# --------------------------------------------------------------------------- weights


def _budget_fixup(codes: np.ndarray, ratio: np.ndarray, budget: int) -> np.ndarray:
    """Round towards zero the fewest codes that rounding pushed away from zero, per row,
    until ``sum |codes| <= budget``; ``sum |ratio| <= budget`` guarantees it is possible
    (each such code was rounded up by at most 1/2, so at least twice the excess of them
    exist)."""
    excess = np.abs(codes).sum(axis=1) - budget
    if not np.any(excess > 0):
        return codes
    rounded_up = np.abs(codes) - np.abs(ratio)
    order = np.argsort(-rounded_up, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(codes.shape[1])[None, :], axis=1)
    lower = rank < np.maximum(excess, 0)[:, None]
    return codes - np.sign(codes) * lower


def _budget_scale(magnitude: np.ndarray, top: np.ndarray, qmax: int, budget: int) -> np.ndarray:
    """Per row, (nearly) the smallest scale whose codes ``clip(rint(|w| / s), 0, qmax)``
    sum to at most ``budget``: the budget goes to the largest weights. The old bound
    ``sum |w| / budget`` rounds every weight of a wide row to 0 when the budget is smaller
    than the fan-in (64 inputs, budget 9: all codes 0, a dead layer)."""
    # NOTE: the code sum only falls as the scale grows: bisect (in log scale) between
    # max|w| / qmax (no clipping) and 2 max|w| (all codes 0, always within budget).
    safe = np.where(top > 0, top, 1.0)
    low, high = np.log(safe / qmax), np.log(2.0 * safe)
    for _ in range(_BUDGET_STEPS):
        middle = (low + high) / 2
        codes = np.minimum(np.rint(magnitude / np.exp(middle)[:, None]), qmax)
        fits = codes.sum(axis=1) <= budget
        high = np.where(fits, middle, high)
        low = np.where(fits, low, middle)
    within = np.minimum(np.rint(magnitude / (safe / qmax)[:, None]), qmax).sum(axis=1) <= budget
    return np.where(within, safe / qmax, np.exp(high))


def _least_squares_scale(folded: np.ndarray, top: np.ndarray, qmax: int) -> np.ndarray:
    """Per row, the scale ``r * max|w| / qmax`` (``r`` on a grid in ``[0.2, 1]``) whose
    quantized weights are closest to ``w`` in squared error (ties: the larger ``r``)."""
    top = np.where(top > 0, top, 1.0)
    ratios = np.linspace(1.0, 0.2, _SCALE_GRID)
    errors = np.empty((len(ratios), len(top)))
    chunk = max(1, _SCALE_CHUNK // max(1, folded.size))
    for begin in range(0, len(ratios), chunk):
        scales = top[None, :, None] * (ratios[begin : begin + chunk, None, None] / qmax)
        codes = np.rint(folded[None] / scales)
        np.minimum(codes, qmax, out=codes)
        np.maximum(codes, -qmax, out=codes)
        codes *= scales
        codes -= folded[None]
        errors[begin : begin + chunk] = np.einsum("gij,gij->gi", codes, codes)
    # NOTE: argmin keeps the first minimum: the widest range among equal errors.
    return top * (ratios[np.argmin(errors, axis=0)] / qmax)


def quantize_weight(
    folded: np.ndarray,
    *,
    bits: int,
    binary: bool,
    method: str = "mse",
    stochastic: bool = False,
    l1_budget: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[np.ndarray, UniformQuantizer]:
    """Quantize folded weights ``(out, in)`` per output channel.

    * Uniform: symmetric narrow-range codes ``round(w / scale)``, with ``scale_j`` the
      per-channel scale of least squared error among ``r * max_i |w_ji| / qmax`` for
      ``r`` on a grid in ``[0.2, 1]`` (``method="mse"``; weights beyond the range clip)
      or ``max_i |w_ji| / qmax`` (``method="max"``). With ``l1_budget``, the scale is at
      least ``sum_i |w_ji| / l1_budget`` and the fewest codes rounded away from zero are
      rounded towards it instead, so that ``sum_i |code_ji| <= l1_budget``: multiplied by
      the input codes' width, that bounds the layer's proven accumulator (A2Q's idea,
      with the scale set from the weights at every step instead of learned).
    * Binary: codes ``sign(w)`` (``+1`` for 0) or, with ``stochastic``, ``+1`` with
      probability ``hard_sigmoid(w_ji / max_i |w_ji|)`` drawn from ``generator``;
      ``scale_j = mean_i |w_ji|``. The quantizer is 2-bit signed narrow range (codes
      ``{-1, 0, 1}``, of which only ±1 are used).

    A channel whose weights are all 0 gets the scale 1.

    Args:
        folded: float64 weights with the input step sizes folded in.
        bits: code width of uniform weights (2 to 8).
        binary: binary weights.
        method: scale of uniform weights: ``"mse"`` or ``"max"``.
        stochastic: sample binary codes (training only).
        l1_budget: cap on ``sum |codes|`` per output channel (uniform only).
        generator: torch generator of the stochastic sampling (``None``: torch's global).

    Returns:
        ``(codes, quantizer)``: the int64 codes and the :class:`UniformQuantizer` (scale
        per output channel, axis 0) that the lowering reads.

    Examples:
        >>> w = np.array([[0.3, -0.6, 0.05], [0.0, 0.0, 0.0]])
        >>> codes, q = quantize_weight(w, bits=3, binary=False, method="max")
        >>> codes.tolist(), q.scale
        ([[2, -3, 0], [0, 0, 0]], (0.19999999999999998, 1.0))
        >>> codes, q = quantize_weight(w, bits=3, binary=True)
        >>> codes.tolist(), q.scale[0]
        ([[1, -1, 1], [1, 1, 1]], 0.31666666666666665)
    """
    folded = np.asarray(folded, dtype=np.float64)
    magnitude = np.abs(folded)
    top = magnitude.max(axis=1)
    if binary:
        if stochastic:
            safe = np.where(top > 0, top, 1.0)[:, None]
            probability = np.clip((folded / safe + 1.0) / 2.0, 0.0, 1.0)
            draw = torch.rand(folded.shape, generator=generator, dtype=torch.float64).numpy()
            codes = np.where(draw < probability, 1, -1)
        else:
            codes = np.where(folded >= 0, 1, -1)
        scale = magnitude.mean(axis=1)
        bits = 2
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = _least_squares_scale(folded, top, qmax) if method == "mse" else top / qmax
        if l1_budget is not None:
            scale = np.maximum(scale, _budget_scale(magnitude, top, qmax, l1_budget))
    scale = np.where(scale > 0, scale, 1.0)
    if not binary:
        ratio = folded / scale[:, None]
        codes = np.clip(np.rint(ratio), -qmax, qmax)
        if l1_budget is not None:
            codes = _budget_fixup(codes, ratio, l1_budget)
    quantizer = UniformQuantizer(
        bits=bits,
        scale=tuple(scale.tolist()),
        zero_point=(0,) * len(scale),
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return codes.astype(np.int64), quantizer


# --------------------------------------------------------------------------- activations


def _zero_points(low: np.ndarray, high: np.ndarray, qmax: int) -> np.ndarray:
    """Affine zero points of the ranges ``[low, high]`` (which contain 0)."""
    width = high - low
    safe = np.where(width > 0, width, 1.0)
    return np.where(width > 0, np.clip(np.rint(-low * qmax / safe), 0, qmax), 0).astype(np.int64)


def _steps_for_range(low: Any, high: Any, zero_point: Any, qmax: int) -> Any:
    """Smallest step sizes whose codes ``0..qmax`` around the fixed zero points cover
    ``[low, high]`` (NumPy or torch); :data:`DEAD_FEATURE_SCALE` for a ``[0, 0]`` range."""
    lib: Any = torch if isinstance(low, Tensor) else np
    z = zero_point.to(low.dtype) if isinstance(low, Tensor) else zero_point.astype(np.float64)
    up = lib.where(z < qmax, high / lib.clip(qmax - z, 1, None), 0.0 * high)
    down = lib.where(z > 0, -low / lib.clip(z, 1, None), 0.0 * low)
    step = lib.maximum(up, down)
    return lib.where(step > 0, step, DEAD_FEATURE_SCALE + 0.0 * step)


class ActivationQuantizer(nn.Module):
    """Unsigned affine quantizer with one step size per feature (on ``axis``).

    The features are the axis that the consuming layer mixes with its weights, as in
    post-training quantization (:mod:`fhe_quant.quant.ptq`): the last axis for a dense
    layer, the channel axis (1) for a convolution or an average pooling, whose step size
    is then shared by every spatial position of a channel (so that it folds into the
    weights).

    The integer zero points are fixed by :meth:`initialize`. With ``method="lsq"`` the
    step sizes are the parameter ``scale``, initialised per feature to the clipping range
    of least squared error on the first data (:class:`~fhe_quant.quant.calibrate.
    MSEObserver`) and then learned. With ``method="ema"`` they are derived from the
    buffers ``running_min``/``running_max`` (updated by :meth:`observe` in training):
    the smallest step whose codes cover the range around the fixed zero point.

    Args:
        n_features: number of features (size of the last axis).
        bits: code width, 1 to 8.
        method: ``"lsq"`` or ``"ema"``.
        momentum: weight of a new batch in the moving averages (``"ema"``).
        axis: the feature axis of the values (``-1``: last; ``1``: channels of
            ``(N, C, ...)`` tensors).

    Examples:
        >>> q = ActivationQuantizer(2, bits=2, method="lsq")
        >>> q.initialize(np.array([[0.0, -1.0], [3.0, 2.0]]))
        >>> q.quantizer().zero_point
        (0, 1)
        >>> q = ActivationQuantizer(2, bits=2, method="ema", axis=1)
        >>> q.initialize(np.stack([np.full((3, 3), 2.0), np.full((3, 3), -1.0)])[None])
        >>> q.quantizer().zero_point, q.quantizer().axis
        ((0, 3), 1)
    """

    def __init__(
        self, n_features: int, bits: int, method: str, momentum: float = 0.1, axis: int = -1
    ) -> None:
        super().__init__()
        self.axis = int(axis)
        self.n_features = int(n_features)
        self.bits = int(bits)
        self.qmax = 2**self.bits - 1
        self.method = _check_choice(method, "activation_scale", ACTIVATION_SCALES)
        self.momentum = float(momentum)
        ones = torch.ones(self.n_features, dtype=torch.float64)
        if self.method == "lsq":
            self.scale = nn.Parameter(ones.clone())
        else:
            self.register_buffer("running_min", torch.zeros_like(ones))
            self.register_buffer("running_max", ones.clone())
        self.register_buffer("zero_point", torch.zeros(self.n_features, dtype=torch.int64))
        self.register_buffer("initialized", torch.tensor(False))

    def extra_repr(self) -> str:
        return (
            f"n_features={self.n_features}, bits={self.bits}, method={self.method!r}, "
            f"axis={self.axis}"
        )

    @property
    def is_initialized(self) -> bool:
        return bool(self.initialized)

    def _features(self, values: np.ndarray) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        if not -values.ndim <= self.axis < values.ndim or (
            values.shape[self.axis] != self.n_features
        ):
            raise InputError(
                f"An ActivationQuantizer of {self.n_features} features got values of shape "
                f"{values.shape}; axis {self.axis} must hold the features."
            )
        return np.moveaxis(values, self.axis, -1).reshape(-1, self.n_features)

    @torch.no_grad()
    def initialize(self, values: np.ndarray) -> None:
        """Set the zero points and step sizes from float values ``(..., n_features)``."""
        flat = self._features(values)
        low = np.minimum(flat.min(axis=0), 0.0)
        high = np.maximum(flat.max(axis=0), 0.0)
        dead = (low == 0) & (high == 0)
        if self.method == "lsq":
            observer = MSEObserver(axis=1, grid=50)
            observer.observe(flat)
            mse = observer.quantizer(self.bits, signed=False, symmetric=False)
            zero_point = np.asarray(mse.zero_point, dtype=np.int64)
            step = np.where(dead, DEAD_FEATURE_SCALE, np.asarray(mse.scale))
            self.scale.copy_(torch.from_numpy(step))
        else:
            zero_point = _zero_points(low, high, self.qmax)
            self.running_min.copy_(torch.from_numpy(low))
            self.running_max.copy_(torch.from_numpy(high))
        self.zero_point.copy_(torch.from_numpy(zero_point))
        self.initialized.fill_(True)

    @torch.no_grad()
    def observe(self, values: Tensor) -> None:
        """Move the ``"ema"`` ranges towards a training batch's per-feature min/max."""
        if self.method != "ema":
            return
        flat = values.detach().movedim(self.axis, -1).reshape(-1, self.n_features)
        flat = flat.to(torch.float64)
        low = torch.clamp(flat.amin(dim=0), max=0.0)
        high = torch.clamp(flat.amax(dim=0), min=0.0)
        self.running_min.lerp_(low, self.momentum)
        self.running_max.lerp_(high, self.momentum)

    def step_size(self) -> Tensor:
        """The current positive step sizes ``(n_features,)`` (with gradient for LSQ)."""
        if self.method == "lsq":
            return torch.clamp(self.scale, min=_MIN_STEP)
        return _steps_for_range(
            self.running_min, self.running_max, self.zero_point, self.qmax
        ).clamp_min(_MIN_STEP)

    def gradient_scaled_step(self, values: Tensor) -> Tensor:
        """:meth:`step_size` with LSQ's gradient scale ``1 / sqrt(N * Qp)``, ``N`` the
        values one step size quantizes per sample."""
        step = self.step_size()
        if self.method != "lsq":
            return step
        per_sample = max(1, values[0].numel() // self.n_features) if len(values) else 1
        return scale_gradient(step, 1.0 / math.sqrt(per_sample * self.qmax))

    def quantizer(self) -> UniformQuantizer:
        """The current quantizer (what the integer program uses)."""
        return UniformQuantizer(
            bits=self.bits,
            scale=tuple(self.step_size().detach().tolist()),
            zero_point=tuple(int(z) for z in self.zero_point.tolist()),
            signed=False,
            axis=self.axis,
        )

    def along(self, vector: Tensor, ndim: int) -> Tensor:
        """A per-feature ``vector`` shaped to broadcast against ``ndim``-axis values."""
        return _along(vector, self.axis, ndim)


# --------------------------------------------------------------------------- the module


#: The linear-kind operations QAT trains: dense layers and convolutions (trainable
#: weights), and average pooling (fixed weights ``1/k``).
QAT_LINEAR_OPS = ("linear", "conv", "avg_pool")

_SUPPORTED = (
    "Quantization-aware training supports chains of Linear, Conv1d/Conv2d, "
    "AvgPool/AdaptiveAvgPool, Flatten and elementwise layers (batch norm folds into the "
    "layer before it); quantize other models after training with compile_torch_model."
)


def _check_supported(node: Node) -> None:
    where = node.source or node.name
    kind = node.kind
    if kind == "linear" and node.op not in QAT_LINEAR_OPS:
        raise UnsupportedOpError(node.op, where, _SUPPORTED)
    if kind == "elementwise" and node.op not in TORCH_ELEMENTWISE:
        raise UnsupportedOpError(
            node.op, where, "Quantization-aware training has no torch version of it."
        )
    if kind not in ("linear", "elementwise", "reshape"):
        raise UnsupportedOpError(node.op, where, _SUPPORTED)


def split_chain(graph: Graph) -> tuple[tuple[Node, ...], list[tuple[Node, tuple[Node, ...]]]]:
    """Check that QAT can train ``graph`` and cut it as post-training quantization does.

    The graph must be a chain (every node reads the one before it) of supported
    operations (:data:`QAT_LINEAR_OPS`, elementwise operations with a torch version,
    reshapes); it is cut into the client-side operations before the first linear layer
    and one ``(linear node, chain after it)`` pair per linear layer, up to the output.

    Raises:
        UnsupportedOpError: an operation QAT does not train, or a branch (residual
            connection, concatenation), naming the layer.

    Examples:
        >>> nodes = (Node("x", "input"), Node("fc", "linear", ("x",), {},
        ...          {"weight": np.ones((2, 3))}), Node("r", "relu", ("fc",)))
        >>> pre, parts = split_chain(Graph(nodes, "x", "r", (3,)))
        >>> pre, [(node.name, [n.name for n in chain]) for node, chain in parts]
        ((), [('fc', ['r'])])
    """
    pre: list[Node] = []
    parts: list[tuple[Node, list[Node]]] = []
    previous = graph.input_name
    for node in graph.nodes:
        if node.op == "input":
            continue
        if node.inputs != (previous,):
            raise UnsupportedOpError(
                f"{node.op} reading {', '.join(node.inputs) or 'nothing'}",
                node.source or node.name,
                "Quantization-aware training needs a chain of layers, each reading the "
                "one before it: no residual connection, concatenation or branch; quantize "
                "such models after training with compile_torch_model.",
            )
        _check_supported(node)
        previous = node.name
        if node.kind == "linear":
            parts.append((node, []))
        elif parts:
            parts[-1][1].append(node)
        else:
            pre.append(node)
        if node.name == graph.output_name:
            break
    if not parts:
        raise UnsupportedOpError(
            "a model without a linear layer",
            "model",
            "fhe_quant compiles models with at least one Linear layer.",
        )
    return tuple(pre), [(node, tuple(chain)) for node, chain in parts]


def torch_linear(node: Node, x: Tensor, weight: Tensor) -> Tensor:
    """A linear-kind ``node``'s operation (without bias) on a torch batch, with the
    given weights: ``x @ weight.T`` or the zero-padded convolution of its geometry.

    Examples:
        >>> from fhe_quant.ir import ConvGeometry
        >>> attrs = ConvGeometry((1,), ((1, 0),), (1,)).to_attrs()
        >>> node = Node("c", "conv", ("x",), attrs, {"weight": np.ones((1, 1, 2))})
        >>> torch_linear(node, torch.tensor([[[1.0, 2.0, 3.0]]]), torch.ones(1, 1, 2)).tolist()
        [[[1.0, 3.0, 5.0]]]
    """
    if node.op == "linear":
        return x @ weight.T
    geometry = ConvGeometry.from_attrs(node.attrs)
    # NOTE: F.pad takes (begin, end) pairs from the last axis backwards; padding apart,
    # torch's convolution is the same cross-correlation as fhe_quant.ir.conv_numpy.
    pad = [p for pair in reversed(geometry.padding) for p in pair]
    if any(pad):
        x = F.pad(x, pad)
    conv = F.conv1d if geometry.ndim == 1 else F.conv2d
    return conv(x, weight, None, geometry.stride, 0, geometry.dilation, geometry.groups)


def _along(vector: Tensor, axis: int, ndim: int) -> Tensor:
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return vector.reshape(shape)


def _unit_weights(folded: np.ndarray) -> tuple[np.ndarray, UniformQuantizer]:
    """Average pooling's folded weights (one positive constant per output channel):
    codes all 1, the constant as the scale (exact, as post-training quantization)."""
    scale = folded.reshape(len(folded), -1)[:, 0]
    quantizer = UniformQuantizer(
        bits=2,
        scale=tuple(scale.tolist()),
        zero_point=(0,) * len(scale),
        signed=True,
        narrow_range=True,
        axis=0,
    )
    return np.ones(folded.shape, dtype=np.int64), quantizer


class QATLinear(nn.Module):
    """A linear-kind layer: its float shadow weights and the quantizer of its input.

    Dense layers and convolutions hold their weights ``(out, in / groups, *kernel)`` and
    bias as parameters. Average pooling has none (``weight`` and ``bias`` are ``None``):
    its weights ``1/k`` quantize exactly to 1, the step size ``s_in / k`` going into the
    scale, as in post-training quantization.
    """

    def __init__(self, node: Node, input_quantizer: ActivationQuantizer) -> None:
        super().__init__()
        self.op = node.op
        self.weight: nn.Parameter | None
        self.bias: nn.Parameter | None
        if OPS[node.op].unit_weights:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        else:
            self.weight = nn.Parameter(torch.tensor(np.array(node.params["weight"])))
            bias = node.params.get("bias")
            self.bias = None if bias is None else nn.Parameter(torch.tensor(np.array(bias)))
        self.input_quantizer = input_quantizer
        # NOTE: the input channel each weight column reads (groups), to fold step sizes;
        # a plain tensor (not a buffer): it is derived from the graph, never trained.
        self.channels = torch.from_numpy(weight_input_channels(node).astype(np.int64))

    @property
    def trainable(self) -> bool:
        """Whether the layer has weights to train (not an average pooling)."""
        return self.weight is not None

    def extra_repr(self) -> str:
        shape = tuple(self.weight.shape) if self.weight is not None else "unit"
        return f"op={self.op!r}, weight={shape}"


@dataclass(frozen=True, eq=False)
class _Snapshot:
    """The integer program of one state, and the pieces the torch forward needs."""

    quantized: QuantizedGraph
    program: IntegerProgram
    codes: tuple[Tensor, ...]  # integer weights per layer (float64, no gradient)
    scales: tuple[Tensor, ...]  # weight scales per layer (1-D, no gradient)


def _np(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float64)


class QATModule(nn.Module):
    """A quantization-aware ``torch.nn.Module`` whose forward is its integer program.

    Build it with :func:`fhe_quant.qat.prepare_qat`; train it like any module (it
    computes in float64 and returns float64 outputs); compile it with
    :func:`fhe_quant.qat.compile_qat_model`. Its quantizers are initialised on the first
    training batch (or by :meth:`initialize`); using it in eval mode before that raises
    :class:`~fhe_quant.errors.NotFittedError`.

    Args:
        graph: a simplified chain graph (see :func:`split_chain`): dense layers,
            convolutions, average poolings, reshapes and elementwise operations.
        config: the quantization settings.

    Raises:
        UnsupportedOpError: an operation QAT does not train (max pooling, ...) or a
            branch, naming the layer.
        ParameterError: ``accumulator_bits`` below an average pooling's fixed
            accumulator (``qmax * k``).

    Examples:
        >>> from fhe_quant.qat import prepare_qat
        >>> qat = prepare_qat(torch.nn.Linear(3, 2), n_bits=4)
        >>> qat.initialize(np.random.default_rng(0).normal(size=(50, 3)))
        >>> out = qat.eval()(np.ones((1, 3)))
        >>> out.dtype, bool((qat.forward_integers(np.ones((1, 3))) >= 0).all())
        (torch.float64, True)
    """

    def __init__(self, graph: Graph, config: QATConfig) -> None:
        super().__init__()
        if not isinstance(config, QATConfig):
            raise TypeError(f"Expected a QATConfig, got {type(config).__name__}.")
        _, parts = split_chain(graph)
        self.graph = graph
        self.config = config
        values = graph.run(np.zeros((1,) + graph.input_shape))
        layers = []
        for index, (node, _) in enumerate(parts):
            # NOTE: the step sizes live on the axis the layer mixes with its weights (the
            # last for a dense layer, the channels for a convolution), as in PTQ.
            axis = OPS[node.op].channel_axis
            n_features = values[node.inputs[0]].shape[axis]
            quantizer = ActivationQuantizer(
                n_features,
                config.input_bits(index),
                config.activation_scale,
                config.ema_momentum,
                axis=axis,
            )
            layer = QATLinear(node, quantizer)
            self._check_pooling_budget(node, layer)
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.slopes = nn.ParameterDict(
            {
                self._slope_key(node): nn.Parameter(torch.tensor(np.array(node.params["weight"])))
                for node in graph.nodes
                if node.op == "prelu"
            }
        )
        self._generator: torch.Generator | None = None
        if config.seed is not None:
            self._generator = torch.Generator().manual_seed(int(config.seed))
        self._cache: tuple[Any, _Snapshot] | None = None

    # ------------------------------------------------------------------ structure
    def _check_pooling_budget(self, node: Node, layer: QATLinear) -> None:
        bits = self.config.accumulator_bits
        if bits is None or bits == "auto" or layer.trainable:
            return
        # NOTE: a pooling's weights are fixed (all 1 once quantized): its accumulator
        # reaches qmax * k, whatever is trained.
        window = int(np.prod(node.params["weight"].shape[1:]))
        widest = layer.input_quantizer.qmax * window
        if widest > 2**bits - 1:
            raise ParameterError(
                f"The average pooling {node.source or node.name!r} sums {window} codes of "
                f"{layer.input_quantizer.bits} bits: its accumulator reaches {widest}, more "
                f"than accumulator_bits={bits} allows ({2**bits - 1}). Raise "
                "accumulator_bits, lower the activation bits or use a smaller window."
            )

    def _slope_key(self, node: Node) -> str:
        return f"slope{[n.name for n in self.graph.nodes].index(node.name)}"

    def extra_repr(self) -> str:
        q = self.config.quant
        return (
            f"bits(inputs={q.n_bits_inputs}, weights={q.n_bits_weights}, "
            f"activations={q.n_bits_activations}, outputs={q.n_bits_outputs}), "
            f"activation_scale={self.config.activation_scale!r}, "
            f"weight_mode={self.config.weight_mode!r}, weight_scale={self.config.weight_scale!r}, "
            f"accumulator_bits={self.config.accumulator_bits}"
        )

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input sample."""
        return self.graph.input_shape

    @property
    def is_initialized(self) -> bool:
        """Whether every quantizer has been initialised from data."""
        return all(layer.input_quantizer.is_initialized for layer in self.layers)

    def require_initialized(self) -> None:
        """Raise :class:`NotFittedError` unless the quantizers are initialised."""
        if not self.is_initialized:
            raise NotFittedError(
                "The QAT module's quantizers are not initialised yet: train it (the first "
                "training batch initialises them) or call initialize(X) with "
                "representative inputs."
            )

    def float_graph(self) -> Graph:
        """The float graph with the current shadow weights, biases and slopes."""
        current: dict[str, Node] = {}
        _, parts = split_chain(self.graph)
        for (node, _), layer in zip(parts, self.layers, strict=True):
            if layer.weight is None:
                continue
            params = {"weight": _np(layer.weight)}
            if layer.bias is not None:
                params["bias"] = _np(layer.bias)
            current[node.name] = Node(
                node.name, node.op, node.inputs, node.attrs, params, node.source
            )
        for node in self.graph.nodes:
            if node.op == "prelu":
                params = {"weight": _np(self.slopes[self._slope_key(node)])}
                current[node.name] = Node(
                    node.name, node.op, node.inputs, node.attrs, params, node.source
                )
        return self.graph.replace([current.get(node.name, node) for node in self.graph.nodes])

    # ------------------------------------------------------------------ quantizers
    @torch.no_grad()
    def initialize(self, x: Any) -> None:
        """Initialise every activation quantizer from the float model's values on ``x``.

        Args:
            x: representative inputs ``(N, *input_shape)``.
        """
        x = self._check_input(x)
        values = self.float_graph().run(x)
        _, parts = split_chain(self.graph)
        for (node, _), layer in zip(parts, self.layers, strict=True):
            layer.input_quantizer.initialize(values[node.inputs[0]])
        self._cache = None

    def _budget(self, index: int) -> int | None:
        if not self.layers[index].trainable:
            return None
        bits = self.config.layer_accumulator_bits(index, self._table_bits(index))
        if bits is None:
            return None
        # NOTE: every input code lies in [0, qmax], so the proven accumulator range is at
        # most qmax * sum |W_j| (lower.py proves a tighter one). It must also leave room
        # for the half added before the table drops its low bits, or the rounding carries
        # into a new bit and one more bit is dropped (lower._table).
        dropped = bits - self._table_bits(index)
        half = 2 ** (dropped - 1) if dropped > 0 else 0
        return max(1, (2**bits - 1 - half) // self.layers[index].input_quantizer.qmax)

    def _table_bits(self, index: int) -> int:
        """Input width of the table after linear layer ``index`` (as ``lower`` picks it)."""
        configured = self.config.quant.rounding_bits
        if configured is not None or index + 1 == len(self.layers):
            return configured or MAX_ROUNDING_BITS
        return auto_table_bits(self.layers[index + 1].input_quantizer.bits)

    def _cache_key(self) -> tuple[Any, ...]:
        # NOTE: torch bumps a tensor's _version on every in-place change (optimizer steps,
        # load_state_dict, EMA updates), so equal keys mean an unchanged state.
        tensors = list(self.parameters()) + list(self.buffers())
        return (self.training, tuple((id(t), t._version) for t in tensors))

    @torch.no_grad()
    def _snapshot(self, stochastic: bool) -> _Snapshot:
        key = None if stochastic else self._cache_key()
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        graph = self.float_graph()
        pre, parts = split_chain(graph)
        input_quantizers = [layer.input_quantizer.quantizer() for layer in self.layers]
        segments, codes, scales = [], [], []
        for index, ((node, chain), layer) in enumerate(zip(parts, self.layers, strict=True)):
            last = index == len(parts) - 1
            # NOTE: weight column (j, i, ...) reads input channel channels[j, i]: fold its
            # step size in (groups make it differ from i).
            steps = layer.input_quantizer.step_size()[layer.channels]
            weight = (
                layer.weight
                if layer.weight is not None
                else torch.from_numpy(np.array(node.params["weight"]))
            )
            folded = _np(weight * steps.reshape(steps.shape + (1,) * (weight.ndim - 2)))
            if layer.weight is None:
                w_codes, w_quantizer = _unit_weights(folded)
            else:
                flat_codes, w_quantizer = quantize_weight(
                    folded.reshape(len(folded), -1),
                    bits=self.config.weight_bits(last),
                    binary=self.config.is_binary(last),
                    method=self.config.weight_scale,
                    stochastic=stochastic,
                    l1_budget=self._budget(index),
                    generator=self._generator,
                )
                w_codes = flat_codes.reshape(folded.shape)
            linear = QuantizedLinear(node, w_codes, w_quantizer, input_quantizers[index])
            output_quantizer = None if last else input_quantizers[index + 1]
            segments.append(Segment(linear, chain, output_quantizer))
            codes.append(torch.from_numpy(w_codes.astype(np.float64)))
            scales.append(torch.tensor(w_quantizer.scale, dtype=torch.float64))
        quantized = QuantizedGraph(graph, pre, tuple(segments), self.config.quant)
        snapshot = _Snapshot(quantized, lower(quantized), tuple(codes), tuple(scales))
        if key is not None:
            self._cache = (key, snapshot)
        return snapshot

    def to_quantized_graph(self) -> QuantizedGraph:
        """The quantized graph of the current state (deterministic weights, as in eval
        mode): what :func:`fhe_quant.qat.compile_qat_model` lowers and compiles."""
        self.require_initialized()
        return self._snapshot(stochastic=False).quantized

    def integer_program(self) -> IntegerProgram:
        """The integer program of the current state (deterministic weights)."""
        self.require_initialized()
        return self._snapshot(stochastic=False).program

    # ------------------------------------------------------------------ forward
    def _check_input(self, x: Any) -> np.ndarray:
        if isinstance(x, Tensor):
            x = x.detach().cpu().numpy()
        return check_calibration_data(np.asarray(x), self.input_shape, "input")

    @staticmethod
    def _run_exact(
        snapshot: _Snapshot, x: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
        """The integer program on ``x``: the codes entering each layer, the dequantized
        last accumulator, and the final output after the client's post-processing."""
        program, quantized = snapshot.program, snapshot.quantized
        value = x
        for node in quantized.pre:
            value = node.evaluate(value)
        value = program.input_quantizer.quantize(value)
        codes = [value]
        for step in program.steps:
            value = step(value, NUMPY)
            if isinstance(step, TableStep):
                codes.append(value)
        real = program.output_step.dequantize(value)
        final = real
        for node in quantized.post:
            final = node.evaluate(final)
        return codes, real, final

    def forward_integers(self, x: Any) -> np.ndarray:
        """The integer program's last accumulator on ``x`` (no gradient), for the
        current state with deterministic weights: what the compiled model's
        ``forward_integers`` returns.

        Args:
            x: a batch ``(N, *input_shape)``, NumPy or torch.

        Returns:
            The int64 accumulators of the last layer.
        """
        x_np = self._check_input(x)
        self.require_initialized()
        snapshot = self._snapshot(stochastic=False)
        value = x_np
        for node in snapshot.quantized.pre:
            value = node.evaluate(value)
        q = snapshot.program.input_quantizer.quantize(value)
        return np.asarray(snapshot.program(q), dtype=np.int64)

    def _chain(self, nodes: tuple[Node, ...], x: Tensor) -> Tensor:
        for node in nodes:
            params = {"weight": self.slopes[self._slope_key(node)]} if node.op == "prelu" else None
            x = torch_elementwise(node, x, params)
        return x

    def forward(self, x: Any) -> Tensor:
        """The integer program's output on ``x`` (float64), with STE gradients.

        Args:
            x: a batch ``(N, *input_shape)``, NumPy or torch.

        Returns:
            The dequantized output, bit for bit what the compiled model's
            ``fhe="disable"`` returns for the same state in eval mode. Gradients flow to
            the parameters (weights, biases, LSQ step sizes, PReLU slopes), not to ``x``.
        """
        x_np = self._check_input(x)
        if self.training and not self.is_initialized:
            self.initialize(x_np)
        self.require_initialized()
        stochastic = self.training and self.config.weight_mode == "binary_stochastic"
        snapshot = self._snapshot(stochastic)
        codes_exact, real_exact, final_exact = self._run_exact(snapshot, x_np)
        observing = self.training and self.config.activation_scale == "ema"
        if not torch.is_grad_enabled() and not observing:
            return torch.from_numpy(np.ascontiguousarray(final_exact))

        def exact(t: Tensor, value: np.ndarray) -> Tensor:
            # NOTE: value of `value` bit for bit (t - t.detach() is exactly 0), gradient of t.
            return torch.from_numpy(np.asarray(value, dtype=np.float64)) + (t - t.detach())

        _, parts = split_chain(snapshot.quantized.graph)
        v = self._chain(snapshot.quantized.pre, torch.tensor(x_np))
        seen: list[Tensor] = []
        for index, ((node, chain), layer) in enumerate(zip(parts, self.layers, strict=True)):
            quantizer = layer.input_quantizer
            step = quantizer.gradient_scaled_step(v)
            zero = quantizer.zero_point.to(torch.float64)
            seen.append(v)
            fake = fake_codes(
                v, quantizer.along(step, v.ndim), quantizer.along(zero, v.ndim), quantizer.qmax
            )
            codes = exact(fake, codes_exact[index])
            steps = step[layer.channels]  # the step size of every weight column
            if layer.weight is None:
                # Pooling: codes all 1, scale s_in / k (its gradient reaches the step size).
                w_codes = snapshot.codes[index]
                unit = torch.from_numpy(node.params["weight"].reshape(len(steps), -1)[:, 0].copy())
                scale = unit * steps[:, 0]
            else:
                # STE through the weights' rounding: the codes' value, the gradient of
                # (w * s_in) / s_w towards the shadow weights and the step sizes.
                folded = layer.weight * steps.reshape(steps.shape + (1,) * (layer.weight.ndim - 2))
                scale = snapshot.scales[index]
                ratio = folded / scale.reshape((-1,) + (1,) * (folded.ndim - 1))
                w_codes = snapshot.codes[index] + (ratio - ratio.detach())
            axis = OPS[node.op].channel_axis
            y = torch_linear(node, codes - quantizer.along(zero, v.ndim), w_codes)
            y = y * _along(scale, axis, y.ndim)
            if layer.bias is not None:
                y = y + _along(layer.bias, axis, y.ndim)
            if index == len(parts) - 1:
                y = exact(y, real_exact)
                out = exact(self._chain(snapshot.quantized.post, y), final_exact)
            else:
                v = self._chain(chain, y)
        if observing:
            for value, layer in zip(seen, self.layers, strict=True):
                layer.input_quantizer.observe(value)
        return out
