"""The scikit-learn frontend's base types: :class:`SklearnGraph` (what a converter
returns), :data:`Converter` and the client-side :data:`OUTPUT_FUNCTIONS`. The family
modules (``linear``, ``neural``, ``tree``) import them from here, and the package
(:mod:`fhe_quant.frontends.sklearn`) imports the family modules and re-exports these
names, so no module of the frontend imports another that imports it back.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import expit

from fhe_quant.ir import Graph

__all__ = ["SklearnGraph", "OUTPUT_FUNCTIONS", "Converter", "moved_names"]


@dataclass(frozen=True, eq=False)
class SklearnGraph:
    """A fitted estimator, as the frontend hands it to the compiler and the client.

    Attributes:
        graph: the float graph of the raw outputs, shape ``(N, n_outputs)``.
        output: the key in :data:`OUTPUT_FUNCTIONS` the client applies to the decrypted
            raw outputs: the inverse link of a regressor (its predictions), or the
            probability function of a classifier; ``None`` for a classifier without
            probabilities (``LinearSVC``, ``SGDClassifier(loss="hinge")``).
        ravel: scikit-learn returns the single output of this model as a 1-D array.
    """

    graph: Graph
    output: str | None
    ravel: bool

    def __post_init__(self) -> None:
        if self.output is not None and self.output not in OUTPUT_FUNCTIONS:
            raise ValueError(
                f"The 'output' of a SklearnGraph must be one of {sorted(OUTPUT_FUNCTIONS)} "
                f"or None. Got {self.output!r} instead."
            )


# ------------------------------------------------------------------ client-side outputs


def _binary(p: np.ndarray) -> np.ndarray:
    p = p.reshape(-1)
    return np.stack([1.0 - p, p], axis=1)


def _normalize(p: np.ndarray) -> np.ndarray:
    # NOTE: one-vs-rest scores are normalized to sum to one; a row of zeros (every class
    # rejected) becomes uniform, as scikit-learn and LIBLINEAR do.
    total = p.sum(axis=1, keepdims=True)
    zero = total[:, 0] == 0
    p = p.copy()
    p[zero] = 1.0
    total[zero] = p.shape[1]
    return p / total


def _sigmoid(raw: np.ndarray) -> np.ndarray:
    p = expit(raw)
    return _binary(p) if p.shape[1] == 1 else p


def _ovr_sigmoid(raw: np.ndarray) -> np.ndarray:
    p = expit(raw)
    return _binary(p) if p.shape[1] == 1 else _normalize(p)


def _softmax(raw: np.ndarray) -> np.ndarray:
    shifted = np.exp(raw - raw.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def _modified_huber(raw: np.ndarray) -> np.ndarray:
    p = (np.clip(raw, -1.0, 1.0) + 1.0) / 2.0
    return _binary(p) if p.shape[1] == 1 else _normalize(p)


#: What the client applies to the decrypted raw outputs ``(N, n_outputs)``, by name.
#: Regressors: the inverse link (``identity``, ``exp``). Classifiers: the probabilities
#: ``(N, n_classes)``; a single raw column is the positive class of a binary model.
OUTPUT_FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "identity": lambda raw: raw,
    "exp": np.exp,
    "sigmoid": _sigmoid,
    "ovr_sigmoid": _ovr_sigmoid,
    "softmax": _softmax,
    "modified_huber": _modified_huber,
    # Tree models: the decrypted class probabilities, renormalized to sum to one (their
    # leaf values are quantized separately).
    "normalize": lambda raw: _normalize(np.clip(raw, 0.0, None)),
    # Binary tree classifiers: the one raw output is p(class 1) - 1/2 (so that the
    # label is its sign, as for the other binary classifiers).
    "centered_proba": lambda raw: _binary(np.clip(raw + 0.5, 0.0, 1.0)),
}


# ------------------------------------------------------------------ converters

#: A converter reads a fitted estimator and returns its :class:`SklearnGraph`; it raises
#: :class:`~fhe_quant.errors.UnsupportedOpError` naming any option it cannot compile.
Converter = Callable[[Any], SklearnGraph]


def moved_names(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for names that moved out of ``module``: each name of
    ``moved`` resolves on use from its new module (``importlib``, so the frontend does not
    depend on the later stage that now holds it), with a ``DeprecationWarning``."""

    def resolve(name: str) -> Any:
        if name in moved:
            warnings.warn(
                f"{module}.{name} moved to {moved[name]}.{name}; import it from there.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(importlib.import_module(moved[name]), name)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return resolve
