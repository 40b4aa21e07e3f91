"""Plain specifications of the models that are not graphs: what a frontend reads of a
fitted model that :mod:`fhe_quant.lower_tree` (tree ensembles) or
:mod:`fhe_quant.lower_knn` (k-nearest neighbours) lowers to an integer program.

Frozen dataclasses of arrays and numbers (a tree ensemble also evaluates itself in float,
the reference its program is checked against), at the ``ir`` stage so that the
frontends (which import only ``errors`` and ``ir``-stage modules) can emit them and the
lowering can read them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["TreeEnsemble", "KNNSpec"]


@dataclass(frozen=True, eq=False)
class TreeEnsemble:
    """The float tensor form of a fitted tree model (see :mod:`fhe_quant.lower_tree`).

    Attributes:
        n_features: number of input features.
        feature: ``(C,)`` feature of each compare.
        threshold: ``(C,)`` threshold of each compare (``x <= threshold`` goes left).
        path: ``(L, C)`` int, ``+1``/``-1`` where a leaf needs a compare true/false.
        values: ``(L, O)`` float, each leaf's contribution to the raw outputs.
        init: ``(O,)`` float, the constant part of the raw outputs.
        tree: ``(L,)`` int, the tree of each leaf (each tree reaches exactly one leaf).
        node: ``(L,)`` int, each leaf's node id in its scikit-learn tree (``apply``).
        output: the client's output function (a key of ``OUTPUT_FUNCTIONS``).
        ravel: scikit-learn returns the single output as a 1-D array.
        float32_inputs: the model compares ``float32(x)`` with the thresholds
            (scikit-learn, XGBoost); ``False``: it compares the float64 input (LightGBM).
    """

    n_features: int
    feature: np.ndarray
    threshold: np.ndarray
    path: np.ndarray
    values: np.ndarray
    init: np.ndarray
    tree: np.ndarray
    node: np.ndarray
    output: str
    ravel: bool
    float32_inputs: bool = True

    def __post_init__(self) -> None:
        n_compares, n_leaves = len(self.feature), len(self.values)
        if self.tree.shape != (n_leaves,) or self.node.shape != (n_leaves,):
            raise ValueError(f"TreeEnsemble needs one tree index per leaf. Got {self.tree.shape}.")
        if self.threshold.shape != (n_compares,) or self.path.shape != (n_leaves, n_compares):
            raise ValueError(
                f"TreeEnsemble shapes disagree: {n_compares} features, thresholds "
                f"{self.threshold.shape}, path {self.path.shape}, {n_leaves} leaf values."
            )
        if self.values.ndim != 2 or self.init.shape != (self.values.shape[1],):
            raise ValueError(
                f"TreeEnsemble values must be (leaves, outputs) and init (outputs,). Got "
                f"{self.values.shape} and {self.init.shape}."
            )

    @property
    def depth(self) -> np.ndarray:
        """``(L,)`` number of conditions of each leaf."""
        return np.abs(self.path).sum(axis=1)

    @property
    def n_negated(self) -> np.ndarray:
        """``(L,)`` number of conditions each leaf needs false."""
        return (self.path < 0).sum(axis=1)

    def evaluate(self, x: np.ndarray) -> np.ndarray:
        """The raw outputs ``(N, O)`` in float, deciding like scikit-learn (float32
        inputs against float64 thresholds)."""
        x32 = np.asarray(x, dtype=np.float32 if self.float32_inputs else np.float64)
        x32 = x32.astype(np.float64)
        # NOTE: float64 products of small integers are exact, and use BLAS.
        bits = (x32[:, self.feature] <= self.threshold).astype(np.float64)
        satisfied = bits @ self.path.T.astype(np.float64) + self.n_negated
        reached = (satisfied == self.depth).astype(np.float64)
        return reached @ self.values + self.init


@dataclass(frozen=True, eq=False)
class KNNSpec:
    """A fitted k-nearest-neighbours classifier, as read from the model.

    Attributes:
        points: the stored training points ``(N, F)``, float.
        labels: the class index of each stored point ``(N,)``.
        n_classes: number of classes.
        k: neighbours.
        calibration: float data ``(n, F)`` setting each feature's clipping range (with
            the stored points).
        target: the model's prediction (class index) on the first samples of
            ``calibration`` (at most 1024): the levels' shift is chosen to reproduce it.

    Examples:
        >>> spec = KNNSpec(np.zeros((3, 2)), np.array([0, 1, 1]), 2, 1, np.ones((4, 2)),
        ...                np.zeros(4, dtype=np.int64))
        >>> spec.n_features
        2
    """

    points: np.ndarray
    labels: np.ndarray
    n_classes: int
    k: int
    calibration: np.ndarray
    target: np.ndarray

    def __post_init__(self) -> None:
        if self.points.ndim != 2 or self.labels.shape != (len(self.points),):
            raise ValueError(
                f"KNNSpec needs points (N, F) and one label per point. Got {self.points.shape} "
                f"and {self.labels.shape}."
            )
        if self.calibration.ndim != 2 or self.calibration.shape[1] != self.points.shape[1]:
            raise ValueError(
                f"KNNSpec calibration must be (n, {self.points.shape[1]}). Got "
                f"{self.calibration.shape}."
            )

    @property
    def n_features(self) -> int:
        return int(self.points.shape[1])
