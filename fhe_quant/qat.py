"""Public quantization-aware training API: prepare a torch module, train it, compile it.

:func:`prepare_qat` turns a float ``torch.nn.Module`` (a chain of ``Linear``,
``Conv1d``/``Conv2d``, ``BatchNorm`` (folded), ``AvgPool``/``AdaptiveAvgPool``,
``Flatten`` and elementwise layers) into a :class:`~fhe_quant.quant.qat.QATModule`, a plain
``torch.nn.Module`` whose forward pass runs the very integer program that will be
compiled (see :mod:`fhe_quant.quant.qat`); train it with any loop (or
:func:`fhe_quant.training.fit`); :func:`compile_qat_model` then compiles what it learned,
with no calibration: its outputs equal the trained module's eval-mode outputs bit for bit.

:class:`NeuralNetClassifier` and :class:`NeuralNetRegressor` do all of it behind the
scikit-learn estimator API.

A recipe that works (``benchmarks/qat.py``): train in float first, then fine-tune the
QAT module for ~30 epochs with Adam at ``lr=1e-3`` and a cosine decay
(``fit(qat, X, y, epochs=30, lr=1e-3, schedule="cosine")``); on digits that gives 96%
at 3 bits (8-bit accumulators with ``accumulator_bits=8``) and 94-96% at 2 bits, and
the small CNN (conv 3x3 -> avg pool -> linear, standardized 1x8x8 images) 96% at 3
bits, with half the lookups of 6-bit PTQ (94%). From scratch,
``lr=1e-2`` with the cosine decay does almost as well.

Examples:
    >>> import numpy as np, torch
    >>> from fhe_quant.training import fit
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = np.random.default_rng(0).normal(size=(128, 4))
    >>> y = (x[:, 0] > 0).astype(int)
    >>> qat = prepare_qat(net, n_bits=3)
    >>> history = fit(qat, x, y, epochs=2, verbose=False)
    >>> qm = compile_qat_model(qat, x, compile=False)
    >>> bool((qm.forward(x) == qat.eval()(x).detach().numpy()).all())
    True
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
from fhe_quant.errors import ParameterError, TraceError
from fhe_quant.fhe import check_fhe_mode
from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS
from fhe_quant.frontends.torch import trace_module
from fhe_quant.ir import ELEMENTWISE
from fhe_quant.lower import auto_table_bits, lower
from fhe_quant.model import QuantizedModule, make_config
from fhe_quant.passes import simplify
from fhe_quant.quant.config import MAX_ROUNDING_BITS, QuantConfig
from fhe_quant.quant.ptq import check_calibration_data
from fhe_quant.quant.qat import (
    ACTIVATION_SCALES,
    WEIGHT_MODES,
    QATConfig,
    QATModule,
    default_table_bits,
)
from fhe_quant.quant.quantizer import MAX_BITS
from fhe_quant.training import fit

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


class NotAQATModuleError(ParameterError, TypeError):
    """:func:`compile_qat_model` was given something else than a prepared QAT module."""


# --------------------------------------------------------------------------- prepare


def _sample(module: nn.Module, X_sample: Any) -> np.ndarray:
    if X_sample is not None:
        if isinstance(X_sample, torch.Tensor):
            X_sample = X_sample.detach().cpu().numpy()
        # NOTE: a copy: tracing hands the sample to torch, which warns on read-only arrays.
        sample = np.array(check_calibration_data(np.asarray(X_sample), None, "X_sample"))
        sample.setflags(write=True)
        return sample
    first = next(
        (m for m in module.modules() if isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d)), None
    )
    if isinstance(first, nn.Conv1d | nn.Conv2d):
        raise ParameterError(
            f"prepare_qat needs X_sample to know the input shape of {type(module).__name__}: "
            f"its first layer is a {type(first).__name__}, whose input size is not fixed. "
            "Pass X_sample=<a batch of inputs>."
        )
    if first is None:
        raise ParameterError(
            f"prepare_qat needs X_sample to know the input shape: {type(module).__name__} "
            "has no torch.nn.Linear layer to read it from. Pass X_sample=<a batch of inputs>."
        )
    return np.zeros((2, first.in_features))


def _quant_config(n_bits: Any, rounding_bits: Any) -> QuantConfig:
    """The bit widths, with QAT's default table width when ``rounding_bits`` is None."""
    quant = make_config(n_bits, rounding_bits=rounding_bits)
    if rounding_bits is not None:
        return quant
    return make_config(n_bits, rounding_bits=default_table_bits(quant.n_bits_activations))


def prepare_qat(
    module: Any,
    n_bits: int | dict[str, int] = 3,
    *,
    X_sample: Any = None,
    activation_scale: str = "lsq",
    weight_mode: str = "uniform",
    rounding_bits: int | None = None,
    accumulator_bits: int | str | None = "auto",
    weight_scale: str = "mse",
    seed: int | None = None,
) -> QATModule:
    """A quantization-aware copy of ``module`` to train, then compile.

    The module is traced (as :func:`fhe_quant.torch.compile_torch_model` traces it: batch
    norm folds, with its running statistics, into the layer before it, which then trains
    as one layer; dropout is removed) into a chain of dense layers, convolutions, average
    poolings, reshapes and elementwise operations (max pooling, residual connections and
    concatenations are refused: quantize such models with ``compile_torch_model``). The
    returned module keeps float shadow weights, learns (or tracks) one activation step
    size per feature, or per channel before a convolution or pooling (initialised on the
    first training batch, see
    :class:`~fhe_quant.quant.qat.ActivationQuantizer`), quantizes its weights per output
    channel at every step, and computes its forward pass with the integer program that
    :func:`compile_qat_model` will compile, so training sees exactly what runs encrypted.

    Args:
        module: a ``torch.nn.Module`` taking one tensor (usually trained in float first,
            or freshly initialised); not modified.
        n_bits: bits for every role, or a dict with keys ``inputs``, ``weights``,
            ``activations``, ``outputs`` (the last layer's weights).
        X_sample: a batch of inputs, for the input shape; without it, zeros shaped like
            the first ``Linear`` layer's input (convolutional models need it).
        activation_scale: ``"lsq"`` (learned step sizes, the default) or ``"ema"``
            (moving average of the min/max seen in training, frozen in eval mode).
        weight_mode: ``"uniform"``, ``"binary"`` or ``"binary_stochastic"`` (BinaryConnect;
            binary modes keep the last layer at ``outputs`` bits).
        rounding_bits: width of every table's input (``None``: QAT's default, one bit
            more than the activations and at least 4, see
            :func:`~fhe_quant.quant.qat.default_table_bits`).
        accumulator_bits: bound every proven accumulator to this many bits (uniform
            weights only); ``"auto"`` (the default): for activations of up to 4 bits,
            the table width plus 2, plus 3 in the first layer (at 2-3 bits: 7 bits,
            then 6, with 4-bit tables; the fast path of ``benchmarks/qat.py``), no
            bound above 4 bits nor for binary weights
            (:func:`~fhe_quant.quant.qat.default_accumulator_bits`); ``None``: no
            bound.
        weight_scale: uniform weight scales per channel, recomputed at every step:
            ``"mse"`` (least squared error) or ``"max"`` (``max |w| / qmax``).
        seed: seed of the stochastic binarization.

    Returns:
        The :class:`~fhe_quant.quant.qat.QATModule`, in training mode; its quantizers are
        initialised on the first training batch (or call ``initialize(X)``).

    Raises:
        ParameterError: a parameter out of range (bits, modes, no input shape, an
            ``accumulator_bits`` below an average pooling's fixed accumulator).
        UnsupportedOpError: a layer QAT cannot train (named, with its place).
        TraceError: the module cannot be traced (or ``X_sample`` is needed).

    Examples:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(),
        ...                           torch.nn.Linear(4, 2))
        >>> qat = prepare_qat(net, n_bits={"weights": 2, "activations": 3})
        >>> [layer.input_quantizer.bits for layer in qat.layers]
        [3, 3]
        >>> cnn = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU(),
        ...                           torch.nn.AvgPool2d(2), torch.nn.Flatten(),
        ...                           torch.nn.Linear(2, 2))
        >>> qat = prepare_qat(cnn, n_bits=3, X_sample=np.zeros((1, 1, 4, 4)))
        >>> [(layer.op, layer.input_quantizer.axis) for layer in qat.layers]
        [('conv', 1), ('avg_pool', 1), ('linear', -1)]
        >>> prepare_qat(net, n_bits=9)
        Traceback (most recent call last):
        ...
        fhe_quant.errors.ParameterError: The 'n_bits' parameter must be an int in [1, 8] \
or a dict with keys {'inputs', 'weights', 'activations', 'outputs'}. Got 9 instead.
    """
    quant = _quant_config(n_bits, rounding_bits)
    try:
        config = QATConfig(
            quant,
            activation_scale=activation_scale,
            weight_mode=weight_mode,
            accumulator_bits=accumulator_bits,
            weight_scale=weight_scale,
            seed=seed,
        )
    except ValueError as exc:
        raise ParameterError(str(exc)) from None
    if not isinstance(module, nn.Module):
        raise ParameterError(
            f"prepare_qat needs a torch.nn.Module. Got {type(module).__name__} instead."
        )
    sample = _sample(module, X_sample)
    try:
        graph = trace_module(module, sample)
    except TraceError as exc:
        if X_sample is not None:
            raise
        raise TraceError(
            f"{exc} The input shape was guessed from the first Linear layer "
            f"({sample.shape[1:]}); pass X_sample=<a batch of inputs>."
        ) from exc
    return QATModule(simplify(graph), config).train()


# --------------------------------------------------------------------------- compile


def _quantized_module(qat_module: QATModule) -> QuantizedModule:
    quantized = qat_module.to_quantized_graph()
    return QuantizedModule(quantized.graph, quantized, lower(quantized))


def compile_qat_model(
    qat_module: Any,
    X_calib: Any,
    *,
    p_error: float | None = None,
    global_p_error: float | None = None,
    compile: bool = True,
    verbose: bool = False,
) -> QuantizedModule:
    """Compile a trained QAT module for encrypted inference.

    Nothing is calibrated: the quantizers are the ones the module learned, and the
    integer program is built exactly as the module's forward pass builds it, so the
    compiled model's outputs equal ``qat_module.eval()(x)`` bit for bit.

    Args:
        qat_module: the :class:`~fhe_quant.quant.qat.QATModule` from :func:`prepare_qat`,
            trained (or at least initialised).
        X_calib: a few representative inputs, for Concrete to trace the program (bit
            widths are proven, not taken from them).
        p_error: error probability of each table lookup (``None``: Concrete's default).
        global_p_error: error probability of the whole circuit.
        compile: compile with Concrete now (else only ``fhe="disable"`` works until
            ``.compile(X)``).
        verbose: show Concrete's progress.

    Returns:
        A :class:`~fhe_quant.model.QuantizedModule`.

    Raises:
        NotAQATModuleError: ``qat_module`` is not a prepared QAT module.
        NotFittedError: its quantizers were never initialised.
        InputError: ``X_calib`` with NaN/inf or of the wrong shape.

    Examples:
        >>> compile_qat_model(torch.nn.Linear(2, 2), np.zeros((1, 2)))
        Traceback (most recent call last):
        ...
        fhe_quant.qat.NotAQATModuleError: compile_qat_model needs the QATModule that \
prepare_qat returns (trained). Got Linear instead; for a float module use \
fhe_quant.torch.compile_torch_model (post-training quantization).
    """
    if not isinstance(qat_module, QATModule):
        raise NotAQATModuleError(
            "compile_qat_model needs the QATModule that prepare_qat returns (trained). "
            f"Got {type(qat_module).__name__} instead; for a float module use "
            "fhe_quant.torch.compile_torch_model (post-training quantization)."
        )
    module = _quantized_module(qat_module)
    x = module.check_input(X_calib, "calibration data")
    if compile:
        module.compile(x, p_error=p_error, global_p_error=global_p_error, verbose=verbose)
    return module


# --------------------------------------------------------------------------- estimators


#: Deprecated aliases: the estimators' errors are fhe_quant.errors' (one type per mistake).
QATParameterError = errors.EstimatorParameterError
QATNotFittedError = errors.EstimatorNotFittedError

#: The hidden activations the estimators offer: the op table's rows marked ``estimator``.
_ACTIVATIONS: dict[str, type[nn.Module]] = {
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
        "activation": [StrOptions(set(_ACTIVATIONS))],
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
            raise QATParameterError(str(exc)) from None

    def _check_fitted(self) -> None:
        try:
            check_is_fitted(self, "quantized_module_")
        except sklearn.exceptions.NotFittedError as exc:
            raise QATNotFittedError(str(exc)) from None

    def _build_mlp(self, n_features: int, n_outputs: int) -> nn.Module:
        widths = [n_features] + [self.n_hidden] * (self.n_layers - 1) + [n_outputs]
        layers: list[nn.Module] = []
        for index in range(len(widths) - 1):
            layers.append(nn.Linear(widths[index], widths[index + 1]))
            if index < len(widths) - 2:
                layers.append(_ACTIVATIONS[self.activation]())
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
            QATNotFittedError: before ``fit``.
            NotCompiledError: ``fhe`` other than ``"disable"`` before :meth:`compile`.
        """
        self._check_fitted()
        if X is None or y is None:
            return self.quantized_module_.report(fhe=fhe)
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.quantized_module_.report(X, self._report_targets(np.asarray(y)), fhe=fhe)

    def __getstate__(self) -> dict[str, Any]:
        # NOTE: the compiled module holds closures and a Concrete circuit, which do not
        # pickle; it is rebuilt from the (picklable) QAT module. Call compile() again.
        state = dict(super().__getstate__())
        state.pop("quantized_module_", None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "qat_module_" in state:
            self.quantized_module_ = _quantized_module(self.qat_module_)

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
            ``"auto"``: :func:`~fhe_quant.qat.prepare_qat`'s default budget).
        p_error: error probability of each table lookup in FHE.
        random_state: seed of the initialisation, shuffling and binarization.
        verbose: progress bars.

    Attributes:
        qat_module_: the trained :class:`~fhe_quant.quant.qat.QATModule`.
        quantized_module_: the compiled-to-be model (circuit after :meth:`compile`).
        history_: the training history (loss per epoch).
        n_features_in_: number of features seen during ``fit``.
""".replace("{activations}", ", ".join(f"``{name!r}``" for name in _ACTIVATIONS))


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
            QATParameterError: a constructor parameter out of range.
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
            QATParameterError: a constructor parameter out of range.
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
