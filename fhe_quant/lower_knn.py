"""k-nearest-neighbours classification under encryption: the integer program of a
:class:`~fhe_quant.specs.KNNSpec` (read from scikit-learn's ``KNeighborsClassifier``,
uniform weights, euclidean metric, by :mod:`fhe_quant.frontends.sklearn.neighbors`).
Each stage below is one step of the program (:class:`KNNStep`, the one step protocol of
:mod:`fhe_quant.lower`): it runs, counts its lookups and reports its statistics row.

The client quantizes its sample on the grid the stored training points were quantized
on; the server holds the points in clear. What runs encrypted, per sample, with ``F``
features, ``N`` stored points, ``k`` neighbours and ``C`` classes:

1. **Squared distances, exact.** Every feature is clipped to its calibrated range and
   quantized with *one* step for all features (so distances between codes are
   proportional to euclidean distances between the clipped values). With ``p_i`` the
   stored codes::

       D_i = |q - p_i|^2 = (sum_f q_f^2 + |p_i|^2) - 2 q . p_i

   One table per feature, ``q_f^2`` (``F`` lookups of ``n_bits`` inputs), then two clear
   matrix products with non-negative weights, one clear constant and one encrypted
   subtraction: ``D_i``, exact, ``0 <= D_i <= Dmax_i`` proven, with every intermediate
   value non-negative (both terms are bounded by about ``1.25 sum_f c_f^2`` for central
   points, ``c_f`` the largest code of feature ``f``, against ``2 sum_f c_f^2`` for a
   form with a single matrix product: one bit narrower distances).
2. **Distance levels.** Only near neighbours matter, so ``D_i`` becomes a level
   ``min(floor(D_i / 2^t), 2^e - 1)`` (``e`` level bits; ``t`` is the shift whose levels
   best reproduce scikit-learn's predictions on the calibration data, computed in clear),
   packed with the label: ``v_i = level * 2^L + label_i`` (``L`` label bits). A table
   reading the wide ``D_i`` would cost seconds, so it is cut into narrow pieces:
   ``floor(D/2^t)`` and ``floor(D/2^(t+e))`` by exact rounding (one small bootstrap per
   dropped bit: ``t`` and ``t + e``), a table on the second (``[D >= 2^(t+e)]``, reading
   ``W - t - e`` bits) and, from their clear difference, the ``e`` level bits plus that
   flag, multiplied to the top of the ``W``-bit value and read by one per-point table of
   ``e + 1`` input bits (its low bits are zeros, so removing them by approximate
   rounding costs no bootstrap and cannot err: the value sits at the centre of its cell).
   When no point can be that far, the flag and its rounding are left out.
3. **Top-k.** A sorted list of ``k`` packed values; each point is inserted with
   compare-exchanges, one lookup each: ``r = relu(a - b)`` (a table on ``a - b + V``),
   ``min = a - r``, ``max = b + r``. The label travels with its distance, and equal
   levels are ordered by label (smaller first), deterministically.
4. **Votes.** For each of the ``k`` winners and each class, a 1-bit table
   ``[label == c]``; a final clear sum gives the votes per class (all weights are
   non-negative, so no intermediate value is ever negative). The client dequantizes
   them with scale ``1/k``: scikit-learn's uniform ``predict_proba``; the argmax (first
   maximum) is its ``predict``.

Exact lookup count per sample::

    F                                     squares (n_bits inputs)
    + N * (t + t + e)   [flag present]    exactly dropped bits (1-bit bootstraps)
    + N                 [flag present]    "far" flag (W - t - e bits)
    + N                                   levels (e + 1 bits, e without the flag)
    + sum_i min(i, k) = N*k - k(k+1)/2    compare-exchanges (e + L + 1 bits)
    + k * C                               votes (e + L + 1 bits)

(without the flag, the dropped bits are ``N * t``). The cost is dominated by the
``~N*k`` compare-exchanges (6-bit tables with 3 or 4 classes, 5-bit with 2) and by the
width ``W`` of the distances, which sets Concrete's parameters for the exact bit drops.
Measured (``benchmarks/knn.py``, 2 cores shared with other jobs, load ~11): iris, 105
stored points, ``k = 5``, 3 bits: 1159 PBS, 304 s per encrypted sample, 114 s key
generation, simulated accuracy 0.978 = float; wine, 124 points: 1997 PBS, 388 s per
sample, 0.907 vs 1.000 float (``n_bits=4``: 0.944, at a wider ``W``). Keep the stored
points to a few hundred at most; latency grows linearly with them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fhe_quant.lower import (
    NUMPY,
    Backend,
    LinearStep,
    StepBase,
    StepStatistics,
    add_counts,
    bits_for,
    run_steps,
    statistics_rows,
)
from fhe_quant.quant.quantizer import UniformQuantizer
from fhe_quant.specs import KNNSpec

__all__ = [
    "KNNProgram",
    "KNNStage",
    "KNNStep",
    "KNNLowered",
    "lower_knn",
    "DEFAULT_N_BITS",
    "DEFAULT_LEVEL_BITS",
]

#: Default input bits of the neighbours classifier (measured: 3 bits keep iris exact).
DEFAULT_N_BITS = 3
#: Default distance level bits ``e`` (compare tables read ``e + L + 1`` bits).
DEFAULT_LEVEL_BITS = 3


@dataclass(frozen=True)
class KNNStage:
    """One stage of the program, for statistics and reports: its lookups and widths."""

    name: str
    accumulator_bits: int
    lookups: int
    table_input_bits: int
    truncated_bits: int = 0
    table_output_bits: int = 0

    def statistics(self) -> StepStatistics:
        return StepStatistics(
            self.name,
            self.accumulator_bits,
            2**self.accumulator_bits - 1,
            self.truncated_bits,
            self.table_input_bits,
            self.table_output_bits,
            self.lookups,
        )

    def row(self) -> dict[str, Any]:
        return self.statistics().row()


@dataclass(frozen=True, eq=False)
class KNNStep(StepBase):
    """One stage of a :class:`KNNProgram` as a step of the one step protocol: it runs
    the stage (:meth:`KNNProgram.run_stage`), counts its lookups (width 1: the bits it
    drops exactly, per stored point) and reports its :class:`KNNStage` row. ``inputs``
    are the values it reads (0: the input codes, ``k + 1``: step ``k``'s output)."""

    stage: KNNStage
    program: KNNProgram
    inputs: tuple[int, ...]

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.stage.name

    @property
    def multi_operand(self) -> bool:  # type: ignore[override]
        return len(self.inputs) > 1

    def run(self, operands: Any, backend: Backend) -> Any:
        return self.program.run_stage(self.stage.name, operands, backend)

    def describe(self, names: Sequence[str]) -> str:
        """Its stage, operands, lookups and widths (:meth:`KNNProgram.source` spells out
        the arithmetic of every stage)."""
        stage = self.stage
        dropped = f", {stage.truncated_bits} bits dropped per point" if stage.truncated_bits else ""
        return (
            f"{stage.name}({', '.join(self.operand_names(names))})  # {stage.lookups} lookups "
            f"of {stage.table_input_bits} bits{dropped} -> uint{stage.table_output_bits}"
        )

    def lookups_by_width(self) -> dict[int, int]:
        counts = {self.stage.table_input_bits: self.stage.lookups}
        if self.stage.truncated_bits:
            add_counts(counts, {1: len(self.program.points) * self.stage.truncated_bits})
        return counts

    def statistics(self) -> StepStatistics:
        return self.stage.statistics()


def _relu_shifted(offset: int) -> Callable[[np.ndarray], np.ndarray]:
    # NOTE: not named "relu": Concrete converts a traced function by its name, and
    # would replace a function called "relu" with its own max(x, 0).
    def excess(x: np.ndarray) -> np.ndarray:
        return np.maximum(np.asarray(x, dtype=np.int64) - offset, 0)

    return excess


@dataclass(frozen=True, eq=False)
class KNNProgram:
    """The encrypted k-NN program (see the module docstring), with the duck-typed surface
    of :class:`fhe_quant.lower.IntegerProgram`.

    Attributes:
        input_quantizer: the client's quantizer (one step for every feature, zero 0).
        input_shape: ``(n_features,)``.
        points: stored codes ``(N, F)``, each in ``[0, code_max_f]``.
        labels: class index of each stored point ``(N,)``.
        n_classes: number of classes ``C >= 2``.
        k: neighbours.
        code_max: largest code of each feature ``(F,)`` (the client clips to it).
        level_bits: ``e``.
        shift: ``t``.
    """

    input_quantizer: UniformQuantizer
    input_shape: tuple[int, ...]
    points: np.ndarray
    labels: np.ndarray
    n_classes: int
    k: int
    code_max: np.ndarray
    level_bits: int
    shift: int

    def __post_init__(self) -> None:
        n, f = self.points.shape
        if self.input_shape != (f,):
            raise ValueError(f"input_shape {self.input_shape} does not match points {(n, f)}.")
        if self.n_classes < 2 or not 1 <= self.k <= n:
            raise ValueError(f"Need 2+ classes and 1 <= k <= {n}; got {self.n_classes}, {self.k}.")
        if np.any(self.points < 0) or np.any(self.points > self.code_max):
            raise ValueError("Stored codes must lie in [0, code_max] per feature.")
        if self.level_bits < 1 or self.shift < 0:
            raise ValueError(
                f"level_bits >= 1 and shift >= 0; got {self.level_bits}, {self.shift}."
            )

    # ------------------------------------------------------------------ constants
    @property
    def input_bits(self) -> int:
        return bits_for(self.input_quantizer.qmax)

    @property
    def label_bits(self) -> int:
        return bits_for(self.n_classes - 1)

    @functools.cached_property
    def _consts(self) -> dict[str, Any]:
        c = self.code_max.astype(np.int64)
        p = self.points.astype(np.int64)
        t, e = self.shift, self.level_bits
        weight = 2 * p  # (N, F), >= 0
        const = (p**2).sum(axis=1)  # (N,), >= 0
        a_max = int(max((c**2).sum() + const.max(), (weight * c[None, :]).sum(axis=1).max()))
        d_max = np.maximum(p, c[None, :] - p) ** 2
        d_max = d_max.sum(axis=1)
        has_far = bool(d_max.max() >= 2 ** (t + e))
        width = bits_for(max(a_max, int(d_max.max()) + 2 ** (t + e), 2 ** (t + e + 1) - 1))
        packed_max = (2**e - 1) * 2**self.label_bits + self.n_classes - 1
        return {
            "weight": weight,
            "const": const,
            "a_max": a_max,
            "d_max": d_max,
            "has_far": has_far,
            "width": width,
            "z_bits": e + 1 if has_far else e,
            "packed_max": packed_max,
            "value_bits": bits_for(2 * packed_max),
            "square_bits": bits_for(int((c**2).max())),
        }

    @property
    def width(self) -> int:
        """``W``: the width of the distances and of every value derived from them."""
        return int(self._consts["width"])

    @property
    def value_bits(self) -> int:
        """Width of the packed values and of the compare-exchange tables."""
        return int(self._consts["value_bits"])

    @property
    def n_compares(self) -> int:
        return sum(min(i, self.k) for i in range(len(self.points)))

    @functools.cached_property
    def output_step(self) -> LinearStep:
        """Votes per class from the ``k * C`` indicators; dequantized with scale ``1/k``."""
        k, c = self.k, self.n_classes
        weight = np.tile(np.eye(c, dtype=np.int64), (1, k))  # (C, k*C), torch layout
        return LinearStep(
            "votes",
            "linear",
            weight,
            np.zeros((1, c), dtype=np.int64),
            np.full((1, c), k, dtype=np.int64),
            np.full((1, c), 1.0 / k),
            np.zeros((1, c)),
            np.zeros((1, c)),
        )

    @functools.cached_property
    def steps(self) -> tuple[KNNStep | LinearStep, ...]:
        """The program's steps: squares, the far flags (when a point can be far), levels,
        top-k, label indicators (:class:`KNNStep`), then the votes (a
        :class:`~fhe_quant.lower.LinearStep`)."""
        n, f = self.points.shape
        t, e = self.shift, self.level_bits
        w, vb = self.width, self.value_bits
        has_far = self._consts["has_far"]
        squares = KNNStage(
            "squares", self.input_bits, f, self.input_bits, 0, self._consts["square_bits"]
        )
        steps: list[KNNStep | LinearStep] = [KNNStep(squares, self, (0,))]
        if has_far:
            steps.append(KNNStep(KNNStage("far", w, n, w - t - e, 2 * t + e, w), self, (0, 1)))
        levels = KNNStage("levels", w, n, self._consts["z_bits"], 0 if has_far else t, vb)
        steps.append(KNNStep(levels, self, (2,) if has_far else (0, 1)))
        top = len(steps) + 1
        steps.append(KNNStep(KNNStage("top-k", vb, self.n_compares, vb, 0, vb), self, (top - 1,)))
        labels = KNNStage("labels", vb, self.k * self.n_classes, vb, 0, 1)
        steps.append(KNNStep(labels, self, (top,)))
        steps.append(self.output_step)
        return tuple(steps)

    # ------------------------------------------------------------------ tables
    def _square(self, q: np.ndarray) -> np.ndarray:
        q = np.asarray(q, dtype=np.int64)
        return q**2

    def _far(self, r2: np.ndarray) -> np.ndarray:
        # r2 = (floor(D / 2^(t+e)) + 1) * 2^(t+e); far iff floor(...) >= 1.
        top = self.shift + self.level_bits
        far = (np.asarray(r2, dtype=np.int64) >> top) >= 2
        return far.astype(np.int64) << (self.width - 1)

    def _level(self, y: np.ndarray) -> np.ndarray:
        e = self.level_bits
        z = np.asarray(y, dtype=np.int64) >> (self.width - self._consts["z_bits"])
        level = np.where(z >= 2**e, 2**e - 1, z & (2**e - 1))
        return level * 2**self.label_bits + self.labels.astype(np.int64)

    def _vote(self, v: np.ndarray) -> np.ndarray:
        classes = np.tile(np.arange(self.n_classes), self.k)
        label = np.asarray(v, dtype=np.int64) & (2**self.label_bits - 1)
        return (label == classes).astype(np.int64)

    # ------------------------------------------------------------------ program
    def _distances(self, q: Any, sq: Any, backend: Backend) -> tuple[Any, Any]:
        """The exact squared distances ``D`` and ``floor(D / 2^t) * 2^t``."""
        consts = self._consts
        n, t, w = len(self.points), self.shift, self.width
        ones = np.ones((self.points.shape[1], n), dtype=np.int64)
        norms = backend.hint(sq @ ones + consts["const"], w)  # |q|^2 + |p_i|^2
        cross = backend.hint(q @ consts["weight"].T, w)  # 2 q . p_i
        dist = backend.hint(norms - cross, w)
        if t:
            r1 = backend.hint(backend.round(backend.hint(dist + 2 ** (t - 1), w), t, True), w)
            return dist, backend.hint(r1 - 2**t, w)  # floor(D / 2^t) * 2^t
        return dist, dist

    def _far_stage(self, operands: tuple[Any, Any], backend: Backend) -> Any:
        """The far flag on top of the level bits: ``y`` (``W`` bits)."""
        t, e, w = self.shift, self.level_bits, self.width
        dist, floor1 = self._distances(*operands, backend)
        r2 = backend.round(backend.hint(dist + 2 ** (t + e - 1), w), t + e, True)
        r2 = backend.hint(r2, w)
        far = backend.hint(backend.lookup(self._far, r2), w)
        low = backend.hint(floor1 + 2 ** (t + e) - r2, w)  # (D mod 2^(t+e)) rounded to 2^t
        return backend.hint(low * 2 ** (w - 1 - e - t) + far, w)

    def _levels_stage(self, operand: Any, backend: Backend) -> Any:
        """The packed ``level * 2^L + label`` of every stored point."""
        t, e, w = self.shift, self.level_bits, self.width
        if self._consts["has_far"]:
            y = operand
        else:
            y = backend.hint(self._distances(*operand, backend)[1] * 2 ** (w - e - t), w)
        lsbs = w - self._consts["z_bits"]
        if lsbs:
            # NOTE: y's low `lsbs` bits are zeros: approximate rounding reads the centre of
            # a cell, so it is exact and costs no bootstrap.
            y = backend.hint(backend.round(y, lsbs, False), w)
        return backend.hint(backend.lookup(self._level, y), self.value_bits)

    def _labels_stage(self, winners: Any, backend: Backend) -> Any:
        # NOTE: each winner copied once per class (a clear 0/1 matrix), then one lookup
        # per copy: [label == c].
        copies = np.kron(np.eye(self.k, dtype=np.int64), np.ones((1, self.n_classes), np.int64))
        spread = backend.hint(winners @ copies, self.value_bits)
        return backend.hint(backend.lookup(self._vote, spread), self.value_bits)

    def _top_k_stage(self, packed: Any, backend: Backend) -> Any:
        best = self.top_k(packed, backend)
        return np.concatenate(tuple(best), axis=1) if len(best) > 1 else best[0]

    def _squares_stage(self, q: Any, backend: Backend) -> Any:
        return backend.hint(backend.lookup(self._square, q), self._consts["square_bits"])

    #: The code of each stage (:meth:`run_stage`).
    STAGES: ClassVar[dict[str, Callable[[KNNProgram, Any, Backend], Any]]]

    def run_stage(self, name: str, operands: Any, backend: Backend) -> Any:
        """Run the stage ``name`` (squares, far, levels, top-k, labels) on its operands."""
        return self.STAGES[name](self, operands, backend)

    def values(self, q: Any, backend: Backend = NUMPY) -> list[Any]:
        """Every value the program computes: the input codes, then each step's output."""
        return run_steps(self.steps, [backend.hint(q, self.input_bits)], backend)

    def packed(self, q: Any, backend: Backend = NUMPY) -> Any:
        """Stages 1 and 2: the packed ``level * 2^L + label`` of every stored point."""
        values = [backend.hint(q, self.input_bits)]
        return run_steps(self.steps[: len(self.steps) - 3], values, backend)[-1]

    def top_k(self, packed: Any, backend: Backend = NUMPY) -> list[Any]:
        """Stage 3: the ``k`` smallest packed values, sorted, by insertion."""
        vb, offset = self.value_bits, int(self._consts["packed_max"])
        excess = _relu_shifted(offset)
        best: list[Any] = []
        for i in range(len(self.points)):
            current = packed[:, i : i + 1]
            for j, kept in enumerate(best):
                diff = backend.hint((kept + offset) - current, vb)
                r = backend.hint(backend.lookup(excess, diff), vb)
                best[j] = backend.hint(kept - r, vb)
                current = backend.hint(current + r, vb)
            if len(best) < self.k:
                best.append(current)
        return best

    def __call__(self, q: Any, backend: Backend = NUMPY) -> Any:
        return self.values(q, backend)[-1]

    # ------------------------------------------------------------------ reference
    def distances(self, q: np.ndarray) -> np.ndarray:
        """Exact squared code distances ``(B, N)``."""
        q = np.asarray(q, dtype=np.int64)
        return ((q[:, None, :] - self.points[None].astype(np.int64)) ** 2).sum(axis=2)

    def run_without_rounding(self, q: np.ndarray) -> np.ndarray:
        """The votes with exact distances instead of levels (ties by label): the effect
        of quantization alone."""
        dist = self.distances(q)
        packed = dist * 2**self.label_bits + self.labels[None].astype(np.int64)
        order = np.argsort(packed, axis=1, kind="stable")[:, : self.k]
        winners = self.labels[order]
        return np.stack([(winners == c).sum(axis=1) for c in range(self.n_classes)], axis=1)

    def lookups_by_width(self) -> dict[int, int]:
        """Table lookups per sample by input width (width 1: exactly dropped bits)."""
        counts: dict[int, int] = {}
        for step in self.steps:
            add_counts(counts, step.lookups_by_width())
        return counts

    def statistics(self) -> dict[str, Any]:
        """Its steps' rows (:func:`~fhe_quant.lower.statistics_rows`), input width,
        stored points, neighbours, level bits, shift and planned lookups by width."""
        return {
            "layers": statistics_rows(self.steps),
            "input_bits": self.input_bits,
            "stored_points": len(self.points),
            "n_neighbors": self.k,
            "level_bits": self.level_bits,
            "shift": self.shift,
            "planned_pbs_per_precision": self.lookups_by_width(),
        }

    def source(self) -> str:
        n, f = self.points.shape
        t, e, w, vb = self.shift, self.level_bits, self.width, self.value_bits
        far = self._consts["has_far"]
        lines = [
            f"def program(q):  # q: uint{self.input_bits}[{f}], codes clipped per feature",
            f"    sq = q^2  # {f} lookups",
            f"    D = (sq @ 1 + |p|^2) - q @ 2P[{f}x{n}]  # exact squared distances, {w} bits",
        ]
        if far:
            lines += [
                f"    F1 = floor(D / 2^{t}); F2 = floor(D / 2^{t + e})  # exact rounding, "
                f"{2 * t + e} one-bit bootstraps per point",
                f"    far = [F2 >= 1]  # {n} lookups of {w - t - e} bits",
                f"    level = far ? {2**e - 1} : F1 - {2**e} F2  # {n} lookups of {e + 1} bits",
            ]
        else:
            lines.append(f"    level = floor(D / 2^{t})  # < 2^{e}; {n} lookups of {e} bits")
        lines += [
            f"    v = level * {2**self.label_bits} + label  # packed, {vb} bits",
            f"    best = top_{self.k}(v)  # {self.n_compares} compare-exchanges: "
            f"r = relu(a - b), min = a - r, max = b + r",
            f"    ind = [label(best_j) == c]  # {self.k * self.n_classes} lookups",
            "    votes = sum_j ind  # per class",
            f"    return votes  # the client divides by {self.k}",
        ]
        return "\n".join(lines)


KNNProgram.STAGES = {
    "squares": KNNProgram._squares_stage,
    "far": KNNProgram._far_stage,
    "levels": KNNProgram._levels_stage,
    "top-k": KNNProgram._top_k_stage,
    "labels": KNNProgram._labels_stage,
}


def _level_votes(
    dist: np.ndarray, labels: np.ndarray, n_classes: int, k: int, level_bits: int, shift: int
) -> np.ndarray:
    """The program's votes in clear from exact squared distances ``(B, N)``."""
    level = np.minimum(dist >> shift, 2**level_bits - 1)
    label_bits = bits_for(n_classes - 1)
    packed = level * 2**label_bits + labels[None]
    winners = np.sort(packed, axis=1)[:, :k] & (2**label_bits - 1)
    return np.stack([(winners == c).sum(axis=1) for c in range(n_classes)], axis=1)


def _choose_shift(
    points: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    k: int,
    level_bits: int,
    q_calib: np.ndarray,
    target: np.ndarray,
) -> int:
    """The shift ``t`` whose levels best reproduce scikit-learn's predictions ``target``
    on the calibration codes ``q_calib`` (the smallest on ties).

    Small shifts resolve near neighbours finely but saturate early (every farther point
    ties at the top level); large ones see farther but merge near points."""
    q = q_calib[:1024].astype(np.int64)
    target = target[:1024]
    p = points.astype(np.int64)
    dist = ((q[:, None, :] - p[None]) ** 2).sum(axis=2)
    best, best_agree = 0, -1
    for shift in range(bits_for(int(dist.max())) + 1):
        votes = _level_votes(dist, labels, n_classes, k, level_bits, shift)
        agree = int(np.sum(np.argmax(votes, axis=1) == target))
        if agree > best_agree:
            best, best_agree = shift, agree
    return best


@dataclass(frozen=True, eq=False)
class KNNLowered:
    """A lowered k-NN classifier: its program and the client's clipping range
    (``x -> clip(x - low, 0, span)`` per feature, then the program's quantizer)."""

    program: KNNProgram
    low: np.ndarray
    span: np.ndarray


def lower_knn(spec: KNNSpec, n_bits: int, level_bits: int | None = None) -> KNNLowered:
    """Quantize the stored points of ``spec`` and build its :class:`KNNProgram`.

    Args:
        spec: the classifier as read from the model (points, labels, calibration data).
        n_bits: input bits (one step for every feature, fitted to the widest range).
        level_bits: distance level bits ``e`` (``None``: :data:`DEFAULT_LEVEL_BITS`).

    Examples:
        >>> spec = KNNSpec(np.array([[0.0], [1.0], [3.0]]), np.array([0, 0, 1]), 2, 1,
        ...                np.array([[0.5], [2.5]]), np.array([0, 1]))
        >>> lowered = lower_knn(spec, 2)
        >>> lowered.program.points.ravel().tolist(), lowered.program(np.array([[3]])).tolist()
        ([0, 1, 3], [[0, 1]])
    """
    level_bits = DEFAULT_LEVEL_BITS if level_bits is None else int(level_bits)
    stored, labels, k, n_classes = spec.points, spec.labels, spec.k, spec.n_classes
    both = np.concatenate([stored, spec.calibration])
    low, high = both.min(axis=0), both.max(axis=0)
    span = high - low
    qmax = 2**n_bits - 1
    widest = float(span.max())
    scale = widest / qmax if widest > 0 else 1.0
    quantizer = UniformQuantizer(bits=n_bits, scale=(scale,), zero_point=(0,))
    code_max = quantizer.quantize(span)
    points = quantizer.quantize(np.clip(stored - low, 0.0, span))
    calib_codes = quantizer.quantize(np.clip(spec.calibration - low, 0.0, span))
    shift = _choose_shift(points, labels, n_classes, k, level_bits, calib_codes, spec.target)
    program = KNNProgram(
        quantizer,
        (stored.shape[1],),
        points,
        labels,
        n_classes,
        k,
        code_max,
        level_bits,
        shift,
    )
    return KNNLowered(program, low, span)
