"""The compiled model every frontend returns: client pre/post-processing around an
integer program and its Concrete circuit.

The pipeline, top to bottom (:func:`build_quantized_module`)::

    Graph --simplify--> Graph --quantize_graph--> QuantizedGraph --lower--> IntegerProgram
          --compile_program--> FHECircuit
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fhe_quant.errors import CompilationError, InputError, NotCompiledError, ParameterError
from fhe_quant.fhe import FHECircuit, check_fhe_mode, compile_program
from fhe_quant.ir import Graph, Node
from fhe_quant.lower import IntegerProgram, TableStep, lower
from fhe_quant.passes import simplify
from fhe_quant.quant.config import QuantConfig
from fhe_quant.quant.ptq import QuantizedGraph, check_calibration_data, quantize_graph
from fhe_quant.quant.widths import MIN_WIDENED_ACCUMULATOR_BITS, bits_for, kept_table_bits

__all__ = [
    "QuantizedModule",
    "build_quantized_module",
    "make_config",
    "post_training_module",
    "rounding_exact",
    "run_chain",
    "MAX_INPUTSET",
]

#: Calibration samples handed to Concrete for tracing (bit widths come from proofs).
MAX_INPUTSET = 32


def make_config(n_bits: Any, **kwargs: Any) -> QuantConfig:
    """A :class:`QuantConfig` from user arguments; errors become :class:`ParameterError`."""
    try:
        return QuantConfig.from_n_bits(n_bits, **kwargs)
    except ValueError as exc:
        raise ParameterError(str(exc)) from None


def post_training_module(
    to_graph: Any,
    X_calib: Any,
    n_bits: Any,
    *,
    rounding_bits: int | None,
    rounding: str,
    per_channel: bool,
    calibration: str,
    accumulator_bits: int | None,
    p_error: float | None,
    global_p_error: float | None,
    compile: bool,
    verbose: bool,
) -> QuantizedModule:
    """The post-training path of every graph frontend (torch, ONNX): the options are
    checked first, then ``to_graph(x)`` reads the model on the checked calibration data,
    then :func:`build_quantized_module`."""
    config = make_config(
        n_bits,
        rounding_bits=rounding_bits,
        rounding_exact=rounding_exact(rounding),
        per_channel=per_channel,
        calibration=calibration,
        accumulator_bits=accumulator_bits,
    )
    x = check_calibration_data(np.asarray(X_calib), None)
    return build_quantized_module(
        to_graph(x),
        x,
        config,
        compile=compile,
        p_error=p_error,
        global_p_error=global_p_error,
        verbose=verbose,
    )


def rounding_exact(rounding: Any) -> bool:
    """Whether a ``rounding=`` argument asks for exact rounding (``"exact"``) or not.

    Examples:
        >>> rounding_exact("approximate")
        False
    """
    if rounding not in ("exact", "approximate"):
        raise ParameterError(
            f"The 'rounding' parameter must be 'exact' or 'approximate'. Got {rounding!r}."
        )
    return rounding == "exact"


def run_chain(nodes: tuple[Node, ...], value: np.ndarray) -> np.ndarray:
    """Evaluate elementwise/reshape nodes in order, in float (client-side processing)."""
    for node in nodes:
        value = node.evaluate(value)
    return value


class QuantizedModule:
    """A quantized, compiled model.

    ``forward(x, fhe=...)`` takes float inputs and returns float outputs; in between,
    the client quantizes (clipping to the calibrated range), the integer program runs
    in clear, in Concrete's simulator, or encrypted, and the client dequantizes the last
    layer's accumulator and applies any elementwise operations after it.

    A module is plain data (graph, quantized graph, program and an
    :class:`~fhe_quant.fhe.FHECircuit` that holds the compile settings): it pickles and
    deep-copies as it stands, and a copy of a compiled module compiles its Concrete circuit
    again on first use (with no keys: ``execute`` generates them).
    """

    def __init__(
        self,
        graph: Graph,
        quantized: QuantizedGraph,
        program: IntegerProgram,
        circuit: FHECircuit | None = None,
    ) -> None:
        self.graph = graph
        self.quantized = quantized
        self.program = program
        self._circuit = circuit

    # ------------------------------------------------------------------ properties
    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one float input sample."""
        return self.graph.input_shape

    @property
    def fhe_circuit(self) -> FHECircuit:
        if self._circuit is None:
            raise NotCompiledError(
                "This model has no FHE circuit yet: call compile() before using "
                "fhe='simulate' or fhe='execute' (fhe='disable' works without it)."
            )
        return self._circuit

    @property
    def circuit(self) -> Any:
        """The ``concrete.fhe.Circuit``."""
        return self.fhe_circuit.circuit

    @property
    def statistics(self) -> dict[str, Any]:
        """PBS count, max bit width, and per-layer accumulator and table widths: the
        program's own figures (its ``statistics()``: the rows of its steps,
        :func:`~fhe_quant.lower.statistics_rows`), then Concrete's."""
        stats: dict[str, Any] = dict(self.program.statistics())
        stats.update(self._circuit_statistics())
        return stats

    def _circuit_statistics(self) -> dict[str, Any]:
        """Concrete's figures for the compiled circuit (empty before compiling)."""
        if self._circuit is None:
            return {}
        s = self._circuit.statistics
        return {
            "pbs_count": s.pbs_count,
            "max_bit_width": s.max_bit_width,
            "pbs_per_precision": dict(s.pbs_per_precision),
            "compile_seconds": s.compile_seconds,
            "keygen_seconds": s.keygen_seconds,
            "complexity": s.complexity,
        }

    # ------------------------------------------------------------------ client side
    def check_input(self, x: Any, what: str = "input") -> np.ndarray:
        """Validate a float batch ``(N, *input_shape)``; returns it as float64."""
        if hasattr(x, "detach") and hasattr(x, "numpy"):  # a torch tensor
            x = x.detach().cpu().numpy()
        array = np.asarray(x)
        if array.dtype.kind not in "biuf":
            raise InputError(f"The {what} must hold numbers; got dtype {array.dtype} instead.")
        return check_calibration_data(array, self.input_shape, what)

    def quantize_input(self, x: Any) -> np.ndarray:
        """Client side: float batch -> unsigned integers in ``[0, qmax]`` (clipped)."""
        x = self.check_input(x)
        values = run_chain(self.quantized.pre, x)
        return self.program.input_quantizer.quantize(values).astype(np.int64)

    def dequantize_output(self, acc: np.ndarray) -> np.ndarray:
        """Client side: last accumulator -> float output (with the post-processing)."""
        real = self.program.output_step.dequantize(acc)
        return run_chain(self.quantized.post, real)

    # ------------------------------------------------------------------ inference
    def forward(self, x: Any, fhe: str = "disable", verbose: bool = False) -> np.ndarray:
        """Float in, float out, through the integer program in the given ``fhe`` mode."""
        check_fhe_mode(fhe)
        q = self.quantize_input(x)
        if fhe == "disable":
            acc = np.asarray(self.program(q), dtype=np.int64)
        else:
            acc = self.fhe_circuit.run(q, fhe, verbose=verbose)
        return self.dequantize_output(acc)

    __call__ = forward

    def forward_integers(self, x: Any, fhe: str = "disable", verbose: bool = False) -> np.ndarray:
        """The raw integer output (last accumulator) of the program for float inputs."""
        check_fhe_mode(fhe)
        q = self.quantize_input(x)
        if fhe == "disable":
            return np.asarray(self.program(q), dtype=np.int64)
        return self.fhe_circuit.run(q, fhe, verbose=verbose)

    def float_forward(self, x: Any) -> np.ndarray:
        """The float model (as traced) on ``x``."""
        return self.graph(self.check_input(x))

    # ------------------------------------------------------------------ compilation
    def compile(
        self,
        x_calib: Any,
        *,
        p_error: float | None = None,
        global_p_error: float | None = None,
        verbose: bool = False,
    ) -> FHECircuit:
        """Compile the integer program with Concrete (replaces any previous circuit)."""
        q = self.quantize_input(x_calib)[:MAX_INPUTSET]
        self._circuit = compile_program(
            self.program, q, p_error=p_error, global_p_error=global_p_error, verbose=verbose
        )
        return self._circuit

    def keygen(self, verbose: bool = False) -> float:
        """Generate keys now (else the first ``fhe="execute"`` does); returns seconds."""
        with tqdm(total=1, desc="Key generation", disable=not verbose, leave=False) as bar:
            seconds = self.fhe_circuit.keygen()
            bar.update(1)
        return seconds

    def report(
        self, x: Any = None, y: Any = None, *, fhe: str = "simulate", metric: str | None = None
    ) -> Any:
        """A :class:`~fhe_quant.report.Report`: accuracy (when given data), bits, PBS."""
        from fhe_quant.report import build_report

        return build_report(self, x, y, fhe=fhe, metric=metric)


#: Calibration samples run through the integer program to measure its accumulators.
MAX_SIGNAL_SAMPLES = 256


def signal_table_bits(program: IntegerProgram, x: np.ndarray) -> dict[str, int]:
    """The tables to widen so that each keeps the observed signal: per table source (the
    layer or add whose accumulator it reads), the width :func:`kept_table_bits` gives
    (as many bits kept as the table outputs, for a table keeping fewer than
    ``MIN_KEPT_BITS``) from the median over elements of the accumulator's spread on
    ``x`` (float inputs of the program, at most :data:`MAX_SIGNAL_SAMPLES`), where it
    is wider than the table's, for accumulators of ``MIN_WIDENED_ACCUMULATOR_BITS`` or
    more. The accumulators and their proofs do not change; a program with no such
    table is not run."""
    wide = [
        index
        for index, step in enumerate(program.steps)
        if isinstance(step, TableStep)
        and step.lsbs
        and step.round_bits >= MIN_WIDENED_ACCUMULATOR_BITS
        and (not step.inputs or step.inputs[0])
    ]
    if not wide:
        return {}
    q = program.input_quantizer.quantize(x[:MAX_SIGNAL_SAMPLES]).astype(np.int64)
    values = program.values(q)
    widths: dict[str, int] = {}
    for index in wide:
        step = program.steps[index]
        operand = np.asarray(step.operands(values[: index + 1]))
        acc = operand.reshape(len(operand), -1)
        observed = bits_for(int(np.median(acc.max(axis=0) - acc.min(axis=0))))
        width = step.round_bits - step.lsbs
        wanted = kept_table_bits(width, step.lsbs, observed, step.out_bits)
        source = program.steps[step.inputs[0] - 1].name if step.inputs else step.name
        if wanted > width:
            widths[source] = max(wanted, widths.get(source, 0))
    return widths


def build_quantized_module(
    graph: Graph,
    x_calib: np.ndarray,
    config: QuantConfig,
    *,
    compile: bool = True,
    p_error: float | None = None,
    global_p_error: float | None = None,
    verbose: bool = False,
) -> QuantizedModule:
    """Run the whole pipeline on a float graph (see the module docstring)."""
    stages = ["simplify", "quantize", "lower"] + (["compile"] if compile else [])
    with tqdm(total=len(stages), desc="fhe_quant", disable=not verbose, leave=False) as bar:
        bar.set_postfix_str("simplify")
        graph = simplify(graph)
        bar.update(1)
        bar.set_postfix_str("quantize")
        quantized = quantize_graph(graph, x_calib, config)
        bar.update(1)
        bar.set_postfix_str("lower")
        program = lower(quantized)
        if config.rounding_bits is None:  # automatic widths keep the observed signal
            widths = signal_table_bits(program, run_chain(quantized.pre, x_calib))
            program = lower(quantized, widths) if widths else program
        bar.update(1)
        module = QuantizedModule(graph, quantized, program)
        if compile:
            bar.set_postfix_str("compile")
            try:
                module.compile(
                    x_calib, p_error=p_error, global_p_error=global_p_error, verbose=False
                )
            except CompilationError as exc:
                exc.quantized_module = module  # still runs in clear; can be recompiled
                raise
            bar.update(1)
    return module
