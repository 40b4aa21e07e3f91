"""Errors raised by fhe_quant: one type per kind of mistake.

Every message says what is wrong, where (the layer or parameter), what was expected
and what was received, so that a user can fix the call without reading our code.
"""

from __future__ import annotations

import sklearn.exceptions
from sklearn.utils._param_validation import InvalidParameterError

__all__ = [
    "FHEQuantError",
    "UnsupportedOpError",
    "TraceError",
    "NotFittedError",
    "NotCompiledError",
    "InputError",
    "RangeError",
    "ParameterError",
    "DeploymentError",
    "CompilationError",
    "EstimatorNotFittedError",
    "EstimatorParameterError",
    "ModelError",
    "FHEQuantWarning",
    "UnauthenticatedArtifactWarning",
    "CalibrationWarning",
]


class FHEQuantError(Exception):
    """Base class of every error fhe_quant raises on purpose."""


class UnsupportedOpError(FHEQuantError, NotImplementedError):
    """An operation or layer option that fhe_quant cannot compile.

    Args:
        op: the operation's name (e.g. ``"torch.nn.LSTM"`` or ``"padding_mode='reflect'"``).
        where: where it sits in the model (module path or traced node name).
        hint: how to get around it, if there is a way.
    """

    def __init__(self, op: str, where: str, hint: str = "") -> None:
        self.op = op
        self.where = where
        message = f"Unsupported operation {op!r} at {where!r}."
        if hint:
            message += f" {hint}"
        super().__init__(message)


class TraceError(FHEQuantError):
    """The model could not be traced into a graph (dynamic control flow, bad module)."""


class NotFittedError(FHEQuantError, ValueError):
    """A model was used before it was fitted or calibrated."""


class NotCompiledError(FHEQuantError, RuntimeError):
    """An FHE mode that needs a circuit was asked for before ``compile``."""


class InputError(FHEQuantError, ValueError):
    """Input data with the wrong shape, dtype, or with NaN/inf values."""


class RangeError(FHEQuantError, ValueError):
    """A proven integer range does not fit where it must (table input, field, ...)."""


class ParameterError(FHEQuantError, ValueError):
    """A user-facing parameter out of its allowed set of values."""


class DeploymentError(FHEQuantError, ValueError):
    """A deployment artifact or message that cannot be used (version, tampering, bytes)."""


class CompilationError(FHEQuantError, RuntimeError):
    """Concrete could not compile the integer program (no parameters for its widths).

    ``quantized_module``, when set, is the model that failed to compile: it still runs
    with ``fhe="disable"`` and can be compiled again after a change of settings.
    """

    quantized_module: object | None = None


class EstimatorNotFittedError(sklearn.exceptions.NotFittedError, NotFittedError):
    """An estimator used before ``fit``: both scikit-learn's ``NotFittedError`` (so that
    scikit-learn's tools recognize it) and fhe_quant's."""


class EstimatorParameterError(InvalidParameterError, ParameterError):
    """A constructor parameter of an estimator out of its allowed values: both
    scikit-learn's ``InvalidParameterError`` and fhe_quant's ``ParameterError``."""


class ModelError(FHEQuantError, TypeError, ValueError):
    """The model given is not one fhe_quant can read: a callable that is not a
    ``torch.nn.Module``, or a fitted model whose parameters hold NaN or inf values."""


class FHEQuantWarning(UserWarning):
    """Base class of every warning fhe_quant issues on purpose."""


class UnauthenticatedArtifactWarning(FHEQuantWarning):
    """A deployment artifact was loaded without checking who made it.

    Its manifest checks that the files are intact, not where they come from: anyone who
    can write the directory can rewrite the files and their checksums. Pass
    ``verify_key=`` (the public key of the model owner, see ``fhe-quant keygen-signing``)
    to refuse any artifact its owner did not sign.
    """


class CalibrationWarning(FHEQuantWarning):
    """The calibration data are too few to set reliable quantization ranges."""
