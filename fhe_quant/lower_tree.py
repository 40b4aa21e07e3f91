"""Tree models (decision trees, random forests, extra trees, gradient boosting, XGBoost,
LightGBM) as integer programs: the lowering of their tensor form
(:class:`~fhe_quant.specs.TreeEnsemble`, read from the fitted model by
:mod:`fhe_quant.frontends.sklearn.tree` or :mod:`~fhe_quant.frontends.sklearn.boosting`).

A fitted tree model becomes, first (in the frontend), a float *tensor form*
(:class:`~fhe_quant.specs.TreeEnsemble`):

* one **compare** per internal node of every tree: ``x[feature] <= threshold``;
* one **path row** per leaf: ``+1`` on each compare the leaf needs true (left branch),
  ``-1`` on each it needs false, so that ``bits @ path.T + n_negated`` counts the
  satisfied conditions, and the leaf is reached iff that count equals its depth;
* the **leaf values**, already scaled so that the model's raw output is their sum over
  the reached leaves plus a constant (``init``): class probabilities divided by the
  number of trees for decision trees, forests and extra trees, ``learning_rate`` times
  the tree outputs plus the initial prediction for gradient boosting.

:meth:`~fhe_quant.specs.TreeEnsemble.evaluate` runs that form in float;
:func:`~fhe_quant.frontends.sklearn.tree.check_ensemble` compares
it with scikit-learn's own ``predict_proba``/``decision_function``/``predict`` so that a
mistranslation cannot pass silently.

Then :func:`quantize_ensemble` turns it into an
:class:`~fhe_quant.lower.IntegerProgram` (a chain of the lowering's own steps, no PTQ):

1. The client encodes every feature on a **threshold grid**
   (:class:`~fhe_quant.quant.quantizer.ThresholdGrid`): its code is the number of the
   feature's split thresholds below the input (``np.searchsorted``; float32 inputs are
   compared as float32, as scikit-learn and XGBoost do), a monotone encoding computed in
   clear, so the server learns nothing it would not from any other encrypted input.
   Thresholds no float32 input falls between are one threshold.
2. A split ``x[f] <= t`` becomes ``code[f] <= K``, ``K`` the index of ``t`` on the
   grid: exact on every input, not only on grid points, whenever the feature has at
   most ``2**input_bits - 1`` distinct thresholds (measured: a 20-tree forest on
   breast_cancer needs 5 bits, a depth-5 tree on wine 2, 20-tree XGBoost on diabetes
   5). A feature with more keeps the thresholds whose loss changes the fewest
   decisions of the calibration samples reaching them (:func:`threshold_grid`), and a
   dropped threshold's compares snap to the neighbour that changes fewer. Compares
   that are constant on the grid, and compares already decided higher on the same
   path, keep only the side they take, without a lookup; compares with the same
   ``(f, K)`` are computed once for the whole ensemble. With ``narrow`` grids of fewer
   bits are tried too, and the cheapest whose decisions on the calibration data stay
   within :data:`NARROWING_BUDGET` is kept (a 20-tree forest on breast_cancer: 3 bits,
   every test prediction unchanged, half the complexity of 5); ``n_bits="auto"`` does
   the same with held-out data and compiled costs.
3. Each tree on the grid is cut into **groups**: subtrees whose ``k`` compares and
   ``d`` path conditions above them fit one table index
   ``2**k * (satisfied path conditions) + (the k compare bits)``, at most
   ``(d + 1) * 2**k - 1``. The group's table returns the integer value of the leaf
   those bits select when all ``d`` conditions hold, else 0; each tree reaches exactly
   one leaf, so the sum over groups is the sum of the reached leaves. A tree adding to
   several outputs (a forest's class probabilities) instead gets one 0/1 match table
   per leaf (``k = 0``), its values summed as clear weights. The program::

       acc = q @ G.T               # gather: G is 0/1, one row per distinct compare
       b   = table_compare[acc]    # 1 iff code <= K, input_bits-wide tables
       acc = b @ P.T + offset      # each group's table index, proven in range
       v   = table_leaves[acc]     # leaf value (or 0/1 match) per group
       acc = v @ S.T               # integer leaf values summed over every tree

   Concrete gives one lookup tensor a single width, so the group width is chosen for
   the whole model: the cheapest ``count x price`` from the deepest leaf's width up
   to :data:`GROUP_TABLE_BITS`, narrower than the compares (measured with 5-bit
   uniform grids: same-width leaf tables made the compares dearer), or with
   ``uniform`` the compares' own width, so that Concrete needs one parameter set and
   one set of keys (a 20-tree LightGBM on breast_cancer, 4-bit grid: complexity
   2.09e10 instead of 1.95e10, evaluation keys 0.16 GB instead of 0.37). Trees
   constant on the grid are constants of the dequantization.
4. Leaf values are quantized per output so that the proven range of the sum (the sum
   over trees of each tree's smallest to largest value) fits ``leaf_bits``
   (:func:`default_leaf_bits`: 8 for a tree, 11 for 20 trees): no table reads the
   sum, but its width still sizes Concrete's parameters.
   Each tree's values are shifted by its minimum, so every encrypted value is
   non-negative. The client dequantizes the sum (``scale * (acc - zero) + bias``)
   into the raw output and applies the output function (probabilities, sigmoid or
   softmax of a boosted model's scores).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from functools import cached_property
from numbers import Integral
from typing import Any

import numpy as np

from fhe_quant.errors import InputError, ParameterError
from fhe_quant.ir import Node, linear_bounds
from fhe_quant.lower import IntegerProgram, LinearStep, TableRead, TableStep, bits_for
from fhe_quant.quant.quantizer import MAX_BITS, ThresholdGrid
from fhe_quant.specs import TreeEnsemble

__all__ = [
    "LEAF_BITS",
    "MAX_LEAF_BITS",
    "NARROWING_BUDGET",
    "GROUP_TABLE_BITS",
    "TreeQuantConfig",
    "default_leaf_bits",
    "TreeQuantized",
    "quantize_ensemble",
    "threshold_grid",
]

#: Default bits of the encrypted sum of leaf values of one tree, per output; an ensemble
#: of ``T`` trees gets ``ceil(log2(T) / 2)`` more (each tree's rounding adds up like
#: noise, ``sqrt(T)`` steps: 11 bits for 20 trees; measured: 8 bits cost a 20-tree
#: LightGBM classifier one test sample of 171, and 12 bits left its complexity and keys
#: as they were). No table reads the sum, but its width still sizes Concrete's
#: parameters (a depth-5 tree: +25% complexity from 2 to 8 bits; a 17-bit sum found no
#: parameters at all).
LEAF_BITS = 8
#: Widest table of a group of leaves, and always narrower than the compare tables:
#: measured on concrete-python 2.11, leaf tables as wide as the 5-bit compares made
#: the compares dearer too (a depth-5 tree: 17 lookups cost 1.4x more than 20 with
#: 4-bit leaf tables).
GROUP_TABLE_BITS = 4
#: Largest loss of agreement with the float model on the calibration data (labels for
#: classifiers, ``1 - mse / variance`` of the raw outputs otherwise) that a narrower grid
#: may cost against the widest one: half a point, issue 14's accuracy budget.
NARROWING_BUDGET = 0.005
#: Widest leaf values accepted.
MAX_LEAF_BITS = 16

_ROLES = ("inputs", "outputs")


@dataclass(frozen=True)
class TreeQuantConfig:
    """How a tree model is quantized.

    Attributes:
        input_bits: bits of the per-feature input grid, 1 to 8; also the input width of
            every compare table (5 or fewer keeps lookups cheap).
        leaf_bits: bits of the encrypted sum of leaf values (per output), 2 to 16;
            the leaf values are quantized to fit it. ``None``: :data:`LEAF_BITS` plus
            ``ceil(log2(trees) / 2)`` (see :func:`default_leaf_bits`).
        group_bits: widest table of a group of leaves, 1 to 8; ``None``: narrower than
            the compare tables, at most :data:`GROUP_TABLE_BITS` (never narrower than
            the deepest leaf needs). The groups are the cheapest up to that width.
        narrow: also try grids of fewer bits than the thresholds need (some merged,
            :func:`threshold_grid`) and keep the cheapest whose decisions on the
            calibration data stay within :data:`NARROWING_BUDGET` of the exact grid's
            (:func:`quantize_ensemble`). Off by default: the calibration data do not
            show every decision a merge changes (a 20-tree XGBoost on wine kept every
            training label at 3 bits and lost 2 of 54 test samples); ``False``: the
            grid keeps every threshold it can within ``input_bits``.
        uniform: one width for every table, the compares' and the groups' (the
            wider of the two): Concrete then needs one parameter set, so one
            bootstrap and one keyswitch key, where two widths need two of each and
            the keys between them. ``narrow`` tries both.

    Examples:
        >>> TreeQuantConfig.from_n_bits(5)
        TreeQuantConfig(input_bits=5, leaf_bits=None, group_bits=None, narrow=False, \
uniform=False)
        >>> TreeQuantConfig.from_n_bits({"inputs": 4, "outputs": 12}).leaf_bits
        12
        >>> TreeQuantConfig.from_n_bits({"weights": 4})
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: The 'n_bits' parameter of a tree model has an \
unknown key 'weights'; valid keys are 'inputs' (the feature grid) and 'outputs' (the \
leaf values): trees have no weights or activations.
    """

    input_bits: int
    leaf_bits: int | None = None
    group_bits: int | None = None
    narrow: bool = False
    uniform: bool = False

    def __post_init__(self) -> None:
        checks = [("input_bits", 1, MAX_BITS)]
        if self.leaf_bits is not None:
            checks.append(("leaf_bits", 2, MAX_LEAF_BITS))
        if self.group_bits is not None:
            checks.append(("group_bits", 1, MAX_BITS))
        for name in ("narrow", "uniform"):
            if not isinstance(getattr(self, name), bool | np.bool_):
                raise ParameterError(
                    f"The {name!r} parameter of TreeQuantConfig must be a bool. Got "
                    f"{getattr(self, name)!r} instead."
                )
        for name, low, high in checks:
            value = getattr(self, name)
            if (
                isinstance(value, bool | np.bool_)
                or not isinstance(value, Integral)
                or not low <= int(value) <= high
            ):
                raise ParameterError(
                    f"The {name!r} parameter of TreeQuantConfig must be an int in "
                    f"[{low}, {high}]. Got {value!r} instead."
                )
            object.__setattr__(self, name, int(value))

    @classmethod
    def from_n_bits(cls, n_bits: Any) -> TreeQuantConfig:
        """The config of an estimator's ``n_bits``: an int sets the input grid (leaf
        values get :func:`default_leaf_bits`); a dict may set ``inputs`` and ``outputs``.

        Raises:
            ParameterError: a wrong type, an unknown key or a value out of range.
        """
        if isinstance(n_bits, Mapping):
            bad = [key for key in n_bits if key not in _ROLES]
            if bad:
                raise ParameterError(
                    f"The 'n_bits' parameter of a tree model has an unknown key {bad[0]!r}; "
                    "valid keys are 'inputs' (the feature grid) and 'outputs' (the leaf "
                    "values): trees have no weights or activations."
                )
            return cls(n_bits.get("inputs", 6), n_bits.get("outputs"))
        return cls(n_bits)


def default_leaf_bits(n_trees: int) -> int:
    """Bits of the leaf-value sum of ``n_trees`` trees when the config leaves it open.

    Examples:
        >>> default_leaf_bits(1), default_leaf_bits(4), default_leaf_bits(20)
        (8, 9, 11)
    """
    return min(MAX_LEAF_BITS, LEAF_BITS + math.ceil(math.log2(max(n_trees, 1)) / 2))


# --------------------------------------------------------------------------- quantization


@dataclass(frozen=True, eq=False)
class TreeQuantized:
    """What the client runs around a tree program: ``pre`` (the per-feature shift
    before quantization), ``post`` (nothing: the output function is applied by the
    estimator), the config and calibrated range, and ``leaf_codes``: the integer value
    ``(L, O)`` each leaf of the ensemble adds to the encrypted sum when reached (0 for
    the leaves of trees constant on the grid, which are in the bias). Same surface as a
    :class:`~fhe_quant.quant.ptq.QuantizedGraph` for the deployment code."""

    pre: tuple[Node, ...]
    post: tuple[Node, ...]
    config: TreeQuantConfig
    low: np.ndarray
    high: np.ndarray
    leaf_codes: np.ndarray | None = None


def _model_inputs(ensemble: TreeEnsemble, x: np.ndarray) -> np.ndarray:
    """``x`` as the model compares it: float32 values (as float64), or float64."""
    x = np.asarray(x, dtype=np.float64)
    if not ensemble.float32_inputs:
        return x
    with np.errstate(over="ignore"):
        return x.astype(np.float32).astype(np.float64)


def _canonical_thresholds(ensemble: TreeEnsemble) -> np.ndarray:
    """Each compare's threshold as the largest input value it sends left: for float32
    inputs the largest float32 ``<= t``, so that thresholds no input can tell apart are
    one threshold (and one code) of the grid."""
    t = ensemble.threshold
    if not ensemble.float32_inputs:
        return t.copy()
    t32 = t.astype(np.float32)
    below = np.where(t32.astype(np.float64) > t, np.nextafter(t32, np.float32(-np.inf)), t32)
    return below.astype(np.float64)


def _reach(ensemble: TreeEnsemble, x: np.ndarray) -> np.ndarray:
    """``(N, C)`` bool: which samples of ``x`` (as the model reads them) reach each compare."""
    bits = (x[:, ensemble.feature] <= ensemble.threshold).astype(np.float64)
    satisfied = bits @ ensemble.path.T.astype(np.float64) + ensemble.n_negated
    reached = (satisfied == ensemble.depth).astype(np.float64)
    return (reached @ (ensemble.path != 0).astype(np.float64)) > 0


def _flips(samples: np.ndarray, t: float, low: float, high: float) -> tuple[int, int]:
    """Decisions ``x <= t`` changed by comparing with ``low < t`` instead (the samples in
    ``(low, t]``) and with ``high > t`` instead (those in ``(t, high]``); ``samples``
    sorted."""
    at = np.searchsorted(samples, t, side="right")
    left = at - np.searchsorted(samples, low, side="right")
    right = np.searchsorted(samples, high, side="right") - at
    return int(left), int(right)


def _merge_thresholds(values: np.ndarray, samples: list[np.ndarray], limit: int) -> np.ndarray:
    """The ``limit`` thresholds of ``values`` (sorted, distinct) to keep on the grid.

    A dropped threshold's compares snap to the nearer kept one on either side (or become
    constant past the ends), whichever changes fewer decisions of the samples reaching
    them (``samples[i]``, sorted). Thresholds are dropped one at a time, each time the one
    whose removal changes the fewest decisions (greedy merging of neighbours).
    """
    m = len(values)
    edge = np.concatenate([[-np.inf], values, [np.inf]])  # edge[i + 1] = values[i]

    def cost(i: int, a: int, b: int) -> int:  # threshold i between kept a < i < b
        return min(_flips(samples[i], values[i], edge[a + 1], edge[b + 1]))

    def delta(kept: list[int], p: int) -> int:
        a = kept[p - 1] if p > 0 else -1
        b = kept[p + 1] if p + 1 < len(kept) else m
        j = kept[p]
        before = sum(cost(i, a, j) for i in range(a + 1, j))
        before += sum(cost(i, j, b) for i in range(j + 1, b))
        return sum(cost(i, a, b) for i in range(a + 1, b)) - before

    kept = list(range(m))
    deltas = [delta(kept, p) for p in range(m)]
    while len(kept) > limit:
        p = int(np.argmin(deltas))
        del kept[p], deltas[p]
        for q in (p - 1, p):
            if 0 <= q < len(kept):
                deltas[q] = delta(kept, q)
    return values[kept]


def threshold_grid(
    ensemble: TreeEnsemble, x: np.ndarray, bits: int
) -> tuple[ThresholdGrid, np.ndarray]:
    """The client's per-feature threshold grid and each compare's ``K`` on it.

    Every feature with at most ``2**bits - 1`` distinct thresholds keeps them all, so its
    compares are exact on every input; a feature with more keeps the ones
    :func:`_merge_thresholds` picks, weighting each decision by the samples of ``x`` that
    reach it. The grid's width is the fewest bits that hold the largest count.

    Returns:
        The grid, and per compare ``K`` such that the compare is ``code <= K`` (``-1``:
        always false; the feature's threshold count: always true).
    """
    canonical = _canonical_thresholds(ensemble)
    inputs = _model_inputs(ensemble, x)
    limit = 2**bits - 1
    distinct = [np.unique(canonical[ensemble.feature == f]) for f in range(ensemble.n_features)]
    reach = None
    if any(len(d) > limit for d in distinct):
        reach = _reach(ensemble, inputs)
        for f, values in enumerate(distinct):
            if len(values) > limit:
                at = [np.nonzero((ensemble.feature == f) & (canonical == v))[0] for v in values]
                samples = [np.sort(inputs[reach[:, c].any(axis=1), f]) for c in at]
                distinct[f] = _merge_thresholds(values, samples, limit)
    counts = np.array([len(d) for d in distinct], dtype=np.int64)
    grid = ThresholdGrid(
        bits_for(int(counts.max())),
        np.concatenate([np.zeros(0), *distinct]),
        counts,
        ensemble.float32_inputs,
    )
    k = np.empty(len(canonical), dtype=np.int64)
    for c, (f, t) in enumerate(zip(ensemble.feature, canonical, strict=True)):
        kept = distinct[f]
        j = int(np.searchsorted(kept, t, side="left"))
        if j < len(kept) and kept[j] == t:
            k[c] = j
            continue
        assert reach is not None  # only merged features lose thresholds
        low = kept[j - 1] if j > 0 else -np.inf
        high = kept[j] if j < len(kept) else np.inf
        left, right = _flips(np.sort(inputs[reach[:, c], f]), t, low, high)
        k[c] = j - 1 if left <= right else j
    return grid, k


def quantize_ensemble(
    ensemble: TreeEnsemble, x: np.ndarray, config: TreeQuantConfig
) -> tuple[IntegerProgram, TreeQuantized]:
    """The integer program of a tree ensemble, with its input grid calibrated on ``x``.

    Args:
        ensemble: the tensor form.
        x: calibration data ``(N, n_features)``: each feature's grid spans its range.
        config: input grid and leaf value bits.

    Returns:
        The program and the client-side processing (:class:`TreeQuantized`).

    Examples:
        >>> from sklearn.tree import DecisionTreeRegressor
        >>> from fhe_quant.frontends.sklearn.tree import ensemble_from_sklearn
        >>> x = np.arange(8.0).reshape(-1, 1)
        >>> tree = DecisionTreeRegressor(max_depth=2).fit(x, x[:, 0] ** 2)
        >>> program, _ = quantize_ensemble(ensemble_from_sklearn(tree), x, TreeQuantConfig(3))
        >>> program.input_quantizer.counts.tolist()  # 3 thresholds: codes 0..3, 2 bits
        [3]
        >>> program.lookups_by_width()  # 3 compares, 2 pairs of leaves
        {2: 5}
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != ensemble.n_features or len(x) == 0:
        raise InputError(
            f"The calibration data must have shape (n_samples, {ensemble.n_features}). "
            f"Got {x.shape} instead."
        )
    if not config.narrow:
        return _build_program(ensemble, x, config)
    return _narrowest(ensemble, x, config)


def _agreement(ensemble: TreeEnsemble, program: IntegerProgram, x: np.ndarray) -> float:
    """How closely ``program`` follows the float model on ``x``: the fraction of equal
    labels (classifiers), or ``1 - mse / variance`` of the raw outputs."""
    raw = program.output_step.dequantize(program(program.input_quantizer.quantize(x)))
    reference = ensemble.evaluate(x)
    if ensemble.output in ("identity", "exp"):
        variance = float(np.var(reference)) or 1.0
        return 1.0 - float(np.mean((raw - reference) ** 2)) / variance
    if raw.shape[1] == 1:
        return float(np.mean((raw[:, 0] > 0) == (reference[:, 0] > 0)))
    return float(np.mean(raw.argmax(axis=1) == reference.argmax(axis=1)))


def _price(program: IntegerProgram) -> float:
    """Relative cost of a tree program: its lookups priced by width (:data:`_LOOKUP_COST`)."""
    return sum(n * _LOOKUP_COST[min(w, MAX_BITS)] for w, n in program.lookups_by_width().items())


def _narrowest(
    ensemble: TreeEnsemble, x: np.ndarray, config: TreeQuantConfig
) -> tuple[IntegerProgram, TreeQuantized]:
    """The cheapest program (by :func:`_price`) over grids of 2 bits up to the exact one,
    each with tables of two widths or one (``uniform``), whose agreement with the float
    model on ``x`` stays within :data:`NARROWING_BUDGET` of the exact grid's (a narrower
    grid merges more thresholds, so the search stops at the first failure)."""
    best = _build_program(ensemble, x, replace(config, uniform=False))
    reference = _agreement(ensemble, best[0], x)
    for bits in range(best[0].input_bits, 1, -1):
        candidates = [replace(config, input_bits=bits, uniform=u) for u in (False, True)]
        programs = [
            _build_program(ensemble, x, c) for c in candidates[bits == best[0].input_bits :]
        ]
        if _agreement(ensemble, programs[0][0], x) < reference - NARROWING_BUDGET:
            break
        for candidate in programs:
            if _price(candidate[0]) < _price(best[0]):
                best = candidate
    return best


@dataclass(frozen=True, eq=False)
class _QNode:
    """A node of a tree on the grid: a split on quantized compare ``compare`` (left when
    true), or a leaf (``leaf``: its index in the ensemble)."""

    compare: int = -1
    left: _QNode | None = None
    right: _QNode | None = None
    leaf: int = -1

    @cached_property
    def compares(self) -> frozenset[int]:
        if self.left is None or self.right is None:
            return frozenset()
        return frozenset({self.compare}) | self.left.compares | self.right.compares

    def walk(self, bits: Mapping[int, int]) -> int:
        node = self
        while node.left is not None and node.right is not None:
            node = node.left if bits[node.compare] else node.right
        return node.leaf


def _grid_tree(
    path: np.ndarray,
    leaves: list[int],
    kept: np.ndarray,
    compare_of: np.ndarray,
    decided: frozenset[int] = frozenset(),
    prefix: Mapping[int, bool] | None = None,
) -> _QNode:
    """The tree of ``leaves`` (one subtree of one tree; ``path``, ``kept`` and
    ``compare_of`` restricted to that tree's compares) on the grid: constant compares
    keep only the side they always take, and a quantized compare already decided on
    the path (two float splits landing on one grid compare) keeps the side it took, so
    that every path tests distinct compares and every leaf is reachable."""
    prefix = prefix or {}
    if len(leaves) == 1:
        return _QNode(leaf=leaves[0])
    rows = path[leaves]
    # NOTE: compares are numbered in preorder, so the subtree's root is the smallest
    # compare of its leaves not decided yet.
    root = int(min(c for c in np.nonzero(np.any(rows != 0, axis=0))[0] if c not in decided))
    left = [leaf for leaf, row in zip(leaves, rows, strict=True) if row[root] > 0]
    right = [leaf for leaf, row in zip(leaves, rows, strict=True) if row[root] < 0]
    decided = decided | {root}
    q = int(compare_of[root])
    if q < 0 or q in prefix:
        goes_left = bool(kept[root]) if q < 0 else prefix[q]
        return _grid_tree(path, left if goes_left else right, kept, compare_of, decided, prefix)
    return _QNode(
        q,
        _grid_tree(path, left, kept, compare_of, decided, {**prefix, q: True}),
        _grid_tree(path, right, kept, compare_of, decided, {**prefix, q: False}),
    )


@dataclass(frozen=True, eq=False)
class _Group:
    """The leaves under ``node`` of one grid tree, behind the conditions ``prefix``."""

    tree: int
    prefix: Mapping[int, bool]
    node: _QNode

    @cached_property
    def compares(self) -> list[int]:
        return sorted(self.node.compares)

    def index_max(self) -> int:
        """Largest table index: ``len(prefix) * 2**k + 2**k - 1``."""
        return (len(self.prefix) + 1) * 2 ** len(self.compares) - 1

    def leaves(self) -> list[int]:
        """The leaf of every assignment of the group's compares (bit j: compare j)."""
        compares = self.compares
        return [
            self.node.walk({c: (code >> j) & 1 for j, c in enumerate(compares)})
            for code in range(2 ** len(compares))
        ]


#: Relative cost of one lookup by table input width (Concrete's complexity estimate of
#: tree circuits, concrete-python 2.11: about 0.95, 1.1, 1.6 and 2.2-3.2 x 1e8 at 2 to 5
#: bits; wider ones scaled like the measured latencies, 45 ms at 6 bits vs ~10 at 5).
_LOOKUP_COST = {1: 0.95, 2: 0.95, 3: 1.1, 4: 1.6, 5: 2.5, 6: 11.0, 7: 27.0, 8: 83.0}


def _groups(
    tree: int, node: _QNode, prefix: Mapping[int, bool], max_index: int, whole: bool
) -> list[_Group]:
    """Split a grid tree into groups of leaves, one lookup each (per output): the
    largest subtrees whose table index fits in ``max_index`` (``whole``), or else
    (several outputs) single leaves."""
    group = _Group(tree, prefix, node)
    if node.left is None or node.right is None or (whole and group.index_max() <= max_index):
        return [group]
    return _groups(tree, node.left, {**prefix, node.compare: True}, max_index, whole) + _groups(
        tree, node.right, {**prefix, node.compare: False}, max_index, whole
    )


def _all_groups(
    trees: list[tuple[int, _QNode, bool]], widest: int, fixed: bool = False
) -> list[_Group]:
    """The groups of every tree at the table width of least total cost.

    ``trees`` holds ``(tree, root, whole)``: a tree adding to one output only can be
    grouped (``whole``); the others get one match table per leaf. Concrete gives all
    the elements of one lookup tensor the same width, so every group table costs the
    widest one's price: each width from the deepest leaf's up to ``widest`` is tried,
    with the largest groups that fit it, and the cheapest count times price wins.
    """
    leaves_only = [g for t, root, _ in trees for g in _groups(t, root, {}, 0, False)]
    narrowest = bits_for(max(g.index_max() for g in leaves_only))
    if fixed:  # one width for every table: the largest groups that fit it
        width = max(widest, narrowest)
        return [g for t, root, whole in trees for g in _groups(t, root, {}, 2**width - 1, whole)]
    best, best_cost = leaves_only, len(leaves_only) * _LOOKUP_COST[narrowest]
    for width in range(narrowest, max(widest, narrowest) + 1):
        groups = [g for t, root, whole in trees for g in _groups(t, root, {}, 2**width - 1, whole)]
        cost = len(groups) * _LOOKUP_COST[width]
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def _quantize_leaves(
    ensemble: TreeEnsemble, per_tree: list[list[int]], bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Integer leaf values ``(L, O)``, each tree's shifted to a minimum of 0, their
    per-output scale, and the proven range ``[lo, hi]`` of their unshifted sum.

    Each tree reaches exactly one of its leaves (``per_tree``: the reachable ones of
    the trees that are not constant), so the sum lies between the sums over trees of
    their smallest and largest values; the scale is the smallest that keeps that range
    within ``bits`` bits: the width of the output sum, which Concrete's parameters
    depend on even though no table reads it. Shifting each tree by its minimum (the sum
    of the minima, ``lo``, is a constant of the dequantization) makes every encrypted
    value non-negative, so Concrete types it unsigned.
    """
    values = ensemble.values
    low = np.sum([values[g].min(axis=0) for g in per_tree], axis=0)
    high = np.sum([values[g].max(axis=0) for g in per_tree], axis=0)
    limit = 2**bits - 1
    scale = np.where(high > low, (high - low) / limit, 1.0)
    while True:
        codes = np.rint(values / scale)
        lo = np.sum([codes[g].min(axis=0) for g in per_tree], axis=0).astype(np.int64)
        hi = np.sum([codes[g].max(axis=0) for g in per_tree], axis=0).astype(np.int64)
        too_wide = hi - lo > limit
        if not too_wide.any():
            break
        # NOTE: rounding each tree's values can widen the range by up to one step per
        # tree; a slightly coarser scale brings it back.
        scale = np.where(too_wide, scale * (1 + 1 / limit), scale)
    shifted = np.zeros(values.shape, dtype=np.int64)
    for g in per_tree:
        shifted[g] = codes[g] - codes[g].min(axis=0)
    return shifted, scale, lo, hi


def _distinct_compares(
    ensemble: TreeEnsemble, grid: ThresholdGrid, k: np.ndarray
) -> tuple[list[tuple[int, int]], np.ndarray, np.ndarray]:
    """The distinct ``(feature, K)`` compares that vary on the grid, each compare's index
    among them (-1: constant), and each constant compare's value."""
    top = grid.counts[ensemble.feature]
    # Constant compares: K = -1 is always false, K = the feature's count always true.
    kept = (k >= top).astype(np.int64)
    varying = (k >= 0) & (k < top)
    pairs = sorted(
        {(int(f), int(t)) for f, t in zip(ensemble.feature[varying], k[varying], strict=True)}
    )
    index = {pair: i for i, pair in enumerate(pairs)}
    compare_of = np.array(
        [
            index[(int(f), int(t))] if v else -1
            for f, t, v in zip(ensemble.feature, k, varying, strict=True)
        ],
        dtype=np.int64,
    )
    return pairs, compare_of, kept


def _grid_trees(
    ensemble: TreeEnsemble, kept: np.ndarray, compare_of: np.ndarray
) -> tuple[list[tuple[int, _QNode]], np.ndarray]:
    """Every tree on the grid that is not constant, and the raw outputs' constant part
    (``init`` plus the values of the trees constant on the grid)."""
    bias = ensemble.init.copy()
    trees: list[tuple[int, _QNode]] = []
    for t in np.unique(ensemble.tree):
        leaves = np.nonzero(ensemble.tree == t)[0]
        # NOTE: each tree's compares are contiguous; working on its own columns keeps
        # the conversion linear in the number of trees.
        used = np.nonzero(np.any(ensemble.path[leaves] != 0, axis=0))[0]
        cols = slice(int(used.min()), int(used.max()) + 1) if used.size else slice(0, 0)
        root = _grid_tree(ensemble.path[:, cols], list(leaves), kept[cols], compare_of[cols])
        if root.left is None:
            bias = bias + ensemble.values[root.leaf]  # a tree constant on the grid
        else:
            trees.append((int(t), root))
    return trees, bias


def _build_program(
    ensemble: TreeEnsemble, x: np.ndarray, config: TreeQuantConfig
) -> tuple[IntegerProgram, TreeQuantized]:
    grid, k = threshold_grid(ensemble, x, config.input_bits)
    pairs, compare_of, kept = _distinct_compares(ensemble, grid, k)
    trees, bias = _grid_trees(ensemble, kept, compare_of)
    n_features = ensemble.n_features
    quantized = TreeQuantized((), (), config, x.min(axis=0), x.max(axis=0))
    if not trees:
        # Every tree is constant on the grid: the output does not depend on the input.
        quantized = replace(quantized, leaf_codes=np.zeros(ensemble.values.shape, np.int64))
        return IntegerProgram(grid, (n_features,), (_constant_step(bias, n_features),)), (quantized)
    per_tree = [_leaf_set(root) for _, root in trees]
    leaf_bits = config.leaf_bits or default_leaf_bits(len(trees))
    codes, leaf_scale, lo, hi = _quantize_leaves(ensemble, per_tree, leaf_bits)
    # A tree adding to one output (regression, binary classes, a boosting tree of one
    # class): a table per group of its leaves gives the group's leaf value directly.
    # Otherwise (a forest's class probabilities): one match table per leaf, values
    # summed in clear.
    whole = {
        t for (t, _), leaves in zip(trees, per_tree, strict=True) if codes[leaves].any(0).sum() <= 1
    }
    widest = config.group_bits or min(grid.bits - 1, GROUP_TABLE_BITS)
    if config.uniform:
        widest = grid.bits
    groups = _all_groups([(t, root, t in whole) for t, root in trees], widest, config.uniform)
    if config.uniform:  # the compares read a grid as wide as the groups' tables
        width = bits_for(max(g.index_max() for g in groups))
        grid = replace(grid, bits=max(grid.bits, width))
    used = sorted({c for g in groups for c in [*g.prefix, *g.compares]})
    position = {c: i for i, c in enumerate(used)}
    gather, compare = _compare_steps([pairs[c] for c in used], grid, config.uniform)
    steps, weights = _group_steps(groups, position, codes, whole)
    leaves_step = _sum_step(weights, leaf_scale, lo, hi, bias)
    quantized = replace(quantized, leaf_codes=codes)
    program = IntegerProgram(grid, (n_features,), (gather, compare, *steps, leaves_step))
    return program, quantized


def _sum_step(
    weights: np.ndarray,
    leaf_scale: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    bias: np.ndarray,
) -> LinearStep:
    """``acc = v @ weights.T``: the integer leaf values summed over every tree; the client
    dequantizes ``leaf_scale * (acc + lo) + bias``."""
    return LinearStep(
        "leaves",
        "linear",
        weights,
        np.zeros((1, len(lo)), dtype=np.int64),
        (hi - lo).reshape(1, -1),
        leaf_scale.reshape(1, -1),
        (-lo).reshape(1, -1).astype(np.float64),
        bias.reshape(1, -1),
    )


def _leaf_set(node: _QNode) -> list[int]:
    if node.left is None or node.right is None:
        return [node.leaf]
    return _leaf_set(node.left) + _leaf_set(node.right)


def _constant_step(bias: np.ndarray, n_features: int) -> LinearStep:
    """The program of a model that is constant on the grid: ``acc = q @ 0 = 0``."""
    n_outputs = len(bias)
    ones, zeros = np.ones((1, n_outputs)), np.zeros((1, n_outputs))
    return LinearStep(
        "leaves",
        "linear",
        np.zeros((n_outputs, n_features), dtype=np.int64),
        np.zeros((1, n_outputs), dtype=np.int64),
        np.zeros((1, n_outputs), dtype=np.int64),
        ones,
        zeros,
        bias.reshape(1, -1).astype(np.float64),
    )


def _compare_steps(
    pairs: list[tuple[int, int]], grid: ThresholdGrid, full: bool = False
) -> tuple[LinearStep, TableStep]:
    """Gather each compare's feature code (a 0/1 matrix, no lookup), then one table per
    compare: 1 iff ``code <= K``; read at the grid's full width when ``full``."""
    n_compares = len(pairs)
    gather = np.zeros((n_compares, grid.n_features), dtype=np.int64)
    thresholds = np.zeros(n_compares, dtype=np.int64)
    for i, (f, t) in enumerate(pairs):
        gather[i, f] = 1
        thresholds[i] = t
    # NOTE: a feature's codes go up to its threshold count, the proven index bound.
    code_max = (gather @ grid.counts).reshape(1, -1)
    if full:
        code_max = np.full_like(code_max, grid.qmax)
    zeros = np.zeros((1, n_compares))
    gather_step = LinearStep(
        "gather", "linear", gather, zeros.astype(np.int64), code_max, zeros + 1, zeros, zeros
    )
    table = (np.arange(grid.qmax + 1)[None, :] <= thresholds[:, None]).astype(np.int64)
    return gather_step, _table_step("compare", table, code_max)


def _group_tables(
    group: _Group, position: Mapping[int, int], codes: np.ndarray, whole: set[int]
) -> list[tuple[np.ndarray, int, np.ndarray, np.ndarray]]:
    """A group's ``(path row, offset, table, sum weights)``, one per output it adds to.

    The table index is ``2**k * (satisfied prefix conditions) + the bits of its k
    compares``, i.e. ``b @ row + 2**k * (number of prefix conditions needing false)``.
    """
    n_outputs = codes.shape[1]
    size = 2 ** len(group.compares)
    row = np.zeros(len(position), dtype=np.int64)
    for c, want in group.prefix.items():
        row[position[c]] += size if want else -size
    for j, c in enumerate(group.compares):
        row[position[c]] += 2**j
    offset = size * sum(not want for want in group.prefix.values())
    depth = len(group.prefix)
    leaf_of = group.leaves()
    out = []
    for o in range(n_outputs) if group.tree in whole else [None]:
        table = np.zeros(group.index_max() + 1, dtype=np.int64)
        for code, leaf in enumerate(leaf_of):
            table[depth * size + code] = codes[leaf, o] if o is not None else 1
        weight = np.zeros(n_outputs, dtype=np.int64)
        if o is None:
            weight[:] = codes[leaf_of[0]]
        else:
            weight[o] = 1
        if table.any() and weight.any():  # else it always adds 0
            out.append((row, offset, table, weight))
    return out


def _group_steps(
    groups: list[_Group], position: Mapping[int, int], codes: np.ndarray, whole: set[int]
) -> tuple[tuple[LinearStep, TableStep] | tuple[()], np.ndarray]:
    """Group indices (a clear matrix product of the compare bits) and group tables; and
    the weights of the final sum (``(outputs, groups)``)."""
    parts = [part for group in groups for part in _group_tables(group, position, codes, whole)]
    if not parts:
        return (), np.zeros((codes.shape[1], len(position)), np.int64)
    path = np.stack([p[0] for p in parts])
    offset = np.asarray([p[1] for p in parts], dtype=np.int64).reshape(1, -1)
    acc_max = np.asarray([len(p[2]) - 1 for p in parts], dtype=np.int64).reshape(1, -1)
    n, n_compares = path.shape
    lo, hi = linear_bounds(
        "linear", path, np.zeros((1, n_compares), np.int64), np.ones((1, n_compares), np.int64)
    )
    # Proof: the index is never negative and never above the group's table.
    assert np.all(lo + offset >= 0) and np.all(hi + offset == acc_max)
    ones, zeros = np.ones((1, n)), np.zeros((1, n))
    path_step = LinearStep("paths", "linear", path, offset, acc_max, ones, zeros, zeros)
    width = int(acc_max.max()) + 1
    table = np.stack([np.pad(p[2], (0, width - len(p[2]))) for p in parts])
    weights = np.stack([p[3] for p in parts], axis=1)
    return (path_step, _table_step("leaf_tables", table, acc_max)), weights


def _table_step(name: str, table: np.ndarray, index_max: np.ndarray) -> TableStep:
    n = table.shape[0]
    reachable = np.arange(table.shape[1])[None, :] <= index_max.reshape(-1, 1)
    out_max = np.where(reachable, table, 0).max(axis=1)
    out_min = np.where(reachable, table, np.iinfo(np.int64).max).min(axis=1)
    return TableStep(
        name,
        0,
        bits_for(int(index_max.max())),
        True,
        np.asarray(index_max, dtype=np.int64),
        table,
        bits_for(int(out_max.max())),
        (n,),
        out_min.reshape(1, n),
        out_max.reshape(1, n),
        TableRead(table),
    )
