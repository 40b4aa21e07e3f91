"""Deprecated alias of the quantization-aware training API (issue 13 part 4 split it).

Import :func:`~fhe_quant.qat_prepare.prepare_qat`,
:func:`~fhe_quant.qat_prepare.compile_qat_model`, :class:`~fhe_quant.qat_module.QATModule`
and :class:`~fhe_quant.qat_prepare.NotAQATModuleError` from :mod:`fhe_quant.torch`, and
:class:`~fhe_quant.qat_estimators.NeuralNetClassifier` and
:class:`~fhe_quant.qat_estimators.NeuralNetRegressor` from :mod:`fhe_quant.sklearn`; this
module re-exports them (the same objects) so that existing imports keep working.
"""

from __future__ import annotations

from fhe_quant import errors
from fhe_quant.qat_estimators import ACTIVATIONS, NeuralNetClassifier, NeuralNetRegressor
from fhe_quant.qat_module import QATModule
from fhe_quant.qat_prepare import NotAQATModuleError, compile_qat_model, prepare_qat

__all__ = [
    "prepare_qat",
    "compile_qat_model",
    "QATModule",
    "NotAQATModuleError",
    "NeuralNetClassifier",
    "NeuralNetRegressor",
    "QATParameterError",
    "QATNotFittedError",
]

#: Deprecated aliases: the estimators' errors are fhe_quant.errors' (one type per mistake).
QATParameterError = errors.EstimatorParameterError
QATNotFittedError = errors.EstimatorNotFittedError

#: Deprecated: :data:`fhe_quant.qat_estimators.ACTIVATIONS`.
_ACTIVATIONS = ACTIVATIONS
