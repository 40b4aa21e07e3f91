"""Concrete compilation and the three execution modes of an :class:`IntegerProgram`.

* ``"disable"``: the integer program in NumPy, on the whole batch at once;
* ``"simulate"``: Concrete's simulator, sample by sample (models bootstrapping errors);
* ``"execute"``: real encryption: encrypt, run, decrypt, sample by sample.

Only this module and :mod:`fhe_quant.deploy` use ``concrete``, imported through
:func:`fhe_quant.process.import_concrete`.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from fhe_quant.errors import CompilationError, ParameterError
from fhe_quant.ir import ConvGeometry
from fhe_quant.lower import NUMPY, IntegerProgram
from fhe_quant.process import import_concrete

fhe = import_concrete()

__all__ = [
    "FHE_MODES",
    "WIRE_COMPRESSION",
    "check_fhe_mode",
    "CircuitStatistics",
    "KeyParameters",
    "key_parameters",
    "FHECircuit",
    "compile_program",
    "native_output",
]

FHE_MODES = ("disable", "simulate", "execute")

#: Concrete's options that shrink what travels between client and server, on for every
#: compiled model: evaluation keys and input ciphertexts are sent as seeds plus bodies
#: (the server expands them; the first run with new keys pays that expansion once). The
#: circuit, its cost (``complexity``) and its results are unchanged.
WIRE_COMPRESSION = ("compress_evaluation_keys", "compress_input_ciphertexts")


#: Lines Concrete's native runtime writes on its own (no flag turns them off), dropped
#: unless ``verbose``: its key cache reports every miss on stderr.
_NATIVE_CHATTER = (b"KeySetCache: ",)


@contextlib.contextmanager
def native_output(verbose: bool = False) -> Iterator[None]:
    """Route what Concrete's native code writes to file descriptors 1 and 2 (which
    Python's ``sys.stdout``/``sys.stderr`` cannot catch): unless ``verbose``, its own
    chatter (:data:`_NATIVE_CHATTER`, e.g. ``KeySetCache: miss, regenerating <path>``)
    is dropped; everything else is written back where it was going, after the block.

    Examples:
        >>> with native_output():
        ...     _ = os.write(2, b"KeySetCache: miss, regenerating /tmp/keys\\n")
    """
    if verbose:
        yield
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved, captures = {}, {}
    try:
        for fd in (1, 2):
            captures[fd] = tempfile.TemporaryFile()
            saved[fd] = os.dup(fd)
            os.dup2(captures[fd].fileno(), fd)
        yield
    finally:
        for fd, capture in captures.items():
            if fd in saved:
                os.dup2(saved[fd], fd)
                os.close(saved[fd])
            capture.seek(0)
            kept = [
                line
                for line in capture.read().splitlines(keepends=True)
                if not line.startswith(_NATIVE_CHATTER)
            ]
            capture.close()
            if kept:
                os.write(fd, b"".join(kept))


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


#: Bytes of one torus coefficient in Concrete's keys (64-bit integers).
_COEFFICIENT_BYTES = 8


@dataclass(frozen=True)
class KeyParameters:
    """One evaluation key as Concrete's optimizer chose it, and what it weighs.

    A bootstrap key holds ``input_lwe_dimension * level_count`` GGSW rows of ``k + 1``
    GLWE ciphertexts (``k = glwe_dimension``) of ``k + 1`` polynomials of
    ``polynomial_size`` coefficients; a keyswitch key ``input_lwe_dimension *
    level_count`` LWE ciphertexts of ``output_lwe_dimension + 1`` coefficients. A
    compressed key (``compress_evaluation_keys``) is sent as a seed plus the bodies
    only: one polynomial per GLWE ciphertext, one coefficient per LWE ciphertext.

    Attributes:
        kind: ``"bootstrap"`` or ``"keyswitch"``.
        input_lwe_dimension: LWE dimension of the ciphertexts the key reads.
        output_lwe_dimension: LWE dimension of those it produces (a bootstrap key's:
            ``glwe_dimension * polynomial_size``).
        level_count, base_log: the gadget decomposition.
        glwe_dimension, polynomial_size: a bootstrap key's GLWE (0 for a keyswitch key).
        compressed: sent as seed and bodies.

    Examples:
        >>> key = KeyParameters("bootstrap", 736, 2048, 2, 16, 4, 512, compressed=True)
        >>> key.serialized_bytes  # 736 * 2 rows * 5 bodies * 512 coefficients * 8 bytes
        30146560
        >>> key.serialized_bytes == KeyParameters(
        ...     "bootstrap", 736, 2048, 2, 16, 4, 512, compressed=False).serialized_bytes // 5
        True
        >>> KeyParameters("bootstrap", 736, 2000, 2, 16, 4, 512, compressed=True)
        Traceback (most recent call last):
        ...
        ValueError: The output_lwe_dimension of a bootstrap KeyParameters must be \
glwe_dimension * polynomial_size = 2048. Got 2000 instead.
    """

    kind: str
    input_lwe_dimension: int
    output_lwe_dimension: int
    level_count: int
    base_log: int
    glwe_dimension: int = 0
    polynomial_size: int = 0
    compressed: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("bootstrap", "keyswitch"):
            raise ValueError(
                "The kind of a KeyParameters must be 'bootstrap' or 'keyswitch'. "
                f"Got {self.kind!r} instead."
            )
        for name in ("input_lwe_dimension", "output_lwe_dimension", "level_count", "base_log"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"The {name} of a KeyParameters must be a positive int. Got {value!r}."
                )
        glwe = self.glwe_dimension * self.polynomial_size
        if self.kind == "bootstrap" and glwe != self.output_lwe_dimension:
            raise ValueError(
                "The output_lwe_dimension of a bootstrap KeyParameters must be "
                f"glwe_dimension * polynomial_size = {glwe}. "
                f"Got {self.output_lwe_dimension} instead."
            )

    @property
    def serialized_bytes(self) -> int:
        """Bytes of the key's coefficients as serialized (a few hundred bytes of
        header per key aside)."""
        rows = self.input_lwe_dimension * self.level_count
        if self.kind == "keyswitch":
            per_row = 1 if self.compressed else self.output_lwe_dimension + 1
        else:
            k = self.glwe_dimension
            per_row = (k + 1) * self.polynomial_size * (1 if self.compressed else k + 1)
        return rows * per_row * _COEFFICIENT_BYTES


def key_parameters(circuit: Any) -> tuple[KeyParameters, ...]:
    """The evaluation keys of a compiled ``concrete.fhe.Circuit``, read from its program
    description (no key needs to exist): bootstrap keys first, then keyswitch keys.

    Raises:
        CompilationError: the circuit uses packing keyswitch keys, whose size this
            does not model.
    """
    keyset = json.loads(circuit.server.client_specs.program_info.serialize())["keyset"]
    if keyset.get("packingKeyswitchKeys"):
        raise CompilationError(
            "The circuit uses packing keyswitch keys; key_parameters models bootstrap "
            "and keyswitch keys only."
        )
    dims = {key["id"]: int(key["params"]["lweDimension"]) for key in keyset["lweSecretKeys"]}
    keys = []
    for kind, field_name in (("bootstrap", "lweBootstrapKeys"), ("keyswitch", "lweKeyswitchKeys")):
        for key in keyset.get(field_name, []):
            params = key["params"]
            keys.append(
                KeyParameters(
                    kind,
                    dims[key["inputId"]],
                    dims[key["outputId"]],
                    int(params["levelCount"]),
                    int(params["baseLog"]),
                    int(params.get("glweDimension", 0)),
                    int(params.get("polynomialSize", 0)),
                    compressed=key.get("compression", "none") != "none",
                )
            )
    return tuple(keys)


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
        key_bytes: sizes of the keys Concrete generated (after ``keygen``), as its
            statistics report them (``bootstrap`` and ``keyswitch``: not what is
            serialized or sent, see ``evaluation_key_bytes``).
        compression: each option of :data:`WIRE_COMPRESSION` and whether the compiled
            circuit's configuration has it on.
        keys: the evaluation keys' parameters (:func:`key_parameters`), known at compile
            time (``None`` for a circuit with packing keyswitch keys, not modelled).
        evaluation_key_bytes: bytes of the serialized evaluation keys as deployed
            (compressed when ``compress_evaluation_keys`` is on), from ``keys``; what
            ``circuit.keys.evaluation.serialize()`` returns, headers aside.
    """

    pbs_count: int
    max_bit_width: int
    pbs_per_precision: dict[int, int]
    compile_seconds: float
    complexity: float
    keygen_seconds: float | None = None
    key_bytes: dict[str, int] = field(default_factory=dict)
    compression: dict[str, bool] = field(default_factory=dict)
    keys: tuple[KeyParameters, ...] | None = None

    @property
    def evaluation_key_bytes(self) -> int | None:
        if self.keys is None:
            return None
        return sum(key.serialized_bytes for key in self.keys)


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


def _wire_compression(circuit: Any) -> dict[str, bool]:
    """What the compiled circuit's configuration says of :data:`WIRE_COMPRESSION`."""
    configuration = getattr(circuit, "configuration", None)
    return {name: bool(getattr(configuration, name, False)) for name in WIRE_COMPRESSION}


@dataclass(frozen=True)
class _Compiled:
    """What Concrete made of an :class:`FHECircuit`: the circuit (its keys inside) and
    its statistics (key generation fills in its time and key sizes)."""

    circuit: Any
    statistics: CircuitStatistics


#: The Concrete circuit of each live :class:`FHECircuit`, by identity. NOTE: a Concrete
#: circuit holds native objects that neither pickle nor deep-copy, so it is kept here and
#: not in the FHECircuit's state: a pickled or copied FHECircuit carries what defines the
#: circuit (program, inputset, settings) and compiles again on first use.
_COMPILED: weakref.WeakKeyDictionary[FHECircuit, _Compiled] = weakref.WeakKeyDictionary()
_COMPILED_LOCK = threading.Lock()


@dataclass(frozen=True, eq=False)
class FHECircuit:
    """A Concrete circuit for an :class:`IntegerProgram`, as plain data: the program, the
    integer samples Concrete traces it with, and the compile settings.

    The compiled circuit itself (:attr:`circuit`, with its keys) is created from them,
    by :func:`compile_program` or, for a pickled or deep-copied FHECircuit, on first use;
    the same program, samples and settings give the same circuit, so a copy simulates
    the same integers. A copy has no keys: ``execute`` generates new ones.

    Attributes:
        program: the integer program (anything with its call, ``input_shape`` and
            ``lookups_by_width``: tree and k-NN programs too).
        inputset: int64 samples ``(N, *program.input_shape)`` traced by Concrete (bit
            widths come from the program's proven bounds, not from them).
        p_error: error probability of each table lookup (``None``: Concrete's default).
        global_p_error: error probability for the whole circuit.
        compress: :data:`WIRE_COMPRESSION` on.
    """

    program: IntegerProgram
    inputset: np.ndarray
    p_error: float | None = None
    global_p_error: float | None = None
    compress: bool = True

    def __post_init__(self) -> None:
        shape = (-1, *self.program.input_shape)
        inputset = np.array(self.inputset, dtype=np.int64).reshape(shape)
        inputset.setflags(write=False)
        object.__setattr__(self, "inputset", inputset)

    @property
    def is_compiled(self) -> bool:
        """Whether the Concrete circuit exists (else the next use compiles it)."""
        return self in _COMPILED

    @property
    def circuit(self) -> Any:
        """The ``concrete.fhe.Circuit`` (compiled now if this FHECircuit is a copy)."""
        return self._compiled().circuit

    @property
    def statistics(self) -> CircuitStatistics:
        """What the circuit costs (compiled now if this FHECircuit is a copy)."""
        return self._compiled().statistics

    def _compiled(self, verbose: bool = False) -> _Compiled:
        compiled = _COMPILED.get(self)
        if compiled is None:
            compiled = _compile(self, verbose)
            with _COMPILED_LOCK:
                compiled = _COMPILED.setdefault(self, compiled)
        return compiled

    def keygen(self, force: bool = False) -> float:
        """Generate the keys (once); returns the seconds it took."""
        compiled = self._compiled()
        statistics = compiled.statistics
        if statistics.keygen_seconds is not None and not force:
            return statistics.keygen_seconds
        start = time.perf_counter()
        with native_output():
            compiled.circuit.keygen(force=force)
        statistics.keygen_seconds = time.perf_counter() - start
        stats = compiled.circuit.statistics
        statistics.key_bytes = {
            "secret": int(stats.get("size_of_secret_keys", 0)),
            "bootstrap": int(stats.get("size_of_bootstrap_keys", 0)),
            "keyswitch": int(stats.get("size_of_keyswitch_keys", 0)),
        }
        return statistics.keygen_seconds

    def run(self, q: np.ndarray, mode: str, verbose: bool = False) -> np.ndarray:
        """Run the circuit on an integer batch, sample by sample."""
        check_fhe_mode(mode)
        if mode == "disable":
            return np.asarray(self.program(q, NUMPY), dtype=np.int64)
        if mode == "execute":
            self.keygen()
        circuit = self.circuit
        outputs = []
        for i in tqdm(range(q.shape[0]), desc=f"FHE {mode}", disable=not verbose, leave=False):
            sample = q[i : i + 1]
            if mode == "simulate":
                outputs.append(circuit.simulate(sample))
            else:
                outputs.append(circuit.decrypt(circuit.run(circuit.encrypt(sample))))
        return np.concatenate(
            [np.asarray(o, dtype=np.int64).reshape(1, *o.shape[1:]) for o in outputs]
        )


def _configuration(
    p_error: float | None, global_p_error: float | None, verbose: bool, compress: bool
) -> Any:
    """Concrete's configuration: the error probabilities and the wire compression."""
    wire = dict.fromkeys(WIRE_COMPRESSION, bool(compress))
    if p_error is not None and global_p_error is None:
        return fhe.Configuration(
            p_error=p_error, global_p_error=None, show_progress=verbose, **wire
        )
    return fhe.Configuration(
        p_error=p_error,
        global_p_error=global_p_error if global_p_error is not None else 1e-5,
        show_progress=verbose,
        **wire,
    )


def compile_program(
    program: IntegerProgram,
    inputset: np.ndarray,
    *,
    p_error: float | None = None,
    global_p_error: float | None = None,
    verbose: bool = False,
    compress: bool = True,
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
        compress: turn on :data:`WIRE_COMPRESSION` (smaller evaluation keys and input
            ciphertexts; same circuit and results). ``False`` only to measure the
            difference.

    Raises:
        ParameterError: a probability outside ``(0, 1)``.
        CompilationError: Concrete found no parameters for the circuit.
    """
    if p_error is not None and not 0 < p_error < 1:
        raise ParameterError(f"The 'p_error' parameter must be in (0, 1). Got {p_error!r}.")
    if global_p_error is not None and not 0 < global_p_error < 1:
        raise ParameterError(
            f"The 'global_p_error' parameter must be in (0, 1). Got {global_p_error!r}."
        )
    circuit = FHECircuit(program, inputset, p_error, global_p_error, bool(compress))
    circuit._compiled(verbose)
    return circuit


def _compile(target: FHECircuit, verbose: bool) -> _Compiled:
    """Compile ``target``'s program with Concrete (see :func:`compile_program`)."""
    program = target.program
    configuration = _configuration(target.p_error, target.global_p_error, verbose, target.compress)

    def circuit_fn(q: Any) -> Any:
        return program(q, CONCRETE)

    compiler = fhe.Compiler(circuit_fn, {"q": "encrypted"})
    samples = [np.array(sample[None]) for sample in target.inputset]  # writable copies
    start = time.perf_counter()
    try:
        circuit = compiler.compile(samples, configuration=configuration)
    except RuntimeError as exc:
        if "NoParametersFound" not in str(exc):
            raise
        raise _no_parameters(program) from exc
    seconds = time.perf_counter() - start
    stats = circuit.statistics
    statistics = CircuitStatistics(
        pbs_count=int(circuit.programmable_bootstrap_count),
        max_bit_width=int(circuit.graph.maximum_integer_bit_width()),
        pbs_per_precision=program.lookups_by_width(),
        compile_seconds=seconds,
        complexity=float(stats.get("complexity", 0.0)),
        compression=_wire_compression(circuit),
        keys=_modelled_keys(circuit),
    )
    return _Compiled(circuit, statistics)


def _modelled_keys(circuit: Any) -> tuple[KeyParameters, ...] | None:
    try:
        return key_parameters(circuit)
    except CompilationError:  # packing keyswitch keys: sizes not modelled
        return None


def _no_parameters(program: IntegerProgram) -> CompilationError:
    lookups = program.lookups_by_width()
    widest = max((w for w in lookups if w > 1), default=0)
    return CompilationError(
        "Concrete found no cryptographic parameters for this circuit: "
        f"{sum(lookups.values())} bootstraps, tables reading up to {widest} bits, "
        f"accumulators up to {max(s.acc_bits for s in program.steps if hasattr(s, 'acc_bits'))}"
        " bits. Narrower tables (rounding_bits), fewer bits (n_bits), or a larger "
        "global_p_error make it feasible."
    )
