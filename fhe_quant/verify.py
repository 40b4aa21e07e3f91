"""Verifiable integer inference: exact field encoding and Freivalds checks over Z_p.

A compiled model's clear (``fhe="disable"``) inference is integer arithmetic, so it can
be outsourced to an untrusted machine and checked cheaply, as Slalom (Tramèr and Boneh,
ICLR 2019) does for quantized networks:

* **Exact field encoding.** Every integer of the program is mapped to the prime field
  ``Z_p`` and back through its centered representative in ``[-(p-1)/2, (p-1)/2]``.
  The round trip is exact for every integer of magnitude below ``p/2``, and the
  lowering proves the range of every value of every layer (inputs, weights, the
  matmul ``q @ W.T`` before the offset, the offset, the accumulator), so
  :func:`check_field` can prove that a prime is large enough, layer by layer.
* **Freivalds' check.** For ``A (n, m)``, ``B (m, k)`` and a claimed ``C = A B``, the
  verifier draws ``r`` uniformly in ``Z_p^k`` and tests ``A (B r) == C r (mod p)``:
  ``O(nm + mk + nk)`` operations instead of ``O(nmk)`` to recompute ``A B``. A wrong
  ``C`` passes one round with probability at most ``1/p``.
* **Model-level protocol.** :func:`prove_inference` (the untrusted prover) returns a
  :class:`Transcript` of every layer's integer output; :func:`verify_inference` checks
  the input codes, every linear layer by Freivalds over the whole batch, and every
  table lookup by direct evaluation, and names the first layer that fails.

Examples:
    >>> import numpy as np, torch
    >>> from fhe_quant.torch import compile_torch_model
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = np.random.default_rng(0).normal(size=(50, 4))
    >>> qm = compile_torch_model(net, x, n_bits=4, compile=False)
    >>> transcript = prove_inference(qm, x)  # on the untrusted machine
    >>> verify_inference(qm, x, transcript, rng=0).ok  # rng=None in production
    True
    >>> qm.dequantize_output(transcript.output).shape  # the verified result
    (50, 2)
"""

from __future__ import annotations

import functools
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fhe_quant.errors import InputError, ParameterError, RangeError, UnsupportedOpError
from fhe_quant.ir import linear_bounds
from fhe_quant.lower import NUMPY, IntegerProgram, LinearStep, TableStep

__all__ = [
    "DEFAULT_PRIME",
    "FLOAT32_EXACT_LIMIT",
    "is_prime",
    "to_field",
    "from_field",
    "field_matmul",
    "freivalds_check",
    "LayerFieldBounds",
    "field_bounds",
    "check_field",
    "Transcript",
    "VerificationResult",
    "prove_inference",
    "verify_inference",
]

#: Slalom's prime, ``2**23 + 2**21 + 7``: ``p + p // 2 < 2**24``, so a canonical residue
#: plus a centered one is an integer float32 holds exactly. (It is *not* the largest
#: prime with that property: 11184799 is; any prime below ``2**24`` works here.)
DEFAULT_PRIME = 2**23 + 2**21 + 7

#: float32 holds every integer of magnitude at most ``2**24`` exactly (24-bit significand).
FLOAT32_EXACT_LIMIT = 2**24

# int64 arithmetic: products of two centered residues must fit, with room to sum them.
_INT64_PRIME_LIMIT = 2**31
_INT64_MAX = int(np.iinfo(np.int64).max)
# Miller-Rabin with the first 12 primes as bases is deterministic below this bound
# (Sorenson and Webster, 2015).
_MR_BASES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37)
_MR_LIMIT = 3_317_044_064_679_887_385_961_981
# Cost of a few NumPy calls, in the element operations of _plan_float32's cost model.
_CALL = 50_000
_DTYPES = {np.dtype(np.int64): "int64", np.dtype(np.float32): "float32"}


# ----------------------------------------------------------------------------- the field


def is_prime(n: int) -> bool:
    """Whether ``n`` is prime (deterministic Miller-Rabin).

    Args:
        n: an integer below ``3.3e24`` (the 12 prime bases used are proven sufficient
            there).

    Returns:
        ``True`` if ``n`` is prime.

    Raises:
        ParameterError: ``n`` is not an int or is too large for a deterministic answer.

    Examples:
        >>> is_prime(DEFAULT_PRIME), is_prime(2047), is_prime(2**31 - 1)
        (True, False, True)
    """
    if isinstance(n, bool | np.bool_) or not isinstance(n, numbers.Integral):
        raise ParameterError(f"is_prime needs an int. Got {n!r} instead.")
    n = int(n)
    if n >= _MR_LIMIT:
        raise ParameterError(f"is_prime is deterministic only below {_MR_LIMIT}. Got {n} instead.")
    if n < 2:
        return False
    for base in _MR_BASES:
        if n % base == 0:
            return n == base
    d, s = n - 1, 0
    while d % 2 == 0:
        d, s = d // 2, s + 1
    for base in _MR_BASES:
        x = pow(base, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(s - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _next_prime(n: int) -> int:
    """The smallest prime ``>= n``."""
    n = max(n, 2)
    while not is_prime(n):
        n += 1
    return n


def _check_prime(p: Any, dtype: np.dtype | None = None, where: str = "verify") -> int:
    """``p`` as an odd prime usable with ``dtype``'s arithmetic (``ParameterError`` else)."""
    if isinstance(p, bool | np.bool_) or not isinstance(p, numbers.Integral):
        raise ParameterError(f"The 'p' parameter of {where} must be a prime int. Got {p!r}.")
    p = int(p)
    arithmetic = "float32" if dtype == np.float32 else "int64"
    limit = FLOAT32_EXACT_LIMIT if arithmetic == "float32" else _INT64_PRIME_LIMIT
    if not 3 <= p < limit or not is_prime(p):
        raise ParameterError(
            f"The 'p' parameter of {where} must be an odd prime below {limit} ({arithmetic} "
            f"arithmetic). Got {p} instead; {DEFAULT_PRIME} (the default) suits most models."
        )
    return p


def _check_dtype(dtype: Any, where: str) -> np.dtype:
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved not in _DTYPES:
        raise ParameterError(
            f"The 'dtype' parameter of {where} must be np.int64 or np.float32. Got {dtype!r}."
        )
    return resolved


def _check_rounds(rounds: Any, where: str) -> int:
    if isinstance(rounds, bool | np.bool_) or not isinstance(rounds, numbers.Integral):
        raise ParameterError(
            f"The 'rounds' parameter of {where} must be an int >= 1. Got {rounds!r}."
        )
    if rounds < 1:
        raise ParameterError(f"The 'rounds' parameter of {where} must be >= 1. Got {rounds}.")
    return int(rounds)


def _make_rng(rng: Any, where: str) -> np.random.Generator:
    try:
        return np.random.default_rng(rng)
    except (TypeError, ValueError):
        raise ParameterError(
            f"The 'rng' parameter of {where} must be None, an int seed or a "
            f"numpy.random.Generator. Got {rng!r} instead."
        ) from None


def _integers(values: Any, what: str) -> np.ndarray:
    """``values`` as an integer array, or :class:`InputError` naming ``what``."""
    array = np.asarray(values)
    if array.dtype.kind not in "iu":
        raise InputError(f"The {what} must hold integers; got dtype {array.dtype} instead.")
    return array


def _residues(array: np.ndarray, p: int) -> np.ndarray:
    """Canonical residues in ``[0, p)`` as int64, for any integer array (uint64 too)."""
    if array.dtype == np.uint64:
        return (array % np.uint64(p)).astype(np.int64)
    return np.mod(array.astype(np.int64, copy=False), p)


def _center(array: np.ndarray, p: int) -> np.ndarray:
    """Centered representatives in ``[-(p-1)/2, (p-1)/2]`` (int64) of an integer array."""
    half = (p - 1) // 2
    if array.dtype != np.uint64 and array.size and -half <= array.min() and array.max() <= half:
        return array.astype(np.int64, copy=False)  # NOTE: already centered (the usual case)
    residues = _residues(array, p)
    return residues - p * (residues > (p - 1) // 2)


def to_field(values: Any, p: int = DEFAULT_PRIME) -> np.ndarray:
    """Encode integers into ``Z_p``: the canonical residues ``values mod p`` in ``[0, p)``.

    Args:
        values: an integer array (any integer dtype) or nested lists of ints.
        p: an odd prime below ``2**31``.

    Returns:
        An int64 array shaped like ``values``.

    Raises:
        InputError: ``values`` does not hold integers.
        ParameterError: ``p`` is not such a prime.

    Examples:
        >>> to_field([-3, 0, 3, 7, 8], 7).tolist()
        [4, 0, 3, 0, 1]
    """
    p = _check_prime(p, where="to_field")
    return _residues(_integers(values, "values given to to_field"), p)


def from_field(elements: Any, p: int = DEFAULT_PRIME) -> np.ndarray:
    """Decode field elements to integers: the centered representative in
    ``[-(p-1)/2, (p-1)/2]``.

    ``from_field(to_field(x, p), p) == x`` exactly when ``|x| < p/2``, the condition
    :func:`check_field` proves for every value of a compiled model.

    Args:
        elements: an integer array of field elements (any representatives).
        p: an odd prime below ``2**31``.

    Returns:
        An int64 array shaped like ``elements``.

    Raises:
        InputError: ``elements`` does not hold integers.
        ParameterError: ``p`` is not such a prime.

    Examples:
        >>> from_field(to_field([-3, 0, 3], 7), 7).tolist()
        [-3, 0, 3]
        >>> from_field(to_field([4], 7), 7).tolist()  # |4| >= 7/2: wraps
        [-3]
    """
    p = _check_prime(p, where="from_field")
    return _center(_integers(elements, "elements given to from_field"), p)


# ---------------------------------------------------------------- exact products mod p


def _absmax(array: np.ndarray) -> int:
    return max(-int(array.min()), int(array.max())) if array.size else 0


def _matmul_int64(M: np.ndarray, V: np.ndarray, p: int) -> np.ndarray:
    """``M @ V mod p`` (centered) for centered int64 inputs, without int64 overflow.

    Every product is at most ``bound = max|M| * max|V| <= ((p-1)/2)**2``; a sum of
    ``chunk = INT64_MAX // bound`` of them fits int64 in any order, so the inner
    dimension is cut into chunks of that length and each partial result reduced.
    For ``p < 2**24`` the worst case ``bound < 2**46`` allows chunks of ``2**17``; for
    the model's small quantized operands the whole inner dimension fits at once.
    """
    m = M.shape[1]
    bound = _absmax(M) * _absmax(V)
    chunk = m if bound == 0 else _INT64_MAX // bound
    if chunk >= m:
        return _center(M @ V, p)
    out = np.zeros((M.shape[0], V.shape[1]), dtype=np.int64)
    for start in range(0, m, chunk):
        part = _center(M[:, start : start + chunk] @ V[start : start + chunk], p)
        out = _center(out + part, p)  # |out + part| <= p - 1: no overflow
    return out


def _center_f32(x: np.ndarray, p: np.float32) -> np.ndarray:
    """Centered residues of integer-valued float32 ``x``; exact (see :func:`field_matmul`)."""
    r = np.fmod(x, p)
    half = np.float32((int(p) - 1) // 2)
    return np.where(r > half, r - p, np.where(r < -half, r + p, r))


def _split(x: np.ndarray, width: int, count: int) -> list[np.ndarray]:
    """Signed limbs of a centered int64 array: ``x = sum_i 2**(width*i) * limb_i`` with
    ``|limb_i| < 2**width`` (sign times the magnitude's bit field), as float32."""
    if count == 1:
        return [x.astype(np.float32)]  # |x| < 2**width already: the limb is x itself
    sign, magnitude = np.sign(x), np.abs(x)
    mask = (1 << width) - 1
    return [(sign * ((magnitude >> (width * i)) & mask)).astype(np.float32) for i in range(count)]


@functools.lru_cache(maxsize=256)
def _plan_float32(
    bound_m: int, bound_v: int, n: int, m: int, t: int
) -> tuple[int, int, int, int, int]:
    """Limb widths ``(a, b)``, limb counts and inner chunk for :func:`_matmul_float32`.

    Any choice with ``chunk * maxlimb_M * maxlimb_V <= 2**24`` is exact; among those,
    pick the cheapest by a simple cost model: each limb of the big matrix ``M`` is one
    pass over ``n*m`` values whose width grows with the ``t*count_v`` columns of the
    thin side, plus a reduction and a few NumPy calls per chunk.
    """
    bits_m, bits_v = max(1, bound_m.bit_length()), max(1, bound_v.bit_length())
    best: tuple[float, tuple[int, int, int, int, int]] | None = None
    for a in range(1, bits_m + 1):
        count_m, limb_m = math.ceil(bits_m / a), min((1 << a) - 1, bound_m)
        for b in range(1, bits_v + 1):
            count_v, limb_v = math.ceil(bits_v / b), min((1 << b) - 1, bound_v)
            if limb_m * limb_v > FLOAT32_EXACT_LIMIT:
                continue
            chunk = min(m, FLOAT32_EXACT_LIMIT // max(1, limb_m * limb_v))
            chunks = math.ceil(m / chunk)
            cost = count_m * (n * m * (2 + t * count_v) + chunks * (8 * n * t * count_v + _CALL))
            if best is None or cost < best[0]:
                best = (cost, (a, b, count_m, count_v, chunk))
    assert best is not None  # a = b = 1 always qualifies
    return best[1]


def _matmul_float32(M: np.ndarray, V: np.ndarray, p: int) -> np.ndarray:
    """``M @ V mod p`` (centered) with every arithmetic operation in float32, exactly.

    See :func:`field_matmul` for the exactness argument.
    """
    n, m = M.shape
    t = V.shape[1]
    bound_m, bound_v = _absmax(M), _absmax(V)
    if bound_m == 0 or bound_v == 0:
        return np.zeros((n, t), dtype=np.int64)
    a, b, count_m, count_v, chunk = _plan_float32(bound_m, bound_v, n, m, t)
    pf = np.float32(p)
    v_limbs = np.concatenate(_split(V, b, count_v), axis=1)  # (m, t * count_v)
    out = np.zeros((n, t), dtype=np.float32)
    for i, m_limb in enumerate(_split(M, a, count_m)):
        sums = np.zeros((n, t * count_v), dtype=np.float32)
        for start in range(0, m, chunk):
            # |partial sums| <= chunk * maxlimb_M * maxlimb_V <= 2**24: exact in any order
            part = m_limb[:, start : start + chunk] @ v_limbs[start : start + chunk]
            sums = _center_f32(sums + _center_f32(part, pf), pf)
        # a power-of-two scale only moves the exponent; fmod is exact in IEEE 754
        scales = np.repeat(2.0 ** (a * i + b * np.arange(count_v)), t).astype(np.float32)
        terms = _center_f32(sums * scales, pf)
        for j in range(count_v):
            out = _center_f32(out + terms[:, j * t : (j + 1) * t], pf)
    return out.astype(np.int64)


def _field_matmul(M: np.ndarray, V: np.ndarray, p: int, dtype: np.dtype) -> np.ndarray:
    if dtype == np.float32:
        return _matmul_float32(M, V, p)
    return _matmul_int64(M, V, p)


def field_matmul(M: Any, V: Any, p: int = DEFAULT_PRIME, *, dtype: Any = np.int64) -> np.ndarray:
    """The exact product ``M @ V`` in ``Z_p``, as centered representatives.

    **int64** (``p < 2**31``): operands are reduced to centered residues, products
    are at most ``((p-1)/2)**2`` and the inner dimension is summed in chunks short
    enough that no partial sum overflows int64, each chunk reduced mod ``p``. For
    ``p < 2**24`` a sum of ``2**15`` worst-case products (``< 2**48`` each) always fits;
    chunks are sized from the operands' actual magnitudes, so a model's small
    quantized values are summed in one piece.

    **float32** (``p < 2**24``), as Slalom does on GPUs, with exactness proven as
    follows. float32 represents every integer of magnitude ``<= 2**24`` exactly, but
    the product of two 23-bit field elements has 46 bits, so both operands are split
    into signed limbs, ``M = sum_i 2**(a*i) M_i`` with ``|M_i| < 2**a`` and
    ``V = sum_j 2**(b*j) V_j`` with ``|V_j| < 2**b``, and the inner dimension into
    chunks of ``c`` terms, with ``c * max|M_i| * max|V_j| <= 2**24``. Then:

    1. every product and every partial sum of ``M_i[:, chunk] @ V_j[chunk]`` is an
       integer of magnitude ``<= 2**24`` whatever order or fused multiply-add the BLAS
       uses, so the float32 matmul is exact;
    2. ``fmod`` is exact in IEEE 754 (the remainder of two floats is representable),
       and bringing a value of ``(-p, p)`` to ``[-(p-1)/2, (p-1)/2]`` adds or subtracts
       ``p``: integers below ``2**24``, exact;
    3. the sum of two centered residues has magnitude ``<= p - 1 < 2**24``: exact;
    4. the limb weight ``2**(a*i + b*j)`` only moves the exponent (no overflow below
       ``2**128``), and ``fmod`` reduces the product exactly.

    So every float32 operation returns the exact integer and both dtypes give the same
    result. Limb widths minimize a simple cost model; a small operand (6-bit weights,
    4-bit activations) needs a single limb, which is Slalom's observation.

    Args:
        M: integer matrix ``(n, m)``.
        V: integer matrix ``(m, t)``.
        p: an odd prime, below ``2**31`` (int64) or ``2**24`` (float32).
        dtype: ``np.int64`` or ``np.float32``: the arithmetic used.

    Returns:
        The int64 matrix ``(n, t)`` of centered representatives of ``M @ V mod p``.

    Raises:
        InputError: non-integer inputs or shapes that do not multiply.
        ParameterError: bad ``p`` or ``dtype``.

    Examples:
        >>> M, V = np.array([[3, -2], [1, 4]]), np.array([[5], [6]])
        >>> field_matmul(M, V, 7).tolist(), field_matmul(M, V, 7, dtype=np.float32).tolist()
        ([[3], [1]], [[3], [1]])
    """
    dtype = _check_dtype(dtype, "field_matmul")
    p = _check_prime(p, dtype, "field_matmul")
    M, V = _integers(M, "matrix M"), _integers(V, "matrix V")
    if M.ndim != 2 or V.ndim != 2 or M.shape[1] != V.shape[0]:
        raise InputError(
            f"field_matmul needs matrices M (n, m) and V (m, t). Got shapes {M.shape} and "
            f"{V.shape} instead."
        )
    return _field_matmul(_center(M, p), _center(V, p), p, dtype)


def _freivalds(
    A: np.ndarray, B: np.ndarray, C: np.ndarray, R: np.ndarray, p: int, dtype: np.dtype
) -> bool:
    """``A (B R) == C R (mod p)`` for centered int64 operands; ``R`` holds one random
    vector per column (round)."""
    left = _field_matmul(A, _field_matmul(B, R, p, dtype), p, dtype)
    return bool(np.array_equal(left, _field_matmul(C, R, p, dtype)))


def _random_vectors(rng: np.random.Generator, p: int, k: int, rounds: int) -> np.ndarray:
    return _center(rng.integers(0, p, size=(k, rounds), dtype=np.int64), p)


def freivalds_check(
    A: Any,
    B: Any,
    C: Any,
    p: int = DEFAULT_PRIME,
    rounds: int = 2,
    rng: Any = None,
    *,
    dtype: Any = np.int64,
) -> bool:
    """Freivalds' check that ``A @ B == C (mod p)``, in ``O(nm + mk + nk)`` operations.

    Each round draws ``r`` uniformly in ``Z_p^k`` and compares ``A (B r)`` with
    ``C r`` mod ``p``. If ``D = A B - C != 0 (mod p)``, take a row ``d`` of ``D`` with
    ``d_j != 0``: for every choice of the other coordinates of ``r`` exactly one value of
    ``r_j`` makes ``d . r = 0``, so one round accepts with probability at most ``1/p``
    (exactly ``1/p`` when ``D`` has a single nonzero entry). Rounds are independent:
    **a wrong product is accepted with probability at most** ``(1/p)**rounds``. A
    correct one is always accepted. (With ``r`` in ``{0, 1}^k``, the textbook variant,
    the bound would only be ``1/2`` per round.)

    The check is modulo ``p``: ``C`` and ``C + p`` are the same claim. Callers that need
    integer equality must also bound the claimed values, as :func:`verify_inference`
    does with the lowering's proven ranges.

    Args:
        A: integer matrix ``(n, m)``; any integer values (they are reduced mod ``p``).
        B: integer matrix ``(m, k)``.
        C: claimed product, integer matrix ``(n, k)``.
        p: an odd prime, below ``2**31`` (int64) or ``2**24`` (float32).
        rounds: independent random vectors (each divides the error bound by ``p``).
        rng: ``None`` (fresh OS entropy: use it when the prover is untrusted, since a
            prover who can predict ``r`` can forge ``C``), an int seed, or a
            ``numpy.random.Generator``.
        dtype: ``np.int64`` or ``np.float32`` arithmetic (exact either way, see
            :func:`field_matmul`); both draw the same vectors from the same ``rng``.

    Returns:
        ``True`` if every round passes.

    Raises:
        InputError: non-integer matrices or shapes that do not match.
        ParameterError: bad ``p``, ``rounds``, ``rng`` or ``dtype``.

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> A, B = rng.integers(-50, 50, (30, 20)), rng.integers(-50, 50, (20, 10))
        >>> C = A @ B
        >>> freivalds_check(A, B, C, rng=1)
        True
        >>> C[4, 7] += 1
        >>> freivalds_check(A, B, C, rng=1), freivalds_check(A, B, C, rng=1, dtype=np.float32)
        (False, False)
    """
    dtype = _check_dtype(dtype, "freivalds_check")
    p = _check_prime(p, dtype, "freivalds_check")
    rounds = _check_rounds(rounds, "freivalds_check")
    generator = _make_rng(rng, "freivalds_check")
    A, B, C = (_integers(v, f"matrix {n}") for v, n in ((A, "A"), (B, "B"), (C, "C")))
    if (
        A.ndim != 2
        or B.ndim != 2
        or C.ndim != 2
        or A.shape[1] != B.shape[0]
        or C.shape != (A.shape[0], B.shape[1])
    ):
        raise InputError(
            "freivalds_check needs A (n, m), B (m, k) and C (n, k). Got shapes "
            f"{A.shape}, {B.shape} and {C.shape} instead."
        )
    R = _random_vectors(generator, p, B.shape[1], rounds)
    return _freivalds(_center(A, p), _center(B, p), _center(C, p), R, p, dtype)


# ------------------------------------------------------------------ the model's ranges


def _module_of(model: Any, where: str) -> IntegerProgram:
    """The program of a compiled model that can also quantize its inputs."""
    program = _program_of(model, where)
    if not callable(getattr(model, "quantize_input", None)):
        raise ParameterError(
            f"The 'model' parameter of {where} must be a compiled model with quantize_input "
            f"(a QuantizedModule from compile_torch_model). Got {type(model).__name__}."
        )
    return program


def _program_of(model: Any, where: str) -> IntegerProgram:
    program = model if isinstance(model, IntegerProgram) else getattr(model, "program", None)
    if not isinstance(program, IntegerProgram):
        raise ParameterError(
            f"The 'model' parameter of {where} must be a compiled model (a QuantizedModule "
            f"from compile_torch_model) or its IntegerProgram. Got {type(model).__name__}."
        )
    # NOTE: the checks follow the chain of linear layers and tables; a branching program
    # (residual adds, concatenations, max pools) or a custom step has no such chain. This
    # validates what the caller passed (the step types the checks below are written for);
    # past it, a step producing an accumulator is a linear layer, any other a table.
    for index, step in enumerate(program.steps):
        inputs = getattr(step, "inputs", ())
        if not isinstance(step, (LinearStep, TableStep)) or tuple(inputs) not in ((), (index,)):
            raise UnsupportedOpError(
                type(step).__name__,
                getattr(step, "name", f"step {index}"),
                f"{where} checks chains of linear layers and tables only; this program "
                "branches (residual add, concatenation or max pool) or has a custom step.",
            )
    return program


@dataclass(frozen=True)
class LayerFieldBounds:
    """Proven ranges of every value of one linear layer's arithmetic.

    Attributes:
        name: the layer's name (``LinearStep.name``).
        input_max: largest input code (codes are ``>= 0``).
        weight_max: largest ``|W|``.
        matmul_min: smallest value of ``q @ W.T`` (before the offset).
        matmul_max: largest value of ``q @ W.T``.
        offset_max: largest ``|offset|``.
        acc_max: largest accumulator value (``0 <= acc <= acc_max``).
    """

    name: str
    input_max: int
    weight_max: int
    matmul_min: int
    matmul_max: int
    offset_max: int
    acc_max: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str):
            raise ValueError(f"The 'name' of LayerFieldBounds must be a str. Got {self.name!r}.")
        for key in ("input_max", "weight_max", "offset_max", "acc_max"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 0:
                raise ValueError(
                    f"The {key!r} of LayerFieldBounds {self.name!r} must be an int >= 0. "
                    f"Got {value!r}."
                )
        if not self.matmul_min <= self.matmul_max:
            raise ValueError(
                f"LayerFieldBounds {self.name!r} has matmul_min {self.matmul_min} > "
                f"matmul_max {self.matmul_max}."
            )

    @property
    def magnitudes(self) -> dict[str, int]:
        """Largest magnitude of each kind of value, by a readable name."""
        return {
            "input code": self.input_max,
            "weight |W|": self.weight_max,
            "matmul q @ W.T": max(-self.matmul_min, self.matmul_max),
            "offset": self.offset_max,
            "accumulator": self.acc_max,
        }

    @property
    def magnitude(self) -> int:
        """Largest magnitude of any value of the layer."""
        return max(self.magnitudes.values())

    @property
    def min_prime(self) -> int:
        """Smallest prime ``p`` whose centered interval holds the layer
        (``magnitude <= (p-1)/2``)."""
        return _next_prime(2 * self.magnitude + 1)


def field_bounds(model: Any) -> tuple[LayerFieldBounds, ...]:
    """Proven ranges of every linear layer's values, from the lowering's proofs.

    A layer reads the input codes ``[0, qmax]`` (first layer) or the previous table's
    proven ``[out_min, out_max]``; the matmul range is
    :func:`fhe_quant.ir.linear_bounds` of those; the accumulator range is the
    lowering's ``[0, acc_max]``. Partial sums inside the matmul need no bound: the map
    from the integers to ``Z_p`` is a ring homomorphism, so only the values that are
    decoded or compared must lie in ``(-p/2, p/2)``.

    Args:
        model: a compiled model (``QuantizedModule``) or its ``IntegerProgram``.

    Returns:
        One :class:`LayerFieldBounds` per linear layer, in program order.

    Raises:
        ParameterError: ``model`` is not a compiled model.

    Examples:
        >>> import numpy as np, torch
        >>> from fhe_quant.torch import compile_torch_model
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> qm = compile_torch_model(net, np.random.default_rng(0).normal(size=(20, 3)),
        ...                          n_bits=4, compile=False)
        >>> [b.name for b in field_bounds(qm)], field_bounds(qm)[0].input_max
        (['_0', '_2'], 15)
    """
    program = _program_of(model, "field_bounds")
    lower = np.zeros((1,) + program.input_shape, dtype=np.int64)
    upper = np.full((1,) + program.input_shape, program.input_quantizer.qmax, dtype=np.int64)
    bounds = []
    for step in program.steps:
        if step.produces != "accumulator":  # a table (the chain holds no other step)
            lower, upper = step.out_min, step.out_max
            continue
        lo, hi = linear_bounds(step.op, step.weight, lower, upper, step.attrs)
        bounds.append(
            LayerFieldBounds(
                name=step.name,
                input_max=int(np.max(upper)),
                weight_max=_absmax(np.asarray(step.weight)),
                matmul_min=int(lo.min()),
                matmul_max=int(hi.max()),
                offset_max=_absmax(np.asarray(step.offset)),
                acc_max=int(np.max(step.acc_max)),
            )
        )
    return tuple(bounds)


def check_field(model: Any, p: int = DEFAULT_PRIME) -> tuple[LayerFieldBounds, ...]:
    """Prove that ``Z_p`` encodes every value of every linear layer exactly.

    Args:
        model: a compiled model (``QuantizedModule``) or its ``IntegerProgram``.
        p: an odd prime below ``2**31``.

    Returns:
        The layers' :func:`field_bounds`, all within ``[-(p-1)/2, (p-1)/2]``.

    Raises:
        RangeError: a layer has a value of magnitude ``>= p/2``; the message names the
            layer, the value and the smallest prime that would do.
        ParameterError: ``p`` is not an odd prime below ``2**31``.

    Examples:
        >>> import numpy as np, torch
        >>> from fhe_quant.torch import compile_torch_model
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> qm = compile_torch_model(net, np.random.default_rng(0).normal(size=(20, 3)),
        ...                          n_bits=4, compile=False)
        >>> len(check_field(qm))
        2
        >>> check_field(qm, 101)
        Traceback (most recent call last):
        ...
        fhe_quant.errors.RangeError: Layer '_0' does not fit the field Z_p with p=101: ...
    """
    p = _check_prime(p, where="check_field")
    bounds = field_bounds(model)
    half = (p - 1) // 2
    for layer in bounds:
        if layer.magnitude > half:
            what, value = max(layer.magnitudes.items(), key=lambda item: item[1])
            raise RangeError(
                f"Layer {layer.name!r} does not fit the field Z_p with p={p}: its {what} "
                f"reaches magnitude {value} (proven bound), but Z_p holds integers exactly "
                f"only in [-{half}, {half}] (|x| < p/2). Use a prime of at least "
                f"{layer.min_prime} (the default {DEFAULT_PRIME} holds magnitudes up to "
                f"{(DEFAULT_PRIME - 1) // 2})."
            )
    return bounds


# ------------------------------------------------------------------ transcript & result


_KEY = re.compile(r"^(accumulator|activation)_(\d+)$")


@dataclass(frozen=True, eq=False)
class Transcript:
    """What the untrusted prover claims: every integer value of the inference.

    A transcript is a claim, not a trusted object: the constructor only checks the
    containers (so that a forged or corrupted transcript can still be built, stored and
    loaded) and :func:`verify_inference` judges the contents, answering ``ok=False``
    with a reason for any malformed array rather than raising.

    Attributes:
        inputs: the input codes ``(N, *input_shape)``.
        accumulators: each linear layer's output ``acc = q @ W.T + offset``, batch-first,
            in program order; the last one is the model's integer output.
        activations: each table's output (the next layer's input codes), batch-first.
    """

    inputs: Any
    accumulators: tuple[Any, ...]
    activations: tuple[Any, ...]

    def __post_init__(self) -> None:
        for key in ("accumulators", "activations"):
            value = getattr(self, key)
            if not isinstance(value, list | tuple):
                raise InputError(
                    f"The {key!r} of a Transcript must be a tuple or list of arrays, one per "
                    f"layer. Got {type(value).__name__} instead."
                )
            object.__setattr__(self, key, tuple(value))

    @property
    def output(self) -> Any:
        """The last accumulator: the model's integer output (``model.dequantize_output``)."""
        return self.accumulators[-1]

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The transcript as named arrays, for ``np.savez`` (no pickle).

        Examples:
            >>> t = Transcript(np.zeros((1, 2), np.int64), (np.ones((1, 3), np.int64),), ())
            >>> sorted(t.to_arrays())
            ['accumulator_0', 'inputs']
        """
        arrays = {"inputs": np.asarray(self.inputs)}
        arrays.update({f"accumulator_{i}": np.asarray(a) for i, a in enumerate(self.accumulators)})
        arrays.update({f"activation_{i}": np.asarray(a) for i, a in enumerate(self.activations)})
        return arrays

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> Transcript:
        """A transcript from :meth:`to_arrays`'s names (e.g. ``np.load(path)`` of a
        ``.npz``; pass ``allow_pickle=False``).

        Raises:
            InputError: a key is missing, unknown or out of sequence.

        Examples:
            >>> t = Transcript(np.zeros((1, 2), np.int64), (np.ones((1, 3), np.int64),), ())
            >>> Transcript.from_arrays(t.to_arrays()).output.tolist()
            [[1, 1, 1]]
        """
        keys = list(arrays.keys())
        if "inputs" not in keys:
            raise InputError(f"A transcript needs an 'inputs' array. Got keys {keys}.")
        found: dict[str, dict[int, Any]] = {"accumulator": {}, "activation": {}}
        for key in keys:
            if key == "inputs":
                continue
            match = _KEY.match(key)
            if match is None:
                raise InputError(
                    f"Unknown transcript array {key!r}; expected 'inputs', 'accumulator_<i>' "
                    "or 'activation_<i>'."
                )
            found[match.group(1)][int(match.group(2))] = arrays[key]
        for kind, items in found.items():
            if sorted(items) != list(range(len(items))):
                raise InputError(
                    f"The transcript's {kind} arrays must be numbered 0, 1, ... without gaps. "
                    f"Got numbers {sorted(items)}."
                )
        return cls(
            arrays["inputs"],
            tuple(found["accumulator"][i] for i in range(len(found["accumulator"]))),
            tuple(found["activation"][i] for i in range(len(found["activation"]))),
        )


@dataclass(frozen=True)
class VerificationResult:
    """The verifier's answer.

    Attributes:
        ok: ``True`` if every check passed.
        failed_layer: ``None`` if ``ok`` (or if the transcript's structure is wrong as a
            whole); else ``"input"`` for the input codes, a linear layer's name, or
            ``"<name>/table"`` for the table after linear layer ``<name>``.
        reason: what was checked, or what failed and why.
    """

    ok: bool
    failed_layer: str | None
    reason: str

    def __post_init__(self) -> None:
        if not isinstance(self.ok, bool):
            raise ValueError(f"The 'ok' of a VerificationResult must be a bool. Got {self.ok!r}.")
        if self.failed_layer is not None and not isinstance(self.failed_layer, str):
            raise ValueError(
                "The 'failed_layer' of a VerificationResult must be a str or None. Got "
                f"{self.failed_layer!r}."
            )
        if self.ok and self.failed_layer is not None:
            raise ValueError(
                f"A passing VerificationResult has no failed layer. Got {self.failed_layer!r}."
            )
        if not isinstance(self.reason, str):
            raise ValueError(
                f"The 'reason' of a VerificationResult must be a str. Got {self.reason!r}."
            )


# ---------------------------------------------------------------------- prover, verifier


def prove_inference(model: Any, x: Any) -> Transcript:
    """The prover: run the compiled model in clear integers and record every value.

    This is the ``fhe="disable"`` inference (``model.forward_integers``), step by step.

    Args:
        model: a compiled model (``QuantizedModule``, from ``compile_torch_model``).
        x: a float batch ``(N, *input_shape)``.

    Returns:
        The :class:`Transcript`: input codes, every linear layer's accumulator and
        every table's output, batch-first.

    Raises:
        ParameterError: ``model`` is not a compiled model.
        InputError: ``x`` has the wrong shape or NaN/inf values.

    Examples:
        >>> import numpy as np, torch
        >>> from fhe_quant.torch import compile_torch_model
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = np.random.default_rng(0).normal(size=(20, 3))
        >>> qm = compile_torch_model(net, x, n_bits=4, compile=False)
        >>> t = prove_inference(qm, x[:5])
        >>> t.inputs.shape, [a.shape for a in t.accumulators], [a.shape for a in t.activations]
        ((5, 3), [(5, 4), (5, 2)], [(5, 4)])
    """
    program = _module_of(model, "prove_inference")
    inputs = model.quantize_input(x)
    value = inputs
    accumulators, activations = [], []
    for step in program.steps:
        value = np.asarray(step(value, NUMPY), dtype=np.int64)
        (accumulators if step.produces == "accumulator" else activations).append(value)
    return Transcript(inputs, tuple(accumulators), tuple(activations))


class _RejectedError(Exception):
    """Internal: a check failed (carries the layer and the reason)."""

    def __init__(self, layer: str | None, reason: str) -> None:
        super().__init__(reason)
        self.layer = layer
        self.reason = reason


def _claimed(value: Any, shape: tuple[int, ...], what: str, layer: str) -> np.ndarray:
    """A claimed array as int64 of the expected shape, or :class:`_RejectedError`."""
    try:
        array = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise _RejectedError(layer, f"The {what} is not an array ({exc}).") from None
    if array.dtype.kind not in "iu":
        raise _RejectedError(layer, f"The {what} must hold integers; got dtype {array.dtype}.")
    if array.shape != shape:
        raise _RejectedError(layer, f"The {what} must have shape {shape}; got {array.shape}.")
    if array.dtype == np.uint64 and array.size and array.max() > np.uint64(_INT64_MAX):
        raise _RejectedError(layer, f"The {what} holds values beyond int64.")
    return array.astype(np.int64, copy=False)


def _first_difference(claimed: np.ndarray, expected: np.ndarray, what: str) -> str:
    wrong = np.argwhere(claimed != expected)
    at = tuple(int(i) for i in wrong[0])
    return (
        f"{len(wrong)} of {claimed.size} {what} differ from the verifier's own; first at "
        f"index {at}: claimed {int(claimed[at])}, expected {int(expected[at])}."
    )


def _check_linear(
    step: LinearStep,
    x: np.ndarray,
    y: np.ndarray,
    p: int,
    rng: np.random.Generator,
    rounds: int,
    dtype: np.dtype,
) -> None:
    """Range check of the claimed accumulator, then Freivalds over the batch."""
    outside = (y < 0) | (y > step.acc_max)
    if outside.any():
        at = tuple(int(i) for i in np.argwhere(outside)[0])
        bound = int(np.broadcast_to(step.acc_max, y.shape)[at])
        raise _RejectedError(
            step.name,
            f"{int(outside.sum())} claimed accumulator values lie outside the proven range "
            f"[0, acc_max]; first at index {at}: {int(y[at])} (acc_max {bound}). Values are "
            "checked modulo p, so only in-range claims are unambiguous.",
        )
    # NOTE: acc = x @ W.T + offset  <=>  x @ W.T = acc - offset; rows are the batch (and
    # any leading axes), and the random vectors act on the output axis.
    n_out = step.weight.shape[0]
    X = _center(x.reshape(-1, x.shape[-1]), p)
    Wt = _center(np.asarray(step.weight).T, p)
    C = _center((y - step.offset).reshape(-1, n_out), p)
    if not _freivalds(X, Wt, C, _random_vectors(rng, p, n_out, rounds), p, dtype):
        raise _RejectedError(
            step.name,
            f"Freivalds check failed: X @ W.T + offset != claimed accumulator (mod {p}) "
            f"for some random vector of the {rounds} drawn.",
        )


def _check_table(step: TableStep, acc: np.ndarray, claimed: np.ndarray) -> np.ndarray:
    expected = np.asarray(step(acc, NUMPY), dtype=np.int64)
    if not np.array_equal(claimed, expected):
        raise _RejectedError(
            f"{step.name}/table", _first_difference(claimed, expected, "table outputs")
        )
    return expected


def _verify(
    model: Any,
    program: IntegerProgram,
    x: Any,
    transcript: Any,
    rounds: int,
    rng: np.random.Generator,
    p: int,
    dtype: np.dtype,
) -> str:
    """Every check in program order; returns the success message or raises _RejectedError."""
    expected_inputs = model.quantize_input(x)
    n = expected_inputs.shape[0]
    if not isinstance(transcript, Transcript):
        raise _RejectedError(None, f"Expected a Transcript; got {type(transcript).__name__}.")
    linears = [s for s in program.steps if s.produces == "accumulator"]
    tables = [s for s in program.steps if s.produces != "accumulator"]
    counts = (len(transcript.accumulators), len(transcript.activations))
    if counts != (len(linears), len(tables)):
        raise _RejectedError(
            None,
            f"The model has {len(linears)} linear layers and {len(tables)} tables; the "
            f"transcript has {counts[0]} accumulators and {counts[1]} activations.",
        )
    value = _claimed(transcript.inputs, expected_inputs.shape, "input codes", "input")
    if not np.array_equal(value, expected_inputs):
        raise _RejectedError("input", _first_difference(value, expected_inputs, "input codes"))
    accumulators, activations = iter(transcript.accumulators), iter(transcript.activations)
    for step in program.steps:
        if step.produces == "accumulator":
            shape = (n,) + tuple(np.shape(step.acc_max))[1:]
            y = _claimed(next(accumulators), shape, f"accumulator of {step.name!r}", step.name)
            _check_linear(step, value, y, p, rng, rounds, dtype)
            value = y
        else:
            layer = f"{step.name}/table"
            claimed = _claimed(next(activations), (n,) + step.out_shape, "table output", layer)
            value = _check_table(step, value, claimed)
    return (
        f"Verified {n} inputs: input codes, {len(linears)} linear layers (Freivalds over "
        f"Z_p, p={p}, {rounds} rounds, {_DTYPES[dtype]}) and {len(tables)} tables (direct "
        f"evaluation); a wrong transcript passes with probability <= p**-{rounds} = "
        f"{float(p) ** -rounds:.3g}."
    )


def verify_inference(
    model: Any,
    x: Any,
    transcript: Any,
    rounds: int = 2,
    rng: Any = None,
    *,
    p: int = DEFAULT_PRIME,
    dtype: Any = np.int64,
) -> VerificationResult:
    """The verifier: check a prover's :class:`Transcript` of ``model`` on ``x``.

    In program order: the input codes must equal ``model.quantize_input(x)``; each
    claimed accumulator must lie in its proven range ``[0, acc_max]`` and pass
    Freivalds' check ``X (W.T r) + offset . r == Y r (mod p)`` over the whole batch
    ``X (N, in)``; each table output must equal the table applied to the claimed
    accumulator. Before anything, :func:`check_field` proves ``p`` large enough.

    Soundness: all claimed and true accumulators lie in ``[0, acc_max]`` with
    ``acc_max < p/2``, so a claim congruent to the truth mod ``p`` is the truth. If the
    transcript is wrong, the first wrong linear layer's Freivalds check (its inputs are
    then right) is the only way to pass, so **a wrong transcript is accepted with
    probability at most** ``(1/p)**rounds`` (about ``9.1e-15`` for the default prime and
    2 rounds). Cost: ``O(N*in + in*out + N*out)`` per layer instead of
    ``O(N*in*out)``.

    Args:
        model: the compiled model (``QuantizedModule``) the prover ran.
        x: the float inputs ``(N, *input_shape)``.
        transcript: the prover's claim; anything malformed gives ``ok=False``.
        rounds: random vectors per layer.
        rng: ``None`` (fresh OS entropy; use it against a real adversary), an int seed or
            a ``numpy.random.Generator``.
        p: the prime of the field (odd, below ``2**31``; below ``2**24`` for float32).
        dtype: ``np.int64`` or ``np.float32`` field arithmetic (both exact).

    Returns:
        A :class:`VerificationResult` naming the first failing layer, if any.

    Raises:
        RangeError: ``p`` is too small for a layer of ``model`` (the layer is named).
        UnsupportedOpError: a layer is not a dense ``linear`` one (no Freivalds check).
        ParameterError: bad ``model``, ``p``, ``rounds``, ``rng`` or ``dtype``.
        InputError: ``x`` has the wrong shape or NaN/inf values.

    Examples:
        >>> import numpy as np, torch, dataclasses
        >>> from fhe_quant.torch import compile_torch_model
        >>> _ = torch.manual_seed(0)
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> x = np.random.default_rng(0).normal(size=(20, 3))
        >>> qm = compile_torch_model(net, x, n_bits=4, compile=False)
        >>> t = prove_inference(qm, x)
        >>> forged = t.output.copy()
        >>> forged[3, 1] -= 1
        >>> bad = dataclasses.replace(t, accumulators=(t.accumulators[0], forged))
        >>> r = verify_inference(qm, x, bad, rng=0)
        >>> r.ok, r.failed_layer
        (False, '_2')
    """
    dtype = _check_dtype(dtype, "verify_inference")
    p = _check_prime(p, dtype, "verify_inference")
    rounds = _check_rounds(rounds, "verify_inference")
    generator = _make_rng(rng, "verify_inference")
    program = _module_of(model, "verify_inference")
    for step in program.steps:
        if step.produces == "accumulator" and step.op != "linear":
            raise UnsupportedOpError(
                step.op, step.name, "verify_inference checks dense 'linear' layers only."
            )
    check_field(program, p)
    try:
        reason = _verify(model, program, x, transcript, rounds, generator, p, dtype)
    except _RejectedError as reject:
        return VerificationResult(False, reject.layer, reject.reason)
    return VerificationResult(True, None, reason)
