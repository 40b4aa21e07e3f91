"""Verifiable inference: exact field encoding, Freivalds soundness, transcript checks."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fhe_quant.errors import InputError, ParameterError, RangeError, UnsupportedOpError
from fhe_quant.lower import NUMPY, LinearStep, TableStep
from fhe_quant.torch import compile_torch_model
from fhe_quant.verify import (
    DEFAULT_PRIME,
    FLOAT32_EXACT_LIMIT,
    LayerFieldBounds,
    Transcript,
    VerificationResult,
    check_field,
    field_bounds,
    field_matmul,
    freivalds_check,
    from_field,
    is_prime,
    prove_inference,
    to_field,
    verify_inference,
)

#: The largest prime below 2**24, the float32 path's limit.
LARGEST_FLOAT32_PRIME = 16777213


def _sieve(limit: int) -> np.ndarray:
    """Primality of 0..limit-1 by Eratosthenes (independent of ``is_prime``)."""
    flags = np.ones(limit, dtype=bool)
    flags[:2] = False
    for i in range(2, math.isqrt(limit - 1) + 1):
        if flags[i]:
            flags[i * i :: i] = False
    return flags


def _exact_product(M: np.ndarray, V: np.ndarray, p: int) -> np.ndarray:
    """``M @ V`` mod p, centered, with Python integers (the reference of both paths)."""
    product = (M.astype(object) @ V.astype(object)) % p
    half = (p - 1) // 2
    return np.array([[int(v) - p if v > half else int(v) for v in row] for row in product])


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(40, 6))


@pytest.fixture(scope="module")
def small(data: np.ndarray):
    """The issue's model: Linear(6, 8) -> ReLU -> Linear(8, 3), 4 bits."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    return compile_torch_model(net, data, n_bits=4, compile=False)


@pytest.fixture(scope="module")
def deep(data: np.ndarray):
    """Three linear layers, two tables (one of them a Tanh), 4 bits."""
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.Tanh(), nn.Linear(5, 3))
    return compile_torch_model(net, data, n_bits=4, compile=False)


# --------------------------------------------------------------------------- the prime


def test_default_prime_is_slalom_prime_and_float32_safe() -> None:
    p = DEFAULT_PRIME
    assert p == 2**23 + 2**21 + 7 == 10485767
    assert is_prime(p)
    assert p + p // 2 < 2**24  # a canonical residue plus a centered one is float32-exact


def test_default_prime_is_not_the_largest_prime_with_that_property() -> None:
    # NOTE: the issue calls 2**23 + 2**21 + 7 "the largest prime with p + p/2 < 2**24";
    # Slalom's code only asserts the property. An exhaustive sieve shows the largest such
    # prime is 11184799; the default keeps Slalom's value, which is safe all the same.
    limit = 2**25 // 3 + 2  # p + p // 2 < 2**24  <=>  p <= 11184810
    flags = _sieve(limit)
    fits = [n for n in (11184810, 11184811) if n + n // 2 < 2**24]
    assert fits == [11184810]
    largest = int(np.flatnonzero(flags[: 11184810 + 1])[-1])
    assert largest == 11184799 and is_prime(largest)
    assert DEFAULT_PRIME < largest
    # and 2**24 - 3 is the largest prime the float32 path accepts
    assert int(np.flatnonzero(_sieve(FLOAT32_EXACT_LIMIT))[-1]) == LARGEST_FLOAT32_PRIME


def test_is_prime_matches_a_sieve_and_known_pseudoprimes() -> None:
    flags = _sieve(20_000)
    assert [is_prime(n) for n in range(20_000)] == flags.tolist()
    # strong pseudoprimes to small bases, Carmichael numbers, Mersenne primes
    for n in (2047, 1373653, 25326001, 3215031751, 561, 41041, 3825123056546413051):
        assert not is_prime(n)
    for n in (2**31 - 1, 2**61 - 1, 16777213):
        assert is_prime(n)
    with pytest.raises(ParameterError):
        is_prime(2.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------- field encoding


@pytest.mark.parametrize("p", [7, 101, DEFAULT_PRIME, 2**31 - 1])
def test_field_round_trip_is_exact_exactly_below_half_p(p: int) -> None:
    half = (p - 1) // 2
    inside = np.array([-half, -half + 1, -1, 0, 1, half - 1, half], dtype=np.int64)
    assert to_field(inside, p).min() >= 0 and to_field(inside, p).max() < p
    assert np.array_equal(from_field(to_field(inside, p), p), inside)
    outside = np.array([half + 1, -half - 1, p, -p, 3 * p + 2], dtype=np.int64)
    assert np.array_equal(from_field(to_field(outside, p), p), np.array([-half, half, 0, 0, 2]))


def test_field_encoding_takes_any_integer_dtype_and_refuses_floats() -> None:
    big = np.array([np.iinfo(np.uint64).max], dtype=np.uint64)
    assert to_field(big, 7).tolist() == [(2**64 - 1) % 7]
    assert to_field(np.array([-128], dtype=np.int8), 7).tolist() == [(-128) % 7]
    with pytest.raises(InputError, match="integers"):
        to_field(np.array([1.5]), 7)
    with pytest.raises(ParameterError, match="prime"):
        to_field([1], 9)


def test_field_bounds_are_proven_and_hold_on_extreme_inputs(deep) -> None:
    bounds = field_bounds(deep)
    linears = [s for s in deep.program.steps if isinstance(s, LinearStep)]
    assert [b.name for b in bounds] == [s.name for s in linears]
    qmax = deep.program.input_quantizer.qmax
    rng = np.random.default_rng(3)
    q = np.concatenate(
        [rng.integers(0, qmax + 1, (200, 6)), np.zeros((1, 6), np.int64), np.full((1, 6), qmax)]
    )
    value, layer = q, iter(bounds)
    for step in deep.program.steps:
        if isinstance(step, LinearStep):
            b = next(layer)
            matmul = value @ step.weight.T
            assert value.max() <= b.input_max
            assert b.matmul_min <= matmul.min() and matmul.max() <= b.matmul_max
            assert b.acc_max == int(step.acc_max.max())
            assert b.offset_max == int(np.abs(step.offset).max())
            assert b.magnitude <= (DEFAULT_PRIME - 1) // 2
        value = step(value, NUMPY)
    assert check_field(deep) == bounds


def test_a_prime_too_small_for_a_layer_is_refused_with_its_name(small, data) -> None:
    bounds = field_bounds(small)
    transcript = prove_inference(small, data)
    for layer in bounds:
        # the largest prime whose centered interval misses this layer's values
        p = max(n for n in range(3, 2 * layer.magnitude + 1) if is_prime(n))
        first = next(b for b in bounds if b.magnitude > (p - 1) // 2)
        with pytest.raises(RangeError, match=rf"Layer '{first.name}' .* p={p}"):
            check_field(small, p)
        with pytest.raises(RangeError, match=rf"Layer '{first.name}'"):
            verify_inference(small, data, transcript, p=p, rng=0)
    p = max(b.min_prime for b in bounds)
    assert check_field(small, p) == bounds
    assert verify_inference(small, data, transcript, p=p, rng=0).ok


def test_layer_field_bounds_validate_themselves() -> None:
    with pytest.raises(ValueError, match="matmul_min"):
        LayerFieldBounds("fc", 1, 1, 5, 4, 0, 1)
    with pytest.raises(ValueError, match="acc_max"):
        LayerFieldBounds("fc", 1, 1, 0, 4, 0, -1)
    assert LayerFieldBounds("fc", 15, 7, -20, 30, 20, 50).min_prime == 101


# ------------------------------------------------------------------ exact products mod p


@pytest.mark.parametrize("p", [7, 10007, DEFAULT_PRIME, LARGEST_FLOAT32_PRIME])
@pytest.mark.parametrize("shape", [(1, 1, 1), (5, 3, 2), (9, 300, 3), (4, 2500, 2)])
def test_float32_and_int64_products_are_exact_on_extreme_values(p, shape) -> None:
    n, m, t = shape
    half = (p - 1) // 2
    rng = np.random.default_rng(n * m * t + p)
    M = rng.integers(-half, half + 1, (n, m))
    V = rng.integers(-half, half + 1, (m, t))
    M[0] = half  # worst case: every product and sum at the extreme
    V[:, 0] = half
    if n > 1:
        M[1] = -half
    if t > 1:
        V[:, 1] = -half
    expected = _exact_product(M, V, p)
    assert np.array_equal(field_matmul(M, V, p), expected)
    assert np.array_equal(field_matmul(M, V, p, dtype=np.float32), expected)


def test_int64_path_chunks_instead_of_overflowing() -> None:
    p = 2**31 - 1  # products near 2**60: only 8 of them fit int64 at once
    half = (p - 1) // 2
    M = np.full((3, 40), half, dtype=np.int64)
    V = np.full((40, 2), -half, dtype=np.int64)
    M[1] = -half
    assert np.array_equal(field_matmul(M, V, p), _exact_product(M, V, p))


def test_products_accept_unreduced_and_unsigned_integers() -> None:
    rng = np.random.default_rng(5)
    M = rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, (6, 7))
    V = rng.integers(0, 2**64 - 1, (7, 2), dtype=np.uint64)
    expected = _exact_product(M, V, DEFAULT_PRIME)
    for dtype in (np.int64, np.float32):
        assert np.array_equal(field_matmul(M, V, dtype=dtype), expected)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    n=st.integers(1, 6),
    m=st.integers(1, 40),
    t=st.integers(1, 3),
    p=st.sampled_from([3, 5, 7, 8191, DEFAULT_PRIME, LARGEST_FLOAT32_PRIME]),
    bits=st.integers(0, 24),
    seed=st.integers(0, 2**32 - 1),
)
def test_float32_path_agrees_with_int64_path(n, m, t, p, bits, seed) -> None:
    rng = np.random.default_rng(seed)
    M = rng.integers(-(2**bits), 2**bits + 1, (n, m))
    V = rng.integers(0, p, (m, t))
    exact = field_matmul(M, V, p)
    assert np.array_equal(field_matmul(M, V, p, dtype=np.float32), exact)
    C = M @ V
    assert freivalds_check(M, V, C, p, rounds=2, rng=seed)
    assert freivalds_check(M, V, C, p, rounds=2, rng=seed, dtype=np.float32)
    C[rng.integers(n), rng.integers(t)] += 1
    same_r = [freivalds_check(M, V, C, p, 2, seed, dtype=d) for d in (np.int64, np.float32)]
    assert same_r[0] == same_r[1]


# ------------------------------------------------------------------------ Freivalds


def test_freivalds_accepts_correct_and_rejects_wrong_products() -> None:
    rng = np.random.default_rng(0)
    A, B = rng.integers(0, 64, (50, 40)), rng.integers(-31, 32, (40, 30))
    C = A @ B
    for dtype in (np.int64, np.float32):
        assert freivalds_check(A, B, C, rng=1, dtype=dtype)
        assert freivalds_check(A, B, C + DEFAULT_PRIME, rng=1, dtype=dtype)  # mod p!
    for i, j in [(0, 0), (49, 29), (17, 3)]:
        D = C.copy()
        D[i, j] -= 1
        assert not freivalds_check(A, B, D, rng=1)
        assert not freivalds_check(A, B, D, rng=1, dtype=np.float32)


@pytest.mark.parametrize(("p", "rounds"), [(5, 1), (7, 1), (3, 2), (5, 2)])
def test_false_accept_rate_matches_the_bound(p: int, rounds: int) -> None:
    """A single wrong entry passes a round exactly when r_j = 0: rate (1/p)**rounds."""
    trials = 3000
    base = np.random.default_rng(p * 10 + rounds)
    A, B = base.integers(-9, 10, (4, 5)), base.integers(-9, 10, (5, 3))
    accepted = dense_accepted = 0
    for seed in range(trials):
        C = A @ B
        C[seed % 4, seed % 3] += 1 + seed % (p - 1)  # a nonzero difference mod p
        accepted += freivalds_check(A, B, C, p, rounds, seed)
        E = A @ B + np.random.default_rng(seed).integers(0, p, (4, 3))
        if np.any(E % p != (A @ B) % p):  # a wrong product, dense difference
            dense_accepted += freivalds_check(A, B, E, p, rounds, seed + trials)
    bound = p**-rounds
    tolerance = 5 * math.sqrt(trials * bound * (1 - bound))
    assert abs(accepted - trials * bound) <= tolerance  # the bound is tight here
    assert dense_accepted <= trials * bound + tolerance  # and holds for any difference


def test_freivalds_refuses_bad_arguments() -> None:
    A = np.ones((2, 3), np.int64)
    B = np.ones((3, 4), np.int64)
    with pytest.raises(InputError, match="shapes"):
        freivalds_check(A, B, np.ones((2, 3), np.int64))
    with pytest.raises(InputError, match="integers"):
        freivalds_check(A.astype(float), B, A @ B)
    with pytest.raises(ParameterError, match="'p'"):
        freivalds_check(A, B, A @ B, p=2**24 + 43, dtype=np.float32)  # prime, too wide
    with pytest.raises(ParameterError, match="'p'"):
        freivalds_check(A, B, A @ B, p=15)
    with pytest.raises(ParameterError, match="'rounds'"):
        freivalds_check(A, B, A @ B, rounds=0)
    with pytest.raises(ParameterError, match="'dtype'"):
        freivalds_check(A, B, A @ B, dtype=np.float64)
    with pytest.raises(ParameterError, match="'rng'"):
        freivalds_check(A, B, A @ B, rng="seed")


# ------------------------------------------------------------------ prover and verifier


def _claims(model) -> list[tuple[str, int, str, np.ndarray]]:
    """Per step: its transcript field, index there, ``failed_layer`` name, proven maximum."""
    claims, counts = [], {"accumulators": 0, "activations": 0}
    for step in model.program.steps:
        if isinstance(step, LinearStep):
            claims.append(("accumulators", counts["accumulators"], step.name, step.acc_max))
            counts["accumulators"] += 1
        else:
            claims.append(
                ("activations", counts["activations"], f"{step.name}/table", step.out_max)
            )
            counts["activations"] += 1
    return claims


def _tamper(transcript: Transcript, kind: str, index: int, position, delta: int) -> Transcript:
    arrays = list(getattr(transcript, kind))
    changed = arrays[index].copy()
    changed[position] += delta
    arrays[index] = changed
    return dataclasses.replace(transcript, **{kind: tuple(arrays)})


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_a_correct_transcript_passes(small, deep, data, dtype) -> None:
    for model in (small, deep):
        transcript = prove_inference(model, data)
        assert np.array_equal(transcript.output, model.forward_integers(data))
        assert np.array_equal(transcript.inputs, model.quantize_input(data))
        result = verify_inference(model, data, transcript, rng=0, dtype=dtype)
        assert result == VerificationResult(True, None, result.reason)
        assert "p**-2" in result.reason


def test_transcript_shapes_are_batch_first(deep, data) -> None:
    transcript = prove_inference(deep, data[:7])
    steps = deep.program.steps
    assert transcript.inputs.shape == (7, 6)
    assert [a.shape for a in transcript.accumulators] == [
        (7,) + s.acc_max.shape[1:] for s in steps if isinstance(s, LinearStep)
    ]
    assert [a.shape for a in transcript.activations] == [
        (7,) + s.out_shape for s in steps if isinstance(s, TableStep)
    ]
    assert all(a.dtype == np.int64 for a in (transcript.inputs, *transcript.accumulators))


@pytest.mark.parametrize("dtype", [np.int64, np.float32])
def test_every_single_changed_entry_of_every_layer_is_caught(deep, data, dtype) -> None:
    transcript = prove_inference(deep, data)
    for kind, index, name, maximum in _claims(deep):
        array = getattr(transcript, kind)[index]
        for row, col in [(0, 0), (len(data) - 1, array.shape[1] - 1), (13, 1), (29, 2)]:
            # stay inside the proven range, so that only the arithmetic check can see it
            delta = 1 if array[row, col] < maximum[0, col] else -1
            forged = _tamper(transcript, kind, index, (row, col), delta)
            result = verify_inference(deep, data, forged, rng=1234, dtype=dtype)
            assert (result.ok, result.failed_layer) == (False, name), (kind, row, col)
            expected = "Freivalds" if kind == "accumulators" else "table outputs differ"
            assert expected in result.reason
    forged = dataclasses.replace(transcript, inputs=transcript.inputs.copy())
    forged.inputs[5, 2] ^= 1
    result = verify_inference(deep, data, forged, rng=1234, dtype=dtype)
    assert (result.ok, result.failed_layer) == (False, "input")


def test_claims_congruent_mod_p_are_caught_by_the_proven_range(small, data) -> None:
    """``acc + p`` passes Freivalds (it is the same field element): the range check is
    what makes the field encoding exact, and it names the layer."""
    transcript = prove_inference(small, data)
    name = small.program.steps[0].name
    forged = _tamper(transcript, "accumulators", 0, (3, 4), DEFAULT_PRIME)
    weight = small.program.steps[0].weight
    x, y = transcript.inputs, forged.accumulators[0] - small.program.steps[0].offset
    assert freivalds_check(x, weight.T, y, rng=0)  # fooled on its own
    result = verify_inference(small, data, forged, rng=0)
    assert (result.ok, result.failed_layer) == (False, name)
    assert "outside the proven range" in result.reason
    forged = _tamper(
        transcript, "accumulators", 0, (3, 4), -1 - int(transcript.accumulators[0][3, 4])
    )
    assert "outside the proven range" in verify_inference(small, data, forged, rng=0).reason


def test_a_wrong_table_output_with_a_consistent_next_layer_is_caught(small, data) -> None:
    """A prover that changes an activation and recomputes everything after it honestly
    is caught at the table, not later."""
    program = small.program
    transcript = prove_inference(small, data)
    activation = transcript.activations[0].copy()
    col = int(np.argmax(program.steps[1].out_max[0]))  # a unit that is not always 0
    activation[2, col] = (activation[2, col] + 1) % (program.steps[1].out_max[0, col] + 1)
    output = program.steps[2](activation, NUMPY)
    forged = dataclasses.replace(
        transcript, activations=(activation,), accumulators=(transcript.accumulators[0], output)
    )
    result = verify_inference(small, data, forged, rng=0)
    assert (result.ok, result.failed_layer) == (False, f"{program.steps[1].name}/table")


def test_malformed_transcripts_fail_without_exceptions(small, data) -> None:
    good = prove_inference(small, data)
    acc0, acc1 = good.accumulators
    first, table = small.program.steps[0].name, f"{small.program.steps[1].name}/table"
    cases = {
        "missing layer": (
            dataclasses.replace(good, accumulators=(acc0,)),
            None,
            "transcript has 1",
        ),
        "extra table": (
            dataclasses.replace(good, activations=(*good.activations, good.activations[0])),
            None,
            "2 activations",
        ),
        "wrong batch": (prove_inference(small, data[:5]), "input", "shape"),
        "wrong width": (
            dataclasses.replace(good, accumulators=(acc0[:, :-1], acc1)),
            first,
            "shape",
        ),
        "float dtype": (
            dataclasses.replace(good, accumulators=(acc0.astype(np.float64), acc1)),
            first,
            "integers",
        ),
        "bool dtype": (
            dataclasses.replace(good, activations=(good.activations[0] > 0,)),
            table,
            "integers",
        ),
        "ragged": (dataclasses.replace(good, activations=([[1, 2], [3]],)), table, "not an array"),
        "object": (dataclasses.replace(good, inputs=object()), "input", "integers"),
        "huge uint64": (
            dataclasses.replace(
                good, accumulators=(np.full(acc0.shape, 2**64 - 1, np.uint64), acc1)
            ),
            first,
            "beyond int64",
        ),
        "not a transcript": ({"inputs": good.inputs}, None, "Expected a Transcript"),
    }
    for label, (transcript, layer, words) in cases.items():
        result = verify_inference(small, data, transcript, rng=0)
        assert (result.ok, result.failed_layer) == (False, layer), label
        assert words in result.reason, (label, result.reason)


def test_transcripts_round_trip_through_npz_without_pickle(deep, data, tmp_path) -> None:
    transcript = prove_inference(deep, data)
    path = tmp_path / "transcript.npz"
    np.savez(path, **transcript.to_arrays())
    with np.load(path, allow_pickle=False) as stored:
        loaded = Transcript.from_arrays(stored)
    assert verify_inference(deep, data, loaded, rng=0).ok
    assert np.array_equal(loaded.output, transcript.output)
    with pytest.raises(InputError, match="numbered"):
        Transcript.from_arrays({"inputs": loaded.inputs, "accumulator_1": loaded.output})
    with pytest.raises(InputError, match="Unknown"):
        Transcript.from_arrays({"inputs": loaded.inputs, "weights": loaded.output})
    with pytest.raises(InputError, match="'inputs'"):
        Transcript.from_arrays({"accumulator_0": loaded.output})


def test_verifier_refuses_bad_parameters(small, data) -> None:
    transcript = prove_inference(small, data)
    with pytest.raises(ParameterError, match="'model'"):
        verify_inference(small.program, data, transcript)
    with pytest.raises(ParameterError, match="'model'"):
        prove_inference(object(), data)
    with pytest.raises(ParameterError, match="'p'"):
        verify_inference(small, data, transcript, p=DEFAULT_PRIME + 1)
    with pytest.raises(ParameterError, match="'rounds'"):
        verify_inference(small, data, transcript, rounds=True)
    with pytest.raises(InputError):
        verify_inference(small, data[:, :4], transcript)
    with pytest.raises(InputError, match="'accumulators'"):
        Transcript(transcript.inputs, transcript.output, ())  # an array, not a tuple
    with pytest.raises(ValueError, match="failed layer"):
        VerificationResult(True, "_0", "")


def test_verification_draws_fresh_randomness_by_default(small, data) -> None:
    transcript = prove_inference(small, data)
    assert verify_inference(small, data, transcript).ok
    assert verify_inference(small, data, transcript, rounds=1, rng=np.random.default_rng(9)).ok


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.inner(x))
        return self.head(torch.relu(h + x))


def test_branching_program_is_refused_by_name() -> None:
    torch.manual_seed(0)
    x = np.random.default_rng(0).normal(size=(30, 4))
    qm = compile_torch_model(_Residual(), x, n_bits=3, compile=False)
    assert not qm.program.is_chain
    for check in (
        lambda: field_bounds(qm),
        lambda: prove_inference(qm, x[:2]),
        lambda: verify_inference(qm, x[:2], None),  # refused before the transcript is read
    ):
        with pytest.raises(UnsupportedOpError, match="branches"):
            check()
