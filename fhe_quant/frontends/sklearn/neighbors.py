"""k-nearest neighbours: reads scikit-learn's ``KNeighborsClassifier`` (uniform weights,
euclidean metric) into a :class:`~fhe_quant.specs.KNNSpec`: its stored points and labels,
its neighbours, and its predictions on the calibration data. The encrypted program is
built from the spec at the lowering stage (:mod:`fhe_quant.lower_knn`, where the program,
its lookup counts and its measured costs are documented) and wrapped in a
:class:`~fhe_quant.program_modules.KNNModule` at the model stage.

``KNNProgram``, ``KNNStage``, ``KNNModule``, ``knn_to_module``, ``DEFAULT_N_BITS`` and
``DEFAULT_LEVEL_BITS`` moved there (issue 13 part 3); reading them from this module still
works, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import importlib
import warnings
from typing import Any

import numpy as np

from fhe_quant import errors
from fhe_quant.frontends.sklearn.base import moved_names
from fhe_quant.specs import KNNSpec

__all__ = ["check_knn_options", "knn_spec"]

#: Where each name that moved out of this module lives now (issue 13 part 3).
MOVED: dict[str, str] = {
    "KNNProgram": "fhe_quant.lower_knn",
    "KNNStage": "fhe_quant.lower_knn",
    "DEFAULT_N_BITS": "fhe_quant.lower_knn",
    "DEFAULT_LEVEL_BITS": "fhe_quant.lower_knn",
    "KNNModule": "fhe_quant.program_modules",
}


__getattr__ = moved_names(__name__, MOVED)


def check_knn_options(model: Any) -> None:
    """Refuse the options the encrypted program does not compute.

    Raises:
        errors.UnsupportedOpError: non-uniform weights, a metric other than euclidean,
            metric parameters, or multi-output targets.
    """
    where = type(model).__name__
    if model.weights not in ("uniform", None):
        raise errors.UnsupportedOpError(
            f"weights={model.weights!r}",
            where,
            "Only weights='uniform' is supported: distance weights would need encrypted divisions.",
        )
    metric = model.metric
    euclidean = metric in ("euclidean", "l2") or (
        metric == "minkowski" and (model.p is None or model.p == 2)
    )
    if not euclidean:
        detail = f"metric={metric!r}" + (f", p={model.p!r}" if metric == "minkowski" else "")
        raise errors.UnsupportedOpError(
            detail, where, "Only the euclidean metric (minkowski with p=2) is supported."
        )
    if model.metric_params:
        raise errors.UnsupportedOpError(
            f"metric_params={model.metric_params!r}", where, "metric_params must be None."
        )
    if getattr(model, "outputs_2d_", False):
        raise errors.UnsupportedOpError(
            "multi-output targets", where, "Fit on a 1-D target (one label per sample)."
        )


def knn_spec(model: Any, x_calib: Any) -> KNNSpec:
    """Read a fitted scikit-learn ``KNeighborsClassifier`` into a :class:`KNNSpec`.

    Args:
        model: the fitted classifier (its stored points ``_fit_X`` and labels ``_y``).
        x_calib: float data ``(n, F)`` setting each feature's clipping range (with the
            stored points); the model's predictions on it choose the distance levels.

    Raises:
        errors.UnsupportedOpError: an option :func:`check_knn_options` refuses.
        errors.InputError: fewer stored points than ``n_neighbors``, or one class only.
    """
    check_knn_options(model)
    stored = np.asarray(model._fit_X, dtype=np.float64)
    labels = np.asarray(model._y, dtype=np.int64).reshape(-1)
    n_classes = len(model.classes_)
    k = int(model.n_neighbors)
    if n_classes < 2:
        raise errors.InputError(
            "KNeighborsClassifier needs at least 2 classes to vote between; the training "
            "labels hold one class only."
        )
    if k > len(stored):
        raise errors.InputError(
            f"n_neighbors={k} exceeds the {len(stored)} stored points; lower n_neighbors."
        )
    x_calib = np.asarray(x_calib, dtype=np.float64)
    target = np.searchsorted(model.classes_, model.predict(x_calib[:1024]))
    return KNNSpec(stored, labels, n_classes, k, x_calib, target)


def knn_to_module(
    model: Any, x_calib: np.ndarray, n_bits: int, level_bits: int | None = None
) -> Any:
    """Deprecated: :func:`fhe_quant.program_modules.build_knn_module` of
    :func:`knn_spec` (the same :class:`~fhe_quant.program_modules.KNNModule`)."""
    warnings.warn(
        "fhe_quant.frontends.sklearn.neighbors.knn_to_module is deprecated: use "
        "fhe_quant.program_modules.build_knn_module(model, knn_spec(model, x), n_bits).",
        DeprecationWarning,
        stacklevel=2,
    )
    build = importlib.import_module("fhe_quant.program_modules").build_knn_module
    return build(model, knn_spec(model, x_calib), n_bits, level_bits)
