"""Compiled models whose program is not lowered from a graph: tree ensembles
(:class:`TreeModule`, around the program of :mod:`fhe_quant.lower_tree`) and k-nearest
neighbours (:class:`KNNModule`, around a :class:`~fhe_quant.lower_knn.KNNProgram`). They have the
:class:`~fhe_quant.model.QuantizedModule` surface (forward in the three ``fhe`` modes,
compile, statistics, report, deployment); only the float reference and the client's
processing differ. Their statistics are the program's own (the one step protocol), so
no module overrides them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fhe_quant.errors import InputError
from fhe_quant.fhe import FHECircuit
from fhe_quant.ir import Node
from fhe_quant.lower import IntegerProgram
from fhe_quant.lower_knn import KNNProgram, lower_knn
from fhe_quant.lower_tree import TreeQuantConfig, TreeQuantized, quantize_ensemble
from fhe_quant.model import QuantizedModule
from fhe_quant.specs import KNNSpec, TreeEnsemble

__all__ = ["TreeModule", "build_tree_ensemble_module", "KNNModule", "build_knn_module"]


@dataclass(frozen=True)
class _ClientChains:
    """What :class:`~fhe_quant.deploy` reads of ``model.quantized``."""

    pre: tuple[Node, ...]
    post: tuple[Node, ...] = ()


def _clip_chain(low: np.ndarray, span: np.ndarray) -> tuple[Node, ...]:
    """``x -> clip(x - low, 0, span)`` per feature, as float ir nodes (client side)."""
    return (
        Node("shift", "add_const", ("x",), params={"constant": -low}),
        Node("clip_low", "relu", ("shift",)),
        Node("negate", "mul_const", ("clip_low",), params={"constant": np.array(-1.0)}),
        Node("from_top", "add_const", ("negate",), params={"constant": span}),
        Node("clip_high", "relu", ("from_top",)),
        Node("negate_back", "mul_const", ("clip_high",), params={"constant": np.array(-1.0)}),
        Node("clipped", "add_const", ("negate_back",), params={"constant": span}),
    )


class KNNModule(QuantizedModule):
    """A compiled k-NN model: the :class:`~fhe_quant.model.QuantizedModule` surface
    (``forward``, ``compile``, ``statistics``, ``report``) around a :class:`KNNProgram`."""

    def __init__(
        self,
        sklearn_model: Any,
        program: KNNProgram,
        low: np.ndarray,
        span: np.ndarray,
        circuit: FHECircuit | None = None,
    ) -> None:
        self.sklearn_model = sklearn_model
        self.low = np.asarray(low, dtype=np.float64)
        self.span = np.asarray(span, dtype=np.float64)
        self.graph = None  # type: ignore[assignment]
        self.quantized = _ClientChains(_clip_chain(self.low, self.span))  # type: ignore[assignment]
        self.program = program  # type: ignore[assignment]
        self._circuit = circuit

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.program.input_shape

    def float_forward(self, x: Any) -> np.ndarray:
        """scikit-learn's ``predict_proba``."""
        return np.asarray(self.sklearn_model.predict_proba(self.check_input(x)))


def build_knn_module(
    sklearn_model: Any, spec: KNNSpec, n_bits: int, level_bits: int | None = None
) -> KNNModule:
    """The :class:`KNNModule` of a classifier read into ``spec``
    (:func:`fhe_quant.frontends.sklearn.neighbors.knn_spec`), lowered by
    :func:`~fhe_quant.lower_knn.lower_knn`; ``sklearn_model`` is its float reference."""
    lowered = lower_knn(spec, n_bits, level_bits)
    return KNNModule(sklearn_model, lowered.program, lowered.low, lowered.span)


# --------------------------------------------------------------------------- trees


class TreeModule(QuantizedModule):
    """A quantized tree model with the surface of
    :class:`~fhe_quant.model.QuantizedModule` (forward in the three ``fhe`` modes,
    compile, statistics, report, deployment); its float reference is the
    :class:`TreeEnsemble` instead of a graph."""

    def __init__(
        self,
        ensemble: TreeEnsemble,
        quantized: TreeQuantized,
        program: IntegerProgram,
        circuit: FHECircuit | None = None,
    ) -> None:
        super().__init__(None, quantized, program, circuit)  # type: ignore[arg-type]
        self.ensemble = ensemble

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.ensemble.n_features,)

    def float_forward(self, x: Any) -> np.ndarray:
        """The float tree model's raw outputs on ``x``."""
        return self.ensemble.evaluate(self.check_input(x))


def build_tree_ensemble_module(
    ensemble: TreeEnsemble,
    config: TreeQuantConfig,
    x: np.ndarray | None = None,
    *,
    low: np.ndarray | None = None,
    high: np.ndarray | None = None,
) -> TreeModule:
    """Quantize a tree ensemble's tensor form (read and checked by the frontend) into a
    :class:`TreeModule`.

    Args:
        ensemble: the tensor form.
        config: the grid and leaf value bits.
        x: calibration data; the grid spans each feature's range over it.
        low, high: the per-feature range instead of ``x`` (rebuilding a pickled model).

    Raises:
        InputError: neither ``x`` nor ``low`` and ``high``.
    """
    if x is not None:
        program, quantized = quantize_ensemble(ensemble, x, config)
    else:
        if low is None or high is None:
            raise InputError("build_tree_module needs calibration data x, or low and high.")
        # NOTE: without data the grid keeps each feature's most spread thresholds only
        # when it must merge some (no sample says which decisions matter).
        data = np.stack([np.asarray(low, np.float64), np.asarray(high, np.float64)])
        program, quantized = quantize_ensemble(ensemble, data, config)
    return TreeModule(ensemble, quantized, program)
