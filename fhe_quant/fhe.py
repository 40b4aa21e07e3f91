"""Concrete compilation and the three execution modes of an :class:`IntegerProgram`.

* ``"disable"``: the integer program in NumPy, on the whole batch at once;
* ``"simulate"``: Concrete's simulator, sample by sample (models bootstrapping errors);
* ``"execute"``: real encryption: encrypt, run, decrypt, sample by sample.

Only this module and :mod:`fhe_quant.deploy` use ``concrete``, imported through
:func:`fhe_quant.process.import_concrete`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fhe_quant.errors import CompilationError, ParameterError
from fhe_quant.ir import ConvGeometry
from fhe_quant.lower import NUMPY, IntegerProgram
from fhe_quant.process import import_concrete

fhe = import_concrete()

__all__ = ["FHE_MODES", "check_fhe_mode", "CircuitStatistics", "FHECircuit", "compile_program"]

FHE_MODES = ("disable", "simulate", "execute")


def check_fhe_mode(mode: Any) -> str:
    """Validate an ``fhe=`` argument.

    Examples:
        >>> check_fhe_mode("simulate")
        'simulate'
    """
    if not isinstance(mode, str) or mode not in FHE_MODES:
        raise ParameterError(
            f"The 'fhe' parameter must be one of {FHE_MODES}. Got {mode!r} instead."
        )
    return mode


@dataclass
class CircuitStatistics:
    """What a compiled circuit costs.

    Attributes:
        pbs_count: programmable bootstraps (table lookups, including the ones Concrete
            uses to drop low bits exactly) per sample.
        max_bit_width: the widest encrypted integer in the circuit.
        pbs_per_precision: bootstraps by the input width of the lookup they serve, as the
            program plans them (width 1: the exact dropping of accumulator bits).
        compile_seconds: time Concrete took to compile.
        keygen_seconds: time key generation took (``None`` until keys exist).
        complexity: Concrete's cost estimate for one run.
    """

    pbs_count: int
    max_bit_width: int
    pbs_per_precision: dict[int, int]
    compile_seconds: float
    complexity: float
    keygen_seconds: float | None = None
    key_bytes: dict[str, int] = field(default_factory=dict)


def _pad(x: Any, pads: tuple[tuple[int, int], ...]) -> Any:
    shape = tuple(n + begin + end for n, (begin, end) in zip(x.shape, pads, strict=True))
    interior = tuple(slice(begin, begin + n) for n, (begin, _) in zip(x.shape, pads, strict=True))
    padded = fhe.zeros(shape)
    padded[interior] = x
    return padded


class _ConcreteBackend:
    """The integer program's special operations, traced by Concrete."""

    def hint(self, x: Any, bit_width: int) -> Any:
        return fhe.hint(x, bit_width=bit_width)

    def conv(self, x: Any, weight: np.ndarray, geometry: ConvGeometry) -> Any:
        # NOTE: Concrete 2.11 compiles only 2-d convolutions without padding
        # (FHELinalg.conv2d refuses non-zero pads and conv1d): pad with encrypted zeros
        # by slice assignment (no bootstrap), and run a 1-d convolution as a 2-d one of
        # height 1. The zeros are the same zeros NumPy pads with (see lower.py).
        weight = np.asarray(weight, dtype=np.int64)
        if any(begin or end for begin, end in geometry.padding):
            x = _pad(x, ((0, 0), (0, 0)) + geometry.padding)
        if geometry.ndim == 1:
            n, c, length = x.shape
            out = fhe.conv(
                x.reshape((n, c, 1, length)),
                weight[:, :, None, :],
                strides=(1, geometry.stride[0]),
                dilations=(1, geometry.dilation[0]),
                group=geometry.groups,
            )
            return out.reshape((out.shape[0], out.shape[1], out.shape[3]))
        return fhe.conv(
            x,
            weight,
            strides=geometry.stride,
            dilations=geometry.dilation,
            group=geometry.groups,
        )

    def round(self, x: Any, lsbs: int, exact: bool) -> Any:
        exactness = fhe.Exactness.EXACT if exact else fhe.Exactness.APPROXIMATE
        return fhe.round_bit_pattern(x, lsbs_to_remove=lsbs, exactness=exactness)

    def lookup(self, fn: Any, x: Any) -> Any:
        return fhe.univariate(fn)(x)

    def pad(self, x: Any, pads: tuple[tuple[int, int], ...]) -> Any:
        # NOTE: encrypted zeros, by slice assignment (no bootstrap), as for convolutions.
        return _pad(x, pads)


CONCRETE = _ConcreteBackend()


class FHECircuit:
    """A compiled Concrete circuit for an :class:`IntegerProgram`, with its statistics."""

    def __init__(self, program: IntegerProgram, circuit: Any, compile_seconds: float) -> None:
        self.program = program
        self.circuit = circuit
        stats = circuit.statistics
        self.statistics = CircuitStatistics(
            pbs_count=int(circuit.programmable_bootstrap_count),
            max_bit_width=int(circuit.graph.maximum_integer_bit_width()),
            pbs_per_precision=program.lookups_by_width(),
            compile_seconds=compile_seconds,
            complexity=float(stats.get("complexity", 0.0)),
        )

    def keygen(self, force: bool = False) -> float:
        """Generate the keys (once); returns the seconds it took."""
        if self.statistics.keygen_seconds is not None and not force:
            return self.statistics.keygen_seconds
        start = time.perf_counter()
        self.circuit.keygen(force=force)
        self.statistics.keygen_seconds = time.perf_counter() - start
        stats = self.circuit.statistics
        self.statistics.key_bytes = {
            "secret": int(stats.get("size_of_secret_keys", 0)),
            "bootstrap": int(stats.get("size_of_bootstrap_keys", 0)),
            "keyswitch": int(stats.get("size_of_keyswitch_keys", 0)),
        }
        return self.statistics.keygen_seconds

    def run(self, q: np.ndarray, mode: str, verbose: bool = False) -> np.ndarray:
        """Run the circuit on an integer batch, sample by sample."""
        check_fhe_mode(mode)
        if mode == "disable":
            return np.asarray(self.program(q, NUMPY), dtype=np.int64)
        if mode == "execute":
            self.keygen()
        outputs = []
        for i in tqdm(range(q.shape[0]), desc=f"FHE {mode}", disable=not verbose, leave=False):
            sample = q[i : i + 1]
            if mode == "simulate":
                outputs.append(self.circuit.simulate(sample))
            else:
                outputs.append(self.circuit.decrypt(self.circuit.run(self.circuit.encrypt(sample))))
        return np.concatenate(
            [np.asarray(o, dtype=np.int64).reshape(1, *o.shape[1:]) for o in outputs]
        )


def compile_program(
    program: IntegerProgram,
    inputset: np.ndarray,
    *,
    p_error: float | None = None,
    global_p_error: float | None = None,
    verbose: bool = False,
) -> FHECircuit:
    """Compile ``program`` with Concrete.

    Args:
        program: the integer program.
        inputset: integer samples ``(N, *program.input_shape)`` used for tracing; every
            bit width comes from the program's proven bounds (hints), not from them.
        p_error: error probability of each table lookup; ``None`` keeps Concrete's
            default (a probability for the whole circuit, ``global_p_error=1e-5``).
        global_p_error: error probability for the whole circuit.
        verbose: show Concrete's progress.
    """
    if p_error is not None and not 0 < p_error < 1:
        raise ParameterError(f"The 'p_error' parameter must be in (0, 1). Got {p_error!r}.")
    if global_p_error is not None and not 0 < global_p_error < 1:
        raise ParameterError(
            f"The 'global_p_error' parameter must be in (0, 1). Got {global_p_error!r}."
        )
    if p_error is not None and global_p_error is None:
        configuration = fhe.Configuration(
            p_error=p_error, global_p_error=None, show_progress=verbose
        )
    else:
        configuration = fhe.Configuration(
            p_error=p_error,
            global_p_error=global_p_error if global_p_error is not None else 1e-5,
            show_progress=verbose,
        )

    def circuit_fn(q: Any) -> Any:
        return program(q, CONCRETE)

    compiler = fhe.Compiler(circuit_fn, {"q": "encrypted"})
    samples = [np.asarray(s, dtype=np.int64).reshape((1,) + program.input_shape) for s in inputset]
    start = time.perf_counter()
    try:
        circuit = compiler.compile(samples, configuration=configuration)
    except RuntimeError as exc:
        if "NoParametersFound" not in str(exc):
            raise
        lookups = program.lookups_by_width()
        widest = max((w for w in lookups if w > 1), default=0)
        raise CompilationError(
            "Concrete found no cryptographic parameters for this circuit: "
            f"{sum(lookups.values())} bootstraps, tables reading up to {widest} bits, "
            f"accumulators up to {max(s.acc_bits for s in program.steps if hasattr(s, 'acc_bits'))}"
            " bits. Narrower tables (rounding_bits), fewer bits (n_bits), or a larger "
            "global_p_error make it feasible."
        ) from exc
    return FHECircuit(program, circuit, time.perf_counter() - start)
