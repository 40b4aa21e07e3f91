"""Quantization-aware training whose forward pass *is* the integer program.

This module sits above :mod:`fhe_quant.lower` (it runs the lowered program); the
quantizers it trains live in :mod:`fhe_quant.quant.qat`.

A :class:`QATModule` holds float shadow weights and the quantizers of a traced chain of
linear-kind layers (dense, 1-d/2-d convolution with any stride, zero padding, dilation
and groups, average pooling) with reshapes and elementwise operations between them (a
simplified :class:`~fhe_quant.ir.Graph`, cut into segments as PTQ cuts it, see
:func:`split_chain`). Every forward pass, in training and in evaluation:

1. builds the :class:`~fhe_quant.quant.ptq.QuantizedGraph` of the current state (input
   scales, weights folded and quantized per output channel) and lowers it to the
   :class:`~fhe_quant.lower.IntegerProgram` that would be compiled, exactly as
   :func:`fhe_quant.torch.compile_qat_model` will;
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
  by :meth:`QATModule.initialize` (an explicit step, never a side effect of a training
  batch) to each feature's clipping range of least squared error on the float model's
  values there (a better
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

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from fhe_quant.errors import NotFittedError, ParameterError
from fhe_quant.ir import OPS, Graph, Node, weight_input_channels
from fhe_quant.lower import NUMPY, IntegerProgram, TableStep, auto_table_bits, lower
from fhe_quant.quant.config import MAX_ROUNDING_BITS
from fhe_quant.quant.ptq import (
    QuantizedGraph,
    QuantizedLinear,
    Segment,
    check_calibration_data,
)
from fhe_quant.quant.qat import (
    ActivationQuantizer,
    QATConfig,
    along,
    fake_codes,
    quantize_weight,
    split_chain,
    torch_elementwise,
    torch_linear,
    unit_weights,
)

__all__ = ["INIT_SAMPLES", "QATLinear", "QATModule"]

#: Rows of the data the quantizers are initialised on at most (one training batch, as
#: LSQ does; see :meth:`QATModule.initialize`).
INIT_SAMPLES = 64


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

    Build it with :func:`fhe_quant.torch.prepare_qat`; train it like any module (it
    computes in float64 and returns float64 outputs); compile it with
    :func:`fhe_quant.torch.compile_qat_model`. Its quantizers are initialised by an
    explicit step, :meth:`initialize` (``prepare_qat`` calls it on ``X_sample``,
    :func:`fhe_quant.training.fit` on its training data when nobody did); running it
    before that raises :class:`~fhe_quant.errors.NotFittedError`.

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
        >>> from fhe_quant.torch import prepare_qat
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
                "The QAT module's quantizers are not initialised yet: call initialize(X) "
                "with representative inputs (prepare_qat does it with X_sample, and "
                "fhe_quant.training.fit with its training data) before running it."
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
    def initialize(self, x: Any, max_samples: int | None = INIT_SAMPLES, seed: int = 0) -> None:
        """Initialise every activation quantizer from the float model's values on ``x``.

        LSQ initialises its step sizes on one training batch; so does this, on a seeded
        random subset of at most ``max_samples`` rows of ``x`` (:data:`INIT_SAMPLES`).
        Measured with the plain-loop recipe on the digits MLP (``benchmarks/qat.py``,
        3 bits): 96.0% simulated from 64 rows, 88.9% from the whole 1347-row training
        set, whose rare outliers widen the least-squares ranges of the sparse pixels.

        Args:
            x: representative inputs ``(N, *input_shape)``.
            max_samples: rows used at most (``None``: all of them).
            seed: seed of the subset.
        """
        x = self._check_input(x)
        if max_samples is not None and len(x) > max_samples:
            rows = np.random.default_rng(seed).choice(len(x), int(max_samples), replace=False)
            x = x[np.sort(rows)]
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
                w_codes, w_quantizer = unit_weights(folded)
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
        mode): what :func:`fhe_quant.torch.compile_qat_model` lowers and compiles."""
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

        Raises:
            NotFittedError: the quantizers were never initialised (:meth:`initialize`).
        """
        x_np = self._check_input(x)
        self.require_initialized()
        stochastic = self.training and self.config.weight_mode == "binary_stochastic"
        snapshot = self._snapshot(stochastic)
        codes_exact, real_exact, final_exact = self._run_exact(snapshot, x_np)
        observing = self.training and self.config.activation_scale == "ema"
        if not torch.is_grad_enabled() and not observing:
            return torch.from_numpy(np.ascontiguousarray(final_exact))
        _, parts = split_chain(snapshot.quantized.graph)
        v = self._chain(snapshot.quantized.pre, torch.tensor(x_np))
        seen: list[Tensor] = []
        for index, (node, chain) in enumerate(parts):
            seen.append(v)
            y = self._layer(snapshot, index, node, v, codes_exact[index])
            if index < len(parts) - 1:
                v = self._chain(chain, y)
        if observing:
            for value, layer in zip(seen, self.layers, strict=True):
                layer.input_quantizer.observe(value)
        y = _exact(y, real_exact)
        return _exact(self._chain(snapshot.quantized.post, y), final_exact)

    def _layer(
        self, snapshot: _Snapshot, index: int, node: Node, v: Tensor, codes_exact: np.ndarray
    ) -> Tensor:
        """Linear layer ``index`` in torch on its float input ``v``: the exact codes and
        integer weights as values, the fake-quantized ones' gradients (STE)."""
        layer = self.layers[index]
        quantizer = layer.input_quantizer
        step = quantizer.gradient_scaled_step(v)
        zero = quantizer.zero_point.to(torch.float64)
        fake = fake_codes(
            v, quantizer.along(step, v.ndim), quantizer.along(zero, v.ndim), quantizer.qmax
        )
        codes = _exact(fake, codes_exact)
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
        y = y * along(scale, axis, y.ndim)
        if layer.bias is not None:
            y = y + along(layer.bias, axis, y.ndim)
        return y


def _exact(t: Tensor, value: np.ndarray) -> Tensor:
    """``value`` bit for bit (``t - t.detach()`` is exactly 0), with ``t``'s gradient."""
    return torch.from_numpy(np.asarray(value, dtype=np.float64)) + (t - t.detach())
