"""The quantization-aware ``NeuralNetClassifier`` and ``NeuralNetRegressor``: an MLP
built, trained (:func:`fhe_quant.training.fit`) and compiled
(:func:`~fhe_quant.qat_prepare.compile_qat_model`) behind the scikit-learn estimator API.
Import them from :mod:`fhe_quant.sklearn`.

They hold data only (the QAT module, its quantized module, the history), so they
pickle, deep-copy and ``sklearn.base.clone`` with no custom code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import sklearn.exceptions
import torch
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn

from fhe_quant import errors
from fhe_quant.fhe import check_fhe_mode
from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS
from fhe_quant.ir import ELEMENTWISE
from fhe_quant.lower import auto_table_bits
from fhe_quant.model import QuantizedModule, make_config
from fhe_quant.qat_module import QATModule
from fhe_quant.qat_prepare import compile_qat_model, prepare_qat
from fhe_quant.quant.config import MAX_ROUNDING_BITS
from fhe_quant.quant.qat import ACTIVATION_SCALES, WEIGHT_MODES
from fhe_quant.quant.quantizer import MAX_BITS
from fhe_quant.training import fit

__all__ = ["ACTIVATIONS", "NeuralNetClassifier", "NeuralNetRegressor"]

#: The hidden activations the estimators offer: the op table's rows marked ``estimator``.
ACTIVATIONS: dict[str, type[nn.Module]] = {
    op: getattr(nn, row.torch_modules[0]) for op, row in ELEMENTWISE.items() if row.estimator
}


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class _QATEstimator(BaseEstimator):
    """What both estimators share: build an MLP, train it QAT, compile, predict."""

    _loss: ClassVar[str]
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {
        "n_bits": [Interval(Integral, 1, MAX_BITS, closed="both"), dict],
        "n_hidden": [Interval(Integral, 1, None, closed="left")],
        "n_layers": [Interval(Integral, 1, None, closed="left")],
        "activation": [StrOptions(set(ACTIVATIONS))],
        "epochs": [Interval(Integral, 1, None, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "weight_mode": [StrOptions(set(WEIGHT_MODES))],
        "activation_scale": [StrOptions(set(ACTIVATION_SCALES))],
        "rounding_bits": [Interval(Integral, 1, MAX_ROUNDING_BITS, closed="both"), None],
        "accumulator_bits": [
            Interval(Integral, 2, MAX_ROUNDING_BITS, closed="both"),
            StrOptions({"auto"}),
            None,
        ],
        "p_error": [Interval(Real, 0, 1, closed="neither"), None],
        "random_state": ["random_state"],
        "verbose": ["verbose"],
    }

    def __init__(
        self,
        n_bits: int | dict[str, int] = 3,
        *,
        n_hidden: int = 64,
        n_layers: int = 3,
        activation: str = "relu",
        epochs: int = 30,
        lr: float = 1e-2,
        batch_size: int = 64,
        weight_mode: str = "uniform",
        activation_scale: str = "lsq",
        rounding_bits: int | None = None,
        accumulator_bits: int | str | None = None,
        p_error: float | None = None,
        random_state: Any = None,
        verbose: bool = False,
    ) -> None:
        self.n_bits = n_bits
        self.n_hidden = n_hidden
        self.n_layers = n_layers
        self.activation = activation
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.weight_mode = weight_mode
        self.activation_scale = activation_scale
        self.rounding_bits = rounding_bits
        self.accumulator_bits = accumulator_bits
        self.p_error = p_error
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ helpers
    def _check_params(self) -> None:
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise errors.EstimatorParameterError(str(exc)) from None

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, "quantized_module_")
        except sklearn.exceptions.NotFittedError as exc:
            raise errors.EstimatorNotFittedError(str(exc)) from None

    def _build_mlp(self, n_features: int, n_outputs: int) -> nn.Module:
        widths = [n_features] + [self.n_hidden] * (self.n_layers - 1) + [n_outputs]
        layers: list[nn.Module] = []
        for index in range(len(widths) - 1):
            layers.append(nn.Linear(widths[index], widths[index + 1]))
            if index < len(widths) - 2:
                layers.append(ACTIVATIONS[self.activation]())
        return nn.Sequential(*layers)

    def _table_bits(self) -> int:
        if self.rounding_bits is not None:
            return int(self.rounding_bits)
        return auto_table_bits(make_config(self.n_bits).n_bits_activations)

    def _fit_qat(
        self, X: np.ndarray, targets: np.ndarray, n_outputs: int
    ) -> tuple[QATModule, dict[str, list[float]], QuantizedModule]:
        seed = int(check_random_state(self.random_state).randint(0, 2**31 - 1))
        with _seeded(seed):
            mlp = self._build_mlp(X.shape[1], n_outputs)
        qat = prepare_qat(
            mlp,
            self.n_bits,
            X_sample=X,
            activation_scale=self.activation_scale,
            weight_mode=self.weight_mode,
            rounding_bits=self._table_bits(),
            accumulator_bits=self.accumulator_bits,
            seed=seed,
        )
        history = fit(
            qat,
            X,
            targets,
            epochs=self.epochs,
            lr=self.lr,
            batch_size=self.batch_size,
            loss=self._loss,
            seed=seed,
            verbose=bool(self.verbose),
            schedule="cosine",
        )
        return qat, history, compile_qat_model(qat, X, compile=False)

    def _report_targets(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def report(self, X: Any = None, y: Any = None, *, fhe: str = "simulate") -> Any:
        """A :class:`~fhe_quant.report.Report`: scores of the float shadow weights, the
        integer program with full and compiled tables and the ``fhe`` mode on ``(X, y)``
        (accuracy, or R² on standardized targets), bits per layer, PBS count.

        Raises:
            EstimatorNotFittedError: before ``fit``.
            NotCompiledError: ``fhe`` other than ``"disable"`` before :meth:`compile`.
        """
        self._check_fitted()
        if X is None or y is None:
            return self.quantized_module_.report(fhe=fhe)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.quantized_module_.report(X, self._report_targets(np.asarray(y)), fhe=fhe)

    def _raw(self, X: Any, fhe: str) -> np.ndarray:
        self._check_fitted()
        check_fhe_mode(fhe)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        raw = self.quantized_module_.forward(X, fhe=fhe, verbose=bool(self.verbose))
        return np.asarray(raw, dtype=np.float64).reshape(len(X), -1)

    # ------------------------------------------------------------------ public API
    def compile(self, X: Any) -> Any:
        """Compile the integer program with Concrete.

        Args:
            X: a few representative inputs (bit widths are proven, not taken from them).

        Returns:
            The ``concrete.fhe.Circuit`` (also at ``quantized_module_.circuit``).
        """
        self._check_fitted()
        X = validate_data(self, X, reset=False, dtype=np.float64)
        self.quantized_module_.compile(X, p_error=self.p_error, verbose=bool(self.verbose))
        return self.quantized_module_.circuit


_ESTIMATOR_DOC = """
    Args:
        n_bits: bits of the inputs, weights and activations: an int in [1, 8] or a dict
            with keys ``inputs``, ``weights``, ``activations``, ``outputs``.
        n_hidden: width of the hidden layers.
        n_layers: number of ``Linear`` layers (``n_layers - 1`` hidden layers).
        activation: hidden activation: {activations}.
        epochs: training epochs (Adam, cosine learning-rate decay, from scratch).
        lr: initial learning rate.
        batch_size: minibatch size.
        weight_mode: ``"uniform"``, ``"binary"`` or ``"binary_stochastic"``.
        activation_scale: ``"lsq"`` or ``"ema"``.
        rounding_bits: input width of every table lookup (``None``: post-training
            quantization's automatic width, :func:`fhe_quant.lower.auto_table_bits`,
            5 bits at 2-4 bit activations; ``prepare_qat``'s 4-bit default cost a
            regressor its R² > 0.5 in scikit-learn's checks).
        accumulator_bits: bound on every proven accumulator (``None``: none;
            ``"auto"``: :func:`~fhe_quant.torch.prepare_qat`'s default budget).
        p_error: error probability of each table lookup in FHE.
        random_state: seed of the initialisation, shuffling and binarization.
        verbose: progress bars.

    Attributes:
        qat_module_: the trained :class:`~fhe_quant.qat_module.QATModule`.
        quantized_module_: the compiled-to-be model (circuit after :meth:`compile`).
        history_: the training history (loss per epoch).
        n_features_in_: number of features seen during ``fit``.
""".replace("{activations}", ", ".join(f"``{name!r}``" for name in ACTIVATIONS))


class NeuralNetClassifier(ClassifierMixin, _QATEstimator):
    __doc__ = (
        """Multi-layer perceptron classifier trained quantization-aware, for encrypted
    inference (cross-entropy, Adam). The encrypted program ends at the logits; the client
    takes the argmax (or softmax for :meth:`predict_proba`).
"""
        + _ESTIMATOR_DOC
        + """        classes_: the class labels.

    Examples:
        >>> from sklearn.datasets import load_iris
        >>> x, y = load_iris(return_X_y=True)
        >>> model = NeuralNetClassifier(n_hidden=8, epochs=3, random_state=0).fit(x, y)
        >>> model.predict(x[:2]).shape
        (2,)
"""
    )

    _loss = "cross_entropy"

    def fit(self, X: Any, y: Any) -> NeuralNetClassifier:
        """Train the MLP quantization-aware and build its integer program.

        Args:
            X: training data ``(n_samples, n_features)``.
            y: class labels ``(n_samples,)``.

        Returns:
            self (``fhe="disable"`` works; call :meth:`compile` for the other modes).

        Raises:
            EstimatorParameterError: a constructor parameter out of range.
        """
        self._check_params()
        X, y = validate_data(self, X, y, reset=True, dtype=np.float64)
        check_classification_targets(y)
        classes, encoded = np.unique(y, return_inverse=True)
        if len(classes) < 2:
            raise errors.InputError(
                f"NeuralNetClassifier needs at least 2 classes in y. Got 1 class: {classes}."
            )
        qat, history, module = self._fit_qat(X, encoded, len(classes))
        # NOTE: fitted attributes are set last, so a failed fit leaves no half state.
        self.qat_module_, self.history_, self.quantized_module_ = qat, history, module
        self.classes_ = classes
        return self

    def _report_targets(self, y: np.ndarray) -> np.ndarray:
        index = np.searchsorted(self.classes_, y)
        known = (index < len(self.classes_)) & (
            self.classes_[np.minimum(index, len(self.classes_) - 1)] == y
        )
        return np.where(known, index, -1)

    def predict(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Class labels ``(n_samples,)``; ``fhe``: ``"disable"``, ``"simulate"`` or
        ``"execute"``."""
        raw = self._raw(X, fhe)
        return self.classes_[np.argmax(raw, axis=1)]

    def predict_proba(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)`` (softmax of the decrypted
        logits, computed by the client)."""
        return OUTPUT_FUNCTIONS["softmax"](self._raw(X, fhe))


class NeuralNetRegressor(RegressorMixin, _QATEstimator):
    __doc__ = (
        """Multi-layer perceptron regressor trained quantization-aware, for encrypted
    inference (mean squared error on standardized targets, Adam; the client undoes the
    standardization after decryption).
"""
        + _ESTIMATOR_DOC
        + """
    Examples:
        >>> x = np.random.default_rng(0).normal(size=(200, 3))
        >>> model = NeuralNetRegressor(n_hidden=8, epochs=3, random_state=0)
        >>> model.fit(x, x[:, 0] - x[:, 1]).predict(x[:2]).shape
        (2,)
"""
    )

    _loss = "mse"

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags

    def fit(self, X: Any, y: Any) -> NeuralNetRegressor:
        """Train the MLP quantization-aware and build its integer program.

        Args:
            X: training data ``(n_samples, n_features)``.
            y: targets ``(n_samples,)`` or ``(n_samples, n_targets)``.

        Returns:
            self (``fhe="disable"`` works; call :meth:`compile` for the other modes).

        Raises:
            EstimatorParameterError: a constructor parameter out of range.
        """
        self._check_params()
        X, y = validate_data(
            self, X, y, reset=True, dtype=np.float64, multi_output=True, y_numeric=True
        )
        targets = y.reshape(len(y), -1)
        mean, scale = targets.mean(axis=0), targets.std(axis=0)
        scale = np.where(scale > 0, scale, 1.0)
        qat, history, module = self._fit_qat(X, (targets - mean) / scale, targets.shape[1])
        self.qat_module_, self.history_, self.quantized_module_ = qat, history, module
        self.y_mean_, self.y_scale_ = mean, scale
        self.n_outputs_ = targets.shape[1]
        self._ravel = y.ndim == 1
        return self

    def _report_targets(self, y: np.ndarray) -> np.ndarray:
        return (y.reshape(len(y), -1) - self.y_mean_) / self.y_scale_

    def predict(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Predictions ``(n_samples,)`` (or ``(n_samples, n_targets)``); ``fhe``:
        ``"disable"``, ``"simulate"`` or ``"execute"``."""
        out = self._raw(X, fhe) * self.y_scale_ + self.y_mean_
        return out.reshape(-1) if self._ravel else out
