"""scikit-learn estimators that compile to encrypted inference.

Each estimator takes the constructor parameters of the scikit-learn class it wraps
(same names, same defaults) plus ``n_bits``, ``rounding_bits``, ``p_error`` and
``verbose``. ``fit`` trains the scikit-learn model (kept as ``sklearn_model_``) and
quantizes it with the training data as calibration data (``quantized_module_``);
``compile`` builds the Concrete circuit; ``predict`` and friends take
``fhe="disable" | "simulate" | "execute"``. What runs encrypted is the integer
program up to the last linear layer's accumulator; the client decrypts it and applies
the rest in float (inverse link, sigmoid, softmax, threshold or argmax).

Examples:
    >>> from sklearn.datasets import load_breast_cancer
    >>> from sklearn.preprocessing import StandardScaler
    >>> x, y = load_breast_cancer(return_X_y=True)
    >>> x = StandardScaler().fit_transform(x)
    >>> model = LogisticRegression(n_bits=8).fit(x, y)
    >>> circuit = model.compile(x)
    >>> bool((model.predict(x[:20], fhe="simulate") == model.predict(x[:20])).all())
    True
    >>> model.quantized_module_.statistics["pbs_count"]
    0
"""

from __future__ import annotations

import copy
import functools
import importlib
import inspect
from collections.abc import Callable
from dataclasses import replace
from numbers import Integral, Real
from typing import Any, ClassVar

import numpy as np
import sklearn.exceptions
from sklearn import ensemble as _ensemble
from sklearn import linear_model as _linear_model
from sklearn import neighbors as _neighbors_sklearn
from sklearn import neural_network as _neural_network
from sklearn import svm as _svm
from sklearn import tree as _tree
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.metrics import accuracy_score, d2_tweedie_score, r2_score
from sklearn.preprocessing import LabelEncoder
from sklearn.utils import get_tags
from sklearn.utils._param_validation import Interval, InvalidParameterError, StrOptions
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import (
    _check_sample_weight,
    check_array,
    check_is_fitted,
    column_or_1d,
    validate_data,
)

from fhe_quant import errors
from fhe_quant import lower_knn as _knn
from fhe_quant.fhe import check_fhe_mode
from fhe_quant.frontends.sklearn import (
    OUTPUT_FUNCTIONS,
    SklearnGraph,
    check_translation,
    converter_for,
    sklearn_to_graph,
)
from fhe_quant.frontends.sklearn import boosting as _boosting
from fhe_quant.frontends.sklearn import neighbors as _neighbors
from fhe_quant.frontends.sklearn import tree as _trees
from fhe_quant.lower import bits_for
from fhe_quant.lower_tree import TreeQuantConfig
from fhe_quant.model import QuantizedModule, build_quantized_module, make_config
from fhe_quant.program_modules import (
    KNNModule,
    TreeModule,
    build_knn_module,
    build_tree_ensemble_module,
)
from fhe_quant.quant.config import (
    MAX_ACCUMULATOR_BITS,
    MAX_ROUNDING_BITS,
    QuantConfig,
    default_calibration,
)
from fhe_quant.quant.quantizer import MAX_BITS
from fhe_quant.report import Report

__all__ = [
    "LinearRegression",
    "Ridge",
    "Lasso",
    "ElasticNet",
    "LogisticRegression",
    "LinearSVC",
    "LinearSVR",
    "SGDClassifier",
    "SGDRegressor",
    "PoissonRegressor",
    "GammaRegressor",
    "TweedieRegressor",
    "MLPClassifier",
    "MLPRegressor",
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "ExtraTreesClassifier",
    "ExtraTreesRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
    "XGBClassifier",  # noqa: F822 - lazy (optional xgboost), see __getattr__
    "XGBRegressor",  # noqa: F822 - lazy (optional xgboost), see __getattr__
    "LGBMClassifier",  # noqa: F822 - lazy (optional lightgbm), see __getattr__
    "LGBMRegressor",  # noqa: F822 - lazy (optional lightgbm), see __getattr__
    "from_sklearn",
    "NeuralNetClassifier",  # noqa: F822 - lazy, see __getattr__
    "NeuralNetRegressor",  # noqa: F822 - lazy, see __getattr__
    "EstimatorNotFittedError",
    "EstimatorParameterError",
]


def __getattr__(name: str) -> Any:
    # NOTE: the quantization-aware estimators train with torch; importing them lazily keeps
    # `import fhe_quant.sklearn` free of torch for the linear models.
    if name in ("NeuralNetClassifier", "NeuralNetRegressor"):
        from fhe_quant import qat_estimators

        return getattr(qat_estimators, name)
    if name in _BOOSTING:
        return _boosting_wrapper(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------- errors


# NOTE: defined in fhe_quant.errors (one home for every error type); the names stay here.
EstimatorNotFittedError = errors.EstimatorNotFittedError
EstimatorParameterError = errors.EstimatorParameterError


def _check_fitted(estimator: Any, attribute: str | None = "quantized_module_") -> None:
    try:
        check_is_fitted(estimator, attribute)
    except sklearn.exceptions.NotFittedError as exc:
        raise EstimatorNotFittedError(str(exc)) from None


# --------------------------------------------------------------------------- base classes

#: Constraints of the parameters every estimator adds to scikit-learn's own.
_FHE_PARAMETER_CONSTRAINTS: dict[str, list[Any]] = {
    "n_bits": [Interval(Integral, 1, MAX_BITS, closed="both"), dict],
    "rounding_bits": [Interval(Integral, 1, MAX_ROUNDING_BITS, closed="both"), None],
    "p_error": [Interval(Real, 0, 1, closed="neither"), None],
    "verbose": ["verbose"],
}


#: What ``validate_data(reset=True)`` sets on an estimator.
_INPUT_ATTRIBUTES = ("n_features_in_", "feature_names_in_")


class _FHEEstimator(BaseEstimator):
    """What every estimator shares: fit, compile, raw outputs, report, pickling.

    Subclasses are generated by :func:`_make_estimator`, which sets the class attributes
    below and an ``__init__`` with the scikit-learn class's parameters.
    """

    _sklearn_class: ClassVar[type]
    _sklearn_params: ClassVar[tuple[str, ...]] = ()
    _parameter_constraints: ClassVar[dict[str, list[Any]]] = {}
    _metric: ClassVar[str]

    # Set by the generated __init__; declared for type checkers.
    n_bits: int | dict[str, int]
    rounding_bits: int | None
    p_error: float | None
    verbose: Any

    # ------------------------------------------------------------------ helpers
    @classmethod
    def _import_graph(cls, estimator: Any) -> SklearnGraph | None:
        """What :func:`from_sklearn` reads from a fitted model of this class (a copy);
        options this class cannot compile fail here, by name."""
        return sklearn_to_graph(estimator)

    def _make_sklearn_model(self) -> Any:
        return self._sklearn_class(**{name: getattr(self, name) for name in self._sklearn_params})

    def _config(self) -> QuantConfig:
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise EstimatorParameterError(str(exc)) from None
        accumulator_bits = getattr(self, "accumulator_bits", None)
        return make_config(
            self.n_bits,
            rounding_bits=self.rounding_bits,
            accumulator_bits=accumulator_bits,
            calibration=default_calibration(None, accumulator_bits),
        )

    def _validate(self, X: Any, y: Any = "no_validation", *, reset: bool) -> Any:
        # NOTE: scikit-learn's messages are kept (its estimator checks match them); the
        # error becomes an InputError, which is still a ValueError.
        # 2-D targets pass through: the wrapped model accepts or refuses them itself
        # (its tags do not always say: MLPRegressor fits 2-D targets).
        kwargs: dict[str, Any] = {}
        if not (isinstance(y, str) and y == "no_validation"):
            kwargs.update(multi_output=True, y_numeric=self._metric == "r2")
        try:
            return validate_data(self, X, y, reset=reset, dtype=np.float64, **kwargs)
        except ValueError as exc:
            if isinstance(exc, errors.FHEQuantError):
                raise
            raise errors.InputError(str(exc)) from exc

    def _set_fitted(
        self, model: Any, X: np.ndarray, config: QuantConfig, imported: SklearnGraph | None = None
    ) -> None:
        imported = imported or sklearn_to_graph(model)
        check_translation(model, imported, X)
        module = build_quantized_module(
            imported.graph, X, config, compile=False, verbose=bool(self.verbose)
        )
        # NOTE: every fitted attribute is set at the end, so a failure leaves the
        # estimator as it was.
        if hasattr(model, "classes_"):
            self.classes_ = model.classes_
        if hasattr(model, "n_iter_"):
            self.n_iter_ = model.n_iter_
        self.sklearn_model_ = model
        self.quantized_module_ = module
        self._output = imported.output
        self._ravel = imported.ravel

    # ------------------------------------------------------------------ public API
    def fit(self, X: Any, y: Any, sample_weight: Any = None, **fit_params: Any) -> Any:
        """Fit the scikit-learn model, then quantize it with ``X`` as calibration data.

        Args:
            X: training data ``(n_samples, n_features)``; it also sets the quantization
                ranges (inputs outside them are clipped at prediction time).
            y: targets.
            sample_weight: per-sample weights, passed to scikit-learn's ``fit``.
            **fit_params: other arguments of scikit-learn's ``fit``.

        Returns:
            self (not compiled yet: ``fhe="disable"`` works, call :meth:`compile` for
            the other modes).

        Raises:
            EstimatorParameterError: a constructor parameter out of range.
            errors.ParameterError: ``n_bits`` as a dict with a bad key or value.
            errors.InputError: ``X`` or ``y`` with NaN/inf, strings, or the wrong shape.
            errors.UnsupportedOpError: a fitted option fhe_quant cannot compile.
        """
        config = self._config()
        # NOTE: validate_data(reset=True) records the input's features on self; a fit
        # that fails later restores them, so a fitted estimator stays consistent.
        saved = {k: v for k, v in vars(self).items() if k in _INPUT_ATTRIBUTES}
        try:
            X, y = self._validate(X, y, reset=True)
            if isinstance(self, ClassifierMixin):
                _check_class_counts(y)
            model = self._make_sklearn_model()
            if sample_weight is not None:
                fit_params["sample_weight"] = sample_weight
            model.fit(X, y, **fit_params)
            _check_finite_parameters(model)
            if sample_weight is not None:
                # NOTE: samples of weight zero are not part of the data: they must not
                # widen the calibrated ranges either.
                weights = np.broadcast_to(np.asarray(sample_weight, dtype=np.float64), len(X))
                X = X[weights != 0] if np.any(weights != 0) else X
            self._set_fitted(model, X, config)
        except BaseException:
            for name in _INPUT_ATTRIBUTES:
                vars(self).pop(name, None)
            vars(self).update(saved)
            raise
        return self

    def compile(self, X: Any) -> Any:
        """Compile the integer program with Concrete.

        Args:
            X: representative inputs, used by Concrete to trace the program (the
                quantization ranges come from the ``fit`` data and bit widths are
                proven, so a few samples suffice).

        Returns:
            The ``concrete.fhe.Circuit`` (also at ``quantized_module_.circuit``).

        Raises:
            EstimatorNotFittedError: before ``fit``.
            errors.InputError: ``X`` with NaN/inf or the wrong number of features.
        """
        _check_fitted(self)
        X = self._validate(X, reset=False)
        self.quantized_module_.compile(X, p_error=self.p_error, verbose=bool(self.verbose))
        return self.quantized_module_.circuit

    def _module_for(self, fhe: str) -> QuantizedModule:
        """The quantized module, checked to be able to run in mode ``fhe``."""
        _check_fitted(self)
        check_fhe_mode(fhe)
        module = self.quantized_module_
        if fhe != "disable":
            module.fhe_circuit  # noqa: B018 - raises NotCompiledError before any work
        return module

    def _raw(self, X: Any, fhe: str) -> np.ndarray:
        """The model's raw outputs ``(N, n_outputs)`` (decrypted and dequantized)."""
        module = self._module_for(fhe)
        X = self._validate(X, reset=False)
        raw = module.forward(X, fhe=fhe, verbose=bool(self.verbose))
        return np.asarray(raw, dtype=np.float64).reshape(len(X), -1)

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _score(self, y: Any, predictions: np.ndarray) -> float:
        if self._metric == "accuracy":
            return float(accuracy_score(y, predictions))
        return float(r2_score(y, predictions))

    def report(self, X: Any = None, y: Any = None, *, fhe: str = "simulate") -> Report:
        """Accuracy (classifiers) or R² (regressors) and the cost of the compiled model.

        Scores, on ``(X, y)``: ``float`` (the scikit-learn model), ``quantized (full
        tables)``, ``quantized`` (``fhe="disable"``) and the ``fhe`` mode; plus bits per
        layer, PBS count and estimated latency once compiled.

        Raises:
            errors.NotCompiledError: ``fhe`` other than ``"disable"`` before ``compile``.
        """
        _check_fitted(self)
        if X is None and y is None:
            return self.quantized_module_.report(fhe=fhe)
        module = self._module_for(fhe)
        report = module.report(fhe=fhe)
        if X is None or y is None:
            raise errors.InputError("report() needs both X and y to compute scores, or neither.")
        X = self._validate(X, reset=False)
        y = np.asarray(y)
        if len(y) != len(X):
            raise errors.InputError(f"X has {len(X)} samples but y has {len(y)}.")
        full = module.dequantize_output(
            module.program.run_without_rounding(module.quantize_input(X))
        )
        scores = {
            "float": self._score(y, self.sklearn_model_.predict(X)),
            "quantized (full tables)": self._score(y, self._decode(full.reshape(len(X), -1))),
            "quantized": self._score(y, self._decode(self._raw(X, "disable"))),
        }
        if fhe != "disable":
            scores[fhe] = self._score(y, self._decode(self._raw(X, fhe)))
        return replace(report, metric=self._metric, scores=scores)

    # ------------------------------------------------------------------ scikit-learn
    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        inner = get_tags(self._sklearn_class())
        tags.target_tags.multi_output = inner.target_tags.multi_output
        tags.target_tags.positive_only = inner.target_tags.positive_only
        tags.non_deterministic = inner.non_deterministic
        tags.input_tags.sparse = False
        tags.array_api_support = False
        if tags.classifier_tags is not None and inner.classifier_tags is not None:
            tags.classifier_tags.poor_score = inner.classifier_tags.poor_score
            tags.classifier_tags.multi_label = False  # multilabel MLPs are not supported
        if tags.regressor_tags is not None and inner.regressor_tags is not None:
            tags.regressor_tags.poor_score = inner.regressor_tags.poor_score
        return tags


def _has_decision_function(estimator: _FHEEstimator) -> bool:
    return hasattr(estimator._sklearn_class, "decision_function")


def _has_proba(estimator: _FHEEstimator) -> bool:
    if hasattr(estimator, "quantized_module_"):
        return getattr(estimator, "_output", None) is not None
    # NOTE: before fit, ask scikit-learn (SGDClassifier has probabilities for some losses).
    return hasattr(estimator._make_sklearn_model(), "predict_proba")


class _FHEClassifier(ClassifierMixin, _FHEEstimator):
    """Classifiers: labels from the sign (one raw output) or the argmax of the raw
    outputs; probabilities from the client-side output function."""

    _metric = "accuracy"

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        if len(self.classes_) == 1:  # an MLPClassifier fitted on one class predicts it
            return np.repeat(self.classes_, len(raw))
        if raw.shape[1] == 1:
            return self.classes_[(raw[:, 0] > 0).astype(np.intp)]
        return self.classes_[np.argmax(raw, axis=1)]

    def predict(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Class labels.

        Args:
            X: samples ``(n_samples, n_features)``.
            fhe: ``"disable"`` (clear integers), ``"simulate"`` or ``"execute"``.

        Returns:
            Labels ``(n_samples,)``, from ``classes_``.
        """
        return self._decode(self._raw(X, fhe))

    @available_if(_has_decision_function)
    def decision_function(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Decision values: ``(n_samples,)`` for two classes, else ``(n_samples, n_classes)``."""
        raw = self._raw(X, fhe)
        return raw[:, 0] if raw.shape[1] == 1 else raw

    @available_if(_has_proba)
    def predict_proba(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``, computed like scikit-learn's
        (sigmoid, softmax, ...) by the client from the decrypted raw outputs."""
        raw = self._raw(X, fhe)
        assert self._output is not None
        return OUTPUT_FUNCTIONS[self._output](raw)

    @available_if(_has_proba)
    def predict_log_proba(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Logarithm of :meth:`predict_proba`."""
        with np.errstate(divide="ignore"):
            return np.log(self.predict_proba(X, fhe=fhe))


#: The Tweedie power of the deviance that the generalized linear models' ``score`` uses.
_DEVIANCE_POWER: dict[type, Callable[[Any], float]] = {
    _linear_model.PoissonRegressor: lambda model: 1.0,
    _linear_model.GammaRegressor: lambda model: 2.0,
    _linear_model.TweedieRegressor: lambda model: float(model.power),
}


class _FHERegressor(RegressorMixin, _FHEEstimator):
    """Regressors: predictions are the client-side inverse link of the raw outputs."""

    _metric = "r2"

    def _decode(self, raw: np.ndarray) -> np.ndarray:
        out = OUTPUT_FUNCTIONS[self._output or "identity"](raw)
        return out.reshape(-1) if self._ravel else out

    def predict(self, X: Any, *, fhe: str = "disable") -> np.ndarray:
        """Predictions: ``(n_samples,)``, or ``(n_samples, n_targets)`` for a model fitted
        on 2-D targets.

        Args:
            X: samples ``(n_samples, n_features)``.
            fhe: ``"disable"`` (clear integers), ``"simulate"`` or ``"execute"``.
        """
        return self._decode(self._raw(X, fhe))

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """What the wrapped class's ``score`` measures: R², or for the generalized linear
        models the fraction of Tweedie deviance explained (D²), on ``fhe="disable"``."""
        power = _DEVIANCE_POWER.get(self._sklearn_class)
        if power is None:
            return float(super().score(X, y, sample_weight=sample_weight))
        _check_fitted(self)
        return float(
            d2_tweedie_score(
                y, self.predict(X), sample_weight=sample_weight, power=power(self.sklearn_model_)
            )
        )


# --------------------------------------------------------------------------- the estimators

_DOC = """{name} for encrypted inference: scikit-learn's :class:`{path}`, quantized.

Constructor parameters: those of :class:`{path}` (same names, same defaults; see its
documentation), plus the ones below.

Args:
    n_bits: bits of the quantized inputs, weights and activations: an int in [1, 8] or
        a dict with keys ``inputs``, ``weights``, ``activations``, ``outputs`` (the
        last layer's weights). Default {n_bits}.
    rounding_bits: input width of every table lookup (``None``: automatic).
    p_error: error probability of each table lookup in FHE (``None``: Concrete's
        default for the whole circuit).
    verbose: show progress bars{verbose_note}.

Attributes:
    sklearn_model_: the fitted scikit-learn model (float).
    quantized_module_: the quantized model (:class:`fhe_quant.model.QuantizedModule`);
        its circuit exists after :meth:`compile`.{classes}
    n_features_in_: number of features seen during ``fit``.
"""


_ACCUMULATOR_DOC = """    accumulator_bits: bound every layer's proven accumulator to this many bits
        (2 to 16), the integer weights chosen under that budget on the training data
        (:mod:`fhe_quant.quant.axe`); ``"auto"``: the width, 4-bit tables and ``"mse"``
        calibration of :func:`fhe_quant.torch.compile_torch_model`'s default; ``None``
        (default): no bound (min-max calibration, automatic table widths).
"""


def _make_estimator(
    sklearn_class: type,
    base: type,
    default_n_bits: int,
    defaults: dict[str, Any] | None = None,
    doc: str = _DOC,
    accumulator: bool = False,
    sk_signature: inspect.Signature | None = None,
) -> type:
    """A public estimator class wrapping ``sklearn_class``.

    NOTE: the ``__init__`` signature is generated from the installed scikit-learn class
    instead of being written out for each of the 14 estimators: scikit-learn changes
    these signatures between versions (``LogisticRegression``'s ``penalty`` now defaults
    to ``"deprecated"``, ``LinearSVC``'s ``dual`` gained ``"auto"``), and a copy would
    silently drift from the class it wraps. The generated ``__init__`` carries an explicit
    ``__signature__`` (scikit-learn's ``get_params``, ``clone`` and ``repr`` read it,
    and so do ``help()`` and IDEs), binds its arguments against it (unknown or missing
    arguments raise ``TypeError`` as usual) and only stores them.

    ``defaults`` replaces some of scikit-learn's defaults (tree models get FHE-friendly
    sizes); ``doc`` is the class docstring template; ``accumulator`` adds the
    ``accumulator_bits`` parameter (perceptrons: accumulator-aware quantization);
    ``sk_signature`` replaces the class's own (XGBoost's takes ``**kwargs``).
    """
    sk_signature = _with_defaults(
        sk_signature or inspect.signature(sklearn_class.__init__), defaults or {}
    )
    has_verbose = "verbose" in sk_signature.parameters
    signature = sk_signature.replace(
        parameters=[
            *sk_signature.parameters.values(),
            *_fhe_parameters(default_n_bits, accumulator, has_verbose),
        ]
    )
    name = sklearn_class.__name__
    doc = _class_doc(doc, sklearn_class, base, default_n_bits, defaults or {}, has_verbose)
    if accumulator:
        doc = doc.replace("    p_error:", _ACCUMULATOR_DOC + "    p_error:", 1)
    return type(
        name,
        (base,),
        {
            "__init__": _storing_init(signature, name),
            "__doc__": doc,
            "__module__": __name__,
            "__qualname__": name,
            "_sklearn_class": sklearn_class,
            "_sklearn_params": tuple(p for p in sk_signature.parameters if p != "self"),
            "_parameter_constraints": _constraints(sklearn_class, accumulator, has_verbose),
        },
    )


def _with_defaults(signature: inspect.Signature, defaults: dict[str, Any]) -> inspect.Signature:
    """``signature`` with some of its defaults replaced."""
    return signature.replace(
        parameters=[
            p.replace(default=defaults[p.name]) if p.name in defaults else p
            for p in signature.parameters.values()
        ]
    )


def _fhe_parameters(
    default_n_bits: int, accumulator: bool, has_verbose: bool
) -> list[inspect.Parameter]:
    """The keyword-only parameters every estimator adds to the wrapped class's."""
    names = {"n_bits": default_n_bits, "rounding_bits": None, "p_error": None}
    if accumulator:
        names["accumulator_bits"] = None
    if not has_verbose:
        names["verbose"] = False
    return [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default)
        for name, default in names.items()
    ]


def _storing_init(signature: inspect.Signature, name: str) -> Callable[..., None]:
    """An ``__init__`` that binds its arguments against ``signature`` and stores them."""

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        for key, value in list(bound.arguments.items())[1:]:
            setattr(self, key, value)

    init.__signature__ = signature  # type: ignore[attr-defined]
    init.__name__ = "__init__"
    init.__qualname__ = f"{name}.__init__"
    return init


def _constraints(sklearn_class: type, accumulator: bool, has_verbose: bool) -> dict[str, list[Any]]:
    """The wrapped class's parameter constraints plus ours."""
    constraints = {
        **getattr(sklearn_class, "_parameter_constraints", {}),
        **_FHE_PARAMETER_CONSTRAINTS,
    }
    if accumulator:
        constraints["accumulator_bits"] = [
            Interval(Integral, 2, MAX_ACCUMULATOR_BITS, closed="both"),
            StrOptions({"auto"}),
            None,
        ]
    if has_verbose:
        constraints["verbose"] = sklearn_class._parameter_constraints["verbose"]  # type: ignore[attr-defined]
    return constraints


def _class_doc(
    doc: str,
    sklearn_class: type,
    base: type,
    default_n_bits: int,
    defaults: dict[str, Any],
    has_verbose: bool,
) -> str:
    """The class docstring: ``doc`` filled in for ``sklearn_class``."""
    name = sklearn_class.__name__
    return doc.format(
        name=name,
        defaults=", ".join(f"``{k}={v!r}``" for k, v in defaults.items()),
        path=f"{sklearn_class.__module__.split('._')[0]}.{name}",
        n_bits=default_n_bits,
        verbose_note=(
            " (scikit-learn's own ``verbose``, also used for fhe_quant's progress bars)"
            if has_verbose
            else ""
        ),
        classes=("\n    classes_: the class labels." if issubclass(base, _FHEClassifier) else ""),
    )


#: Linear models compile to one dot product with no bootstrap: wide bits cost nothing.
_LINEAR_N_BITS = 8
#: Perceptrons pay one table lookup per hidden neuron; 6 bits keeps them cheap.
_MLP_N_BITS = 6

LinearRegression = _make_estimator(_linear_model.LinearRegression, _FHERegressor, _LINEAR_N_BITS)
Ridge = _make_estimator(_linear_model.Ridge, _FHERegressor, _LINEAR_N_BITS)
Lasso = _make_estimator(_linear_model.Lasso, _FHERegressor, _LINEAR_N_BITS)
ElasticNet = _make_estimator(_linear_model.ElasticNet, _FHERegressor, _LINEAR_N_BITS)
LinearSVR = _make_estimator(_svm.LinearSVR, _FHERegressor, _LINEAR_N_BITS)
SGDRegressor = _make_estimator(_linear_model.SGDRegressor, _FHERegressor, _LINEAR_N_BITS)
PoissonRegressor = _make_estimator(_linear_model.PoissonRegressor, _FHERegressor, _LINEAR_N_BITS)
GammaRegressor = _make_estimator(_linear_model.GammaRegressor, _FHERegressor, _LINEAR_N_BITS)
TweedieRegressor = _make_estimator(_linear_model.TweedieRegressor, _FHERegressor, _LINEAR_N_BITS)
LogisticRegression = _make_estimator(
    _linear_model.LogisticRegression, _FHEClassifier, _LINEAR_N_BITS
)
LinearSVC = _make_estimator(_svm.LinearSVC, _FHEClassifier, _LINEAR_N_BITS)
SGDClassifier = _make_estimator(_linear_model.SGDClassifier, _FHEClassifier, _LINEAR_N_BITS)
MLPClassifier = _make_estimator(
    _neural_network.MLPClassifier, _FHEClassifier, _MLP_N_BITS, accumulator=True
)
MLPRegressor = _make_estimator(
    _neural_network.MLPRegressor, _FHERegressor, _MLP_N_BITS, accumulator=True
)


# --------------------------------------------------------------------------- tree models
# NOTE: trees do not go through the float graph and PTQ: fhe_quant.frontends.sklearn.tree
# reads a fitted tree model into its tensor form and fhe_quant.lower_tree lowers that
# straight to an integer program (compares as tables on the
# input grid, path matching as a clear matrix product plus one table per leaf, leaf values
# summed). The estimators share everything else with the linear models and perceptrons.

_TREE_DOC = """{name} for encrypted inference: scikit-learn's :class:`{path}`, converted
to compares on a quantized input grid, path matching and summed leaf values.

Constructor parameters: those of :class:`{path}` (same names; see its documentation),
plus the ones below. FHE-friendly defaults differ from scikit-learn's: {defaults}
(every distinct compare and every group of leaves costs one table lookup per sample).

Args:
    n_bits: an int in [1, 8]: the widest per-feature threshold grid, also the input
        width of every compare table (up to 5 bits a lookup is cheap; 6 costs about
        2-4x more). A feature with at most ``2**n_bits - 1`` distinct split thresholds
        keeps them all, so its compares are exact on every input; the grid takes only
        the bits its features need. The encrypted sum of leaf values then has 8 bits,
        plus ``ceil(log2(trees) / 2)`` for ensembles (no table reads it). Or a dict
        with keys ``inputs`` (the grid, default 6) and ``outputs`` (the sum of leaf
        values, 2 to 16 bits). Or ``"auto"``: ``fit(X, y,
        validation=(X_val, y_val), max_accuracy_drop=0.01)`` picks both by estimated
        latency (:func:`fhe_quant.search.search_tree`). Default {n_bits}.
    rounding_bits: must be ``None``: a tree has no accumulator to round.
    p_error: error probability of each table lookup in FHE (``None``: Concrete's
        default for the whole circuit).
    verbose: show progress bars{verbose_note}.

Attributes:
    sklearn_model_: the fitted scikit-learn model (float).
    quantized_module_: the quantized model
        (:class:`fhe_quant.program_modules.TreeModule`); its circuit exists after
        :meth:`compile`.{classes}
    n_features_in_: number of features seen during ``fit``.
"""


def _tree_builder(read: Any, check: Any) -> Any:
    """The builder of a tree family's module: ``read`` the fitted model into its
    :class:`~fhe_quant.specs.TreeEnsemble` (the frontend), ``check`` it on the
    calibration data, then :func:`~fhe_quant.program_modules.build_tree_ensemble_module`
    (the lowering, at the model stage)."""

    def build(
        model: Any, config: Any, x: Any = None, *, low: Any = None, high: Any = None
    ) -> TreeModule:
        ensemble = read(model)
        if x is not None:
            check(model, ensemble, x)
        return build_tree_ensemble_module(ensemble, config, x, low=low, high=high)

    return build


class _FHETreeEstimator(_FHEEstimator):
    """Tree models: fit, compile and predict as the other estimators; the quantized
    module comes from :func:`_tree_builder` (scikit-learn's trees read by
    :mod:`fhe_quant.frontends.sklearn.tree`)."""

    #: Builds the quantized module from a fitted model (and its calibration data or range).
    _build_module = staticmethod(_tree_builder(_trees.ensemble_from_sklearn, _trees.check_ensemble))

    def _config(self) -> Any:  # type: ignore[override]
        try:
            self._validate_params()
        except InvalidParameterError as exc:
            raise EstimatorParameterError(str(exc)) from None
        if self.rounding_bits is not None:
            raise errors.ParameterError(
                f"The 'rounding_bits' parameter of {type(self).__name__} must be None: a "
                f"tree model's tables read the input codes directly, there is no "
                f"accumulator to round. Got {self.rounding_bits!r} instead (set n_bits "
                "to change the tables' width)."
            )
        if isinstance(self.n_bits, str):  # "auto": chosen in _set_fitted
            return self.n_bits
        return TreeQuantConfig.from_n_bits(self.n_bits)

    def fit(  # type: ignore[override]
        self,
        X: Any,
        y: Any,
        sample_weight: Any = None,
        *,
        validation: Any = None,
        max_accuracy_drop: float = 0.01,
        **fit_params: Any,
    ) -> Any:
        """Fit as the other estimators; with ``n_bits="auto"``, also choose the input
        grid and leaf-sum bits of least estimated latency whose metric on
        ``validation=(X_val, y_val)`` in clear stays within ``max_accuracy_drop`` of the
        float model's (:func:`fhe_quant.search.search_tree`; candidates are compiled,
        never keyed, and listed in ``search_report_``).

        Raises:
            errors.InputError: bad validation data (named).
            errors.ParameterError: validation without ``n_bits="auto"``, or a bad
                ``max_accuracy_drop``.
            fhe_quant.search.AccuracyBudgetError: no candidate meets the budget.
        """
        from fhe_quant.search import check_validation

        if self.n_bits != "auto":
            if validation is not None:
                raise errors.ParameterError(
                    "The 'validation' argument of fit is only used with n_bits='auto'; "
                    f"got n_bits={self.n_bits!r}."
                )
            return super().fit(X, y, sample_weight, **fit_params)
        self._auto = (check_validation(validation, None), max_accuracy_drop)
        try:
            return super().fit(X, y, sample_weight, **fit_params)
        finally:
            del self._auto

    def _search(self, model: Any, X: np.ndarray) -> Any:
        """``n_bits="auto"``: the tree module chosen by the cost model."""
        from fhe_quant.search import check_validation, search_tree

        (x_val, y_val), drop = self._auto
        x_val, y_val = check_validation((x_val, y_val), (X.shape[1],))

        def metric(module: Any, x: np.ndarray, y: np.ndarray) -> float:
            raw = np.asarray(module.forward(x, fhe="disable"), dtype=np.float64).reshape(len(x), -1)
            if hasattr(model, "classes_"):
                index = (raw[:, 0] > 0).astype(np.intp) if raw.shape[1] == 1 else raw.argmax(1)
                return float(accuracy_score(y, model.classes_[index]))
            out = OUTPUT_FUNCTIONS[module.ensemble.output](raw)
            return float(r2_score(y, out.reshape(-1) if module.ensemble.ravel else out))

        return search_tree(
            lambda config: self._build_module(model, config, X),
            X,
            (x_val, y_val),
            metric,
            float(model.score(x_val, y_val)),
            max_accuracy_drop=drop,
            verbose=bool(self.verbose),
        )

    @classmethod
    def _import_graph(cls, estimator: Any) -> None:
        return None  # no graph: unsupported options fail when the module is built

    def _set_fitted(
        self, model: Any, X: np.ndarray, config: Any, imported: SklearnGraph | None = None
    ) -> None:
        if config == "auto":
            module = self._search(model, X)
            self.search_report_ = module.search_report_
        else:
            module = self._build_module(model, config, X)
        # NOTE: every fitted attribute is set at the end, so a failure leaves the
        # estimator as it was.
        if hasattr(model, "classes_"):
            self.classes_ = model.classes_
        if hasattr(model, "n_estimators_"):
            self.n_estimators_ = model.n_estimators_
        self.sklearn_model_ = model
        self.quantized_module_ = module
        self._output = module.ensemble.output
        self._ravel = module.ensemble.ravel

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        if tags.classifier_tags is not None:
            tags.target_tags.multi_output = False  # multi-output classifiers: unsupported
        return tags


class _FHETreeClassifier(_FHETreeEstimator, _FHEClassifier):
    """Tree classifiers: labels from the argmax of the class probabilities (decision
    trees, forests) or of the boosted scores."""

    def _validate(self, X: Any, y: Any = "no_validation", *, reset: bool) -> Any:
        out = super()._validate(X, y, reset=reset)
        if isinstance(y, str) and y == "no_validation":
            return out
        return out[0], _one_column(out[1])


def _one_column(y: np.ndarray) -> np.ndarray:
    # NOTE: as scikit-learn's single-output estimators: a column becomes 1-D, with its
    # warning (several columns are refused when the model is built).
    return column_or_1d(y, warn=True) if y.ndim == 2 and y.shape[1] == 1 else y


class _FHETreeRegressor(_FHETreeEstimator, _FHERegressor):
    """Tree regressors: predictions are the decrypted, dequantized sums of leaf values."""


#: Tree models' default grid, measured (benchmarks/sklearn_models.py and the tests' data
#: sets): classifiers keep their accuracy within a point with 5-bit compare tables;
#: regressors need 6 (on diabetes at 5 bits, R² drops 0.04 for a decision tree and 0.012
#: for extra trees), and pay about twice the latency for it.
_TREE_CLASSIFIER_N_BITS = 5
_TREE_REGRESSOR_N_BITS = 6
_SINGLE_TREE = {"max_depth": 5}
_FOREST = {"n_estimators": 20, "max_depth": 4}
_BOOSTING = {"n_estimators": 20}


def _make_tree(sklearn_class: type, base: type, defaults: dict[str, Any]) -> type:
    n_bits = _TREE_CLASSIFIER_N_BITS if base is _FHETreeClassifier else _TREE_REGRESSOR_N_BITS
    cls = _make_estimator(sklearn_class, base, n_bits, defaults, _TREE_DOC)
    # n_bits="auto": fit(..., validation=(X_val, y_val)) chooses the bits by cost.
    constraints = cls._parameter_constraints
    cls._parameter_constraints = {
        **constraints,
        "n_bits": [*constraints["n_bits"], StrOptions({"auto"})],
    }
    return cls


DecisionTreeClassifier = _make_tree(_tree.DecisionTreeClassifier, _FHETreeClassifier, _SINGLE_TREE)
DecisionTreeRegressor = _make_tree(_tree.DecisionTreeRegressor, _FHETreeRegressor, _SINGLE_TREE)
RandomForestClassifier = _make_tree(_ensemble.RandomForestClassifier, _FHETreeClassifier, _FOREST)
RandomForestRegressor = _make_tree(_ensemble.RandomForestRegressor, _FHETreeRegressor, _FOREST)
ExtraTreesClassifier = _make_tree(_ensemble.ExtraTreesClassifier, _FHETreeClassifier, _FOREST)
ExtraTreesRegressor = _make_tree(_ensemble.ExtraTreesRegressor, _FHETreeRegressor, _FOREST)
GradientBoostingClassifier = _make_tree(
    _ensemble.GradientBoostingClassifier, _FHETreeClassifier, _BOOSTING
)
GradientBoostingRegressor = _make_tree(
    _ensemble.GradientBoostingRegressor, _FHETreeRegressor, _BOOSTING
)

# --------------------------------------------------------------------------- XGBoost, LightGBM
# NOTE: both libraries are optional (``pip install fhe-quant[boosting]``): their wrappers
# are built on first use (module __getattr__, from_sklearn), so importing this module
# never imports them. Their trees go through the same lowering as scikit-learn's
# (fhe_quant.frontends.sklearn.boosting reads the dumped trees).

_BOOSTING_DOC = """{name} for encrypted inference: :class:`{path}`, its trees converted
to compares on a quantized input grid, path matching and summed leaf values (the same
lowering as scikit-learn's tree models; see :mod:`fhe_quant.frontends.sklearn.boosting`
for how thresholds, base score, classes and link functions are read).

Constructor parameters: those of :class:`{path}` (same names; see its documentation),
plus the ones below. FHE-friendly defaults differ from the library's: {defaults}
(every distinct compare and every group of leaves costs one table lookup per sample).
NaN inputs are refused (``InputError``): the trees' default directions never apply.

Args:
    n_bits: an int in [1, 8]: bits of the per-feature input grid, also the input width
        of every compare table; or a dict with keys ``inputs`` and ``outputs`` (the
        sum of leaf values, default 8 bits). Default {n_bits}.
    rounding_bits: must be ``None``: a tree has no accumulator to round.
    p_error: error probability of each table lookup in FHE (``None``: Concrete's
        default for the whole circuit).
    verbose: show progress bars{verbose_note}.

Attributes:
    sklearn_model_: the fitted library model (float).
    quantized_module_: the quantized model
        (:class:`fhe_quant.program_modules.TreeModule`); its circuit exists after
        :meth:`compile`.{classes}
    n_features_in_: number of features seen during ``fit``.
"""


class _FHEBoostingEstimator(_FHETreeEstimator):
    """XGBoost and LightGBM models: tree estimators whose trees are read from the
    library's dump."""

    _build_module = staticmethod(
        _tree_builder(_boosting.ensemble_from_booster, _boosting.check_booster)
    )

    def _make_sklearn_model(self) -> Any:
        params = {name: getattr(self, name) for name in self._sklearn_params}
        if self._sklearn_class.__module__.startswith("lightgbm") and not self.verbose:
            params["verbose"] = -1  # NOTE: LightGBM prints its warnings unless told not to
        return self._sklearn_class(**params)

    def fit(self, X: Any, y: Any, sample_weight: Any = None, **fit_params: Any) -> Any:
        """Fit the library's model, then quantize it (see :meth:`_FHEEstimator.fit`).

        Raises:
            errors.InputError: also for sample weights that are all zero (the libraries
                would fit a model of nothing).
        """
        if sample_weight is not None:
            try:
                sample_weight = _check_sample_weight(sample_weight, np.asarray(X))
            except (ValueError, TypeError) as exc:
                raise errors.InputError(str(exc)) from exc
        if sample_weight is not None and not np.any(sample_weight != 0):
            raise errors.InputError(
                f"{type(self).__name__}.fit: every sample weight is zero; at least one "
                "sample must have a non-zero weight."
            )
        return super().fit(X, y, sample_weight, **fit_params)

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = False  # one output tree per class or target
        tags.input_tags.allow_nan = False  # NaN inputs are refused, see the class doc
        return tags


class _FHEBoostingClassifier(_FHEBoostingEstimator, _FHETreeClassifier):
    """XGBoost/LightGBM classifiers: trained on the labels' indices (XGBoost accepts no
    other labels), ``classes_`` the labels themselves."""

    def fit(self, X: Any, y: Any, sample_weight: Any = None, **fit_params: Any) -> Any:
        """Fit the library's model on the indices of the labels, then quantize it (see
        :meth:`_FHEEstimator.fit`)."""
        if y is None:
            raise errors.InputError(
                f"{type(self).__name__} requires y to be passed, but the target y is None."
            )
        try:
            labels = column_or_1d(check_array(y, ensure_2d=False, dtype=None), warn=True)
            check_classification_targets(labels)
            encoder = LabelEncoder().fit(labels)
        except (ValueError, TypeError) as exc:
            raise errors.InputError(str(exc)) from exc
        weights = None if sample_weight is None else np.asarray(sample_weight)
        # NOTE: weights of the wrong shape are refused by the base fit, named as such.
        weighted = (
            labels if weights is None or weights.shape != labels.shape else labels[weights != 0]
        )
        present = np.unique(weighted) if len(weighted) else encoder.classes_
        if len(present) < 2:
            raise errors.InputError(
                f"{type(self).__name__} needs samples of at least 2 classes (of non-zero "
                f"weight); got 1 class ({present[0]!r})."
            )
        super().fit(X, encoder.transform(labels), sample_weight, **fit_params)
        self.classes_ = encoder.classes_
        return self


class _FHEBoostingRegressor(_FHEBoostingEstimator, _FHETreeRegressor):
    """XGBoost/LightGBM regressors (one target: a column becomes 1-D, with its warning)."""

    def _validate(self, X: Any, y: Any = "no_validation", *, reset: bool) -> Any:
        out = super()._validate(X, y, reset=reset)
        if isinstance(y, str) and y == "no_validation":
            return out
        return out[0], _one_column(out[1])


#: The FHE-friendly defaults of the boosting wrappers (the libraries': 100 trees, depth 6
#: for XGBoost; 100 trees of 31 leaves, unbounded depth, for LightGBM).
_XGB_DEFAULTS = {"n_estimators": 20, "max_depth": 4}
_LGBM_DEFAULTS = {"n_estimators": 20, "num_leaves": 15, "max_depth": 4}
#: Public name -> (library, its class, our base class, our defaults).
_BOOSTING: dict[str, tuple[str, str, type, dict[str, Any]]] = {
    "XGBClassifier": ("xgboost", "XGBClassifier", _FHEBoostingClassifier, _XGB_DEFAULTS),
    "XGBRegressor": ("xgboost", "XGBRegressor", _FHEBoostingRegressor, _XGB_DEFAULTS),
    "LGBMClassifier": ("lightgbm", "LGBMClassifier", _FHEBoostingClassifier, _LGBM_DEFAULTS),
    "LGBMRegressor": ("lightgbm", "LGBMRegressor", _FHEBoostingRegressor, _LGBM_DEFAULTS),
}


def _library_signature(library_class: type) -> inspect.Signature:
    """The keyword-only parameters of a library estimator, with their defaults: its
    ``get_params`` (XGBoost's ``__init__`` takes ``**kwargs`` for most of them)."""
    params = [
        inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=value)
        for name, value in library_class().get_params(deep=False).items()
    ]
    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return inspect.Signature([self_param, *params])


@functools.cache
def _boosting_wrapper(name: str) -> type:
    """The public wrapper ``name`` (built once, registered for :func:`from_sklearn`).

    Raises:
        ImportError: the library is not installed (with the command that installs it).
    """
    library, class_name, base, defaults = _BOOSTING[name]
    try:
        module = importlib.import_module(library)
    except ImportError as exc:
        raise ImportError(
            f"fhe_quant.sklearn.{name} needs {library}: pip install 'fhe-quant[boosting]'."
        ) from exc
    library_class = getattr(module, class_name)
    n_bits = _TREE_CLASSIFIER_N_BITS if base is _FHEBoostingClassifier else _TREE_REGRESSOR_N_BITS
    wrapper = _make_estimator(
        library_class,
        base,
        n_bits,
        defaults,
        _BOOSTING_DOC,
        sk_signature=_library_signature(library_class),
    )
    _WRAPPERS[library_class] = wrapper
    return wrapper


def _register_boosting(estimator: Any) -> None:
    """Build the wrappers of ``estimator``'s library, if it is XGBoost or LightGBM."""
    if _boosting.is_booster(estimator):
        library = type(estimator).__module__.split(".")[0]
        for name, (lib, *_) in _BOOSTING.items():
            if lib == library:
                _boosting_wrapper(name)


#: The public estimator of each supported scikit-learn class.
_WRAPPERS: dict[type, type] = {
    cls._sklearn_class: cls
    for cls in (
        LinearRegression,
        Ridge,
        Lasso,
        ElasticNet,
        LinearSVR,
        SGDRegressor,
        PoissonRegressor,
        GammaRegressor,
        TweedieRegressor,
        LogisticRegression,
        LinearSVC,
        SGDClassifier,
        MLPClassifier,
        MLPRegressor,
        DecisionTreeClassifier,
        DecisionTreeRegressor,
        RandomForestClassifier,
        RandomForestRegressor,
        ExtraTreesClassifier,
        ExtraTreesRegressor,
        GradientBoostingClassifier,
        GradientBoostingRegressor,
    )
}


def _check_class_counts(y: Any) -> None:
    """Refuse a classifier's target with one class, or a class of fewer than 2 samples.

    Raises:
        errors.InputError: naming the class and its count.
    """
    from sklearn.utils.multiclass import type_of_target

    if type_of_target(y) not in ("binary", "multiclass"):
        return  # scikit-learn's fit refuses continuous or multi-output targets, by name
    classes, counts = np.unique(np.asarray(y), return_counts=True)
    if len(classes) < 2:
        raise errors.InputError(
            f"y holds a single class ({classes.tolist()[:1]!r}, {int(counts.sum())} samples): "
            "a classifier needs at least 2 classes."
        )
    if counts.min() < 2:
        rare = classes[counts.argmin()]
        raise errors.InputError(
            f"Class {rare!r} of y has {int(counts.min())} sample: every class needs at least 2 "
            "to be learned and calibrated."
        )


def _check_finite_parameters(estimator: Any) -> None:
    """Refuse a fitted model with NaN/inf in a learned parameter (``coef_``, ``coefs_``...).

    Raises:
        errors.ModelError: naming the attribute and where the first bad value is.
    """
    for name, value in vars(estimator).items():
        if not name.endswith("_") or name.startswith("_"):
            continue
        arrays = value if isinstance(value, list) else [value]
        for i, array in enumerate(arrays):
            if not isinstance(array, np.ndarray) or array.dtype.kind not in "fc":
                continue
            bad = ~np.isfinite(array)
            if bad.any():
                index = tuple(int(j) for j in np.argwhere(bad)[0])
                where = f"{name}[{i}]" if isinstance(value, list) else name
                raise errors.ModelError(
                    f"The fitted {type(estimator).__name__}.{where} holds {int(bad.sum())} "
                    f"NaN or inf values (first at index {index}): the model diverged or was "
                    "edited; re-fit it (scale the inputs, lower the learning rate)."
                )


def from_sklearn(
    estimator: Any,
    X: Any,
    n_bits: int | dict[str, int] | None = None,
    *,
    rounding_bits: int | None = None,
    p_error: float | None = None,
    verbose: bool = False,
    accumulator_bits: int | None = None,
) -> Any:
    """Import an already-trained scikit-learn model, without refitting it.

    Args:
        estimator: a fitted scikit-learn estimator of a supported class; it is copied,
            not modified.
        X: calibration data ``(n_samples, n_features)``, representative of the inputs
            (typically the training data); it sets the quantization ranges.
        n_bits: as in the estimators (``None``: the class default, 8 for linear models
            and 6 for perceptrons).
        rounding_bits: input width of every table lookup (``None``: automatic).
        p_error: error probability of each table lookup in FHE.
        verbose: show progress bars.
        accumulator_bits: for perceptrons, bound every proven accumulator to this many
            bits, or ``"auto"`` (see :class:`MLPClassifier`); other models have no
            such option.

    Returns:
        The matching fhe_quant estimator, fitted (not compiled yet), with the same
        parameters as ``estimator`` and ``sklearn_model_`` a copy of it.

    Raises:
        errors.UnsupportedOpError: the estimator's class or one of its options is not
            supported (named in the message).
        EstimatorNotFittedError: ``estimator`` is not fitted.
        errors.InputError: ``X`` does not match the estimator's number of features, or
            holds NaN/inf or strings.

    Examples:
        >>> import numpy as np
        >>> from sklearn.linear_model import LinearRegression as SkLinearRegression
        >>> x = np.random.default_rng(0).normal(size=(50, 3))
        >>> trained = SkLinearRegression().fit(x, x @ [1.0, -2.0, 0.5])
        >>> model = from_sklearn(trained, x)
        >>> type(model).__name__, model.n_bits
        ('LinearRegression', 8)
        >>> bool(np.allclose(model.predict(x[:3]), trained.predict(x[:3]), atol=0.05))
        True
    """
    _register_boosting(estimator)
    wrapper_class = next(
        (_WRAPPERS[cls] for cls in type(estimator).__mro__ if cls in _WRAPPERS), None
    )
    if wrapper_class is None:
        converter_for(estimator)  # raises: the class is unsupported (named, with the others)
    _check_fitted(estimator, None)
    _check_finite_parameters(estimator)
    estimator = copy.deepcopy(estimator)
    imported = wrapper_class._import_graph(estimator)
    params = {
        name: value
        for name, value in estimator.get_params(deep=False).items()
        if name in wrapper_class._sklearn_params
    }
    params.update(rounding_bits=rounding_bits, p_error=p_error)
    if accumulator_bits is not None:
        if "accumulator_bits" not in wrapper_class._parameter_constraints:
            raise errors.ParameterError(
                f"The 'accumulator_bits' parameter applies to perceptrons (MLPClassifier, "
                f"MLPRegressor), not to {type(estimator).__name__}. Got {accumulator_bits!r}."
            )
        params["accumulator_bits"] = accumulator_bits
    if n_bits is not None:
        params["n_bits"] = n_bits
    if "verbose" not in params or verbose:
        params["verbose"] = verbose
    model = wrapper_class(**params)
    config = model._config()
    X = model._validate(X, reset=True)
    expected = getattr(estimator, "n_features_in_", X.shape[1])
    if X.shape[1] != expected:
        raise errors.InputError(
            f"X has {X.shape[1]} features, but the fitted {type(estimator).__name__} "
            f"expects {expected}: pass the data the model was trained on."
        )
    model._set_fitted(estimator, X, config, imported)
    return model


# --------------------------------------------------------------------------- neighbours
# NOTE: the frontend (fhe_quant/frontends/sklearn/neighbors.py) reads the model into a
# KNNSpec, fhe_quant/lower_knn.py builds its program, fhe_quant/program_modules.py its
# module; the estimator is built here so that the frontend never imports this module.


class _KNNMixin:
    """What the neighbours estimator changes in ``fhe_quant.sklearn``'s classifier."""

    sklearn_model_: Any
    quantized_module_: KNNModule

    @classmethod
    def _import_graph(cls, estimator: Any) -> None:
        _neighbors.check_knn_options(estimator)  # no graph: the points are read when fitted
        return None

    def _config(self) -> Any:
        config = super()._config()  # type: ignore[misc]
        if not isinstance(self.n_bits, int | np.integer) or isinstance(self.n_bits, bool):  # type: ignore[attr-defined]
            raise errors.ParameterError(
                "The 'n_bits' parameter of KNeighborsClassifier must be an int (the input "
                f"bits; there are no weights or activations). Got {self.n_bits!r} instead."  # type: ignore[attr-defined]
            )
        return config

    def _level_bits(self, n_classes: int) -> int:
        rounding = self.rounding_bits  # type: ignore[attr-defined]
        if rounding is None:
            return _knn.DEFAULT_LEVEL_BITS
        level = rounding - bits_for(n_classes - 1) - 1
        if level < 1:
            raise errors.ParameterError(
                "The 'rounding_bits' parameter of KNeighborsClassifier (the input width of "
                f"the compare tables) must be at least {bits_for(n_classes - 1) + 2} for "
                f"{n_classes} classes. Got {rounding} instead."
            )
        return level

    def _set_fitted(self, model: Any, X: np.ndarray, config: Any, imported: Any = None) -> None:
        module = build_knn_module(
            model,
            _neighbors.knn_spec(model, X),
            int(self.n_bits),
            self._level_bits(len(model.classes_)),  # type: ignore[attr-defined]
        )
        self.classes_ = model.classes_
        self.sklearn_model_ = model
        self.quantized_module_ = module
        self._output = "identity"
        self._ravel = False

    def fit(self, X: Any, y: Any, **fit_params: Any) -> Any:
        """Fit scikit-learn's classifier (it stores the training points), then quantize
        the points with ``X`` as calibration data.

        Raises:
            EstimatorParameterError: a constructor parameter out of range.
            errors.UnsupportedOpError: weights other than 'uniform', a non-euclidean
                metric, metric_params, or multi-output targets.
            errors.InputError: ``X`` or ``y`` with NaN/inf, strings, the wrong shape, one
                class only, or fewer samples than ``n_neighbors``.
        """
        self._config()  # type: ignore[attr-defined]
        _neighbors.check_knn_options(self._make_sklearn_model())  # type: ignore[attr-defined]
        return super().fit(X, y, **fit_params)  # type: ignore[misc]

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()  # type: ignore[misc]
        tags.target_tags.multi_output = False  # one label per sample (see check_knn_options)
        return tags


_KNN_DOC = """KNeighborsClassifier for encrypted inference: scikit-learn's
:class:`sklearn.neighbors.KNeighborsClassifier`, with the training points stored in clear
on the server and the client's sample encrypted (see
:mod:`fhe_quant.frontends.sklearn.neighbors` for the program and its exact cost).

Constructor parameters: those of scikit-learn's class (same names, same defaults), plus:

Args:
    n_bits: input bits (an int): every feature is clipped to its calibrated range and
        quantized with one step for all features. Default {n_bits}.
    rounding_bits: input width of the compare-exchange tables, ``e + L + 1`` with ``e``
        distance level bits and ``L`` label bits (``None``: ``e = {level}``, so 6 bits
        for 3 or 4 classes, 5 for 2).
    p_error: error probability of each table lookup in FHE.
    verbose: show progress bars.

Supported: ``weights='uniform'``, ``metric='minkowski'`` with ``p=2`` (or
``'euclidean'``); other options raise :class:`fhe_quant.errors.UnsupportedOpError`.
Cost: about ``N * n_neighbors`` table lookups per sample for ``N`` stored points; keep
``N`` to a few hundred.

Attributes:
    sklearn_model_: the fitted scikit-learn model (float).
    quantized_module_: the :class:`fhe_quant.program_modules.KNNModule`.
    classes_: the class labels.
    n_features_in_: number of features seen during ``fit``.
"""


KNeighborsClassifier = _make_estimator(
    _neighbors_sklearn.KNeighborsClassifier,
    type("_FHEKNeighborsClassifier", (_KNNMixin, _FHEClassifier), {}),
    _knn.DEFAULT_N_BITS,
)
KNeighborsClassifier.__doc__ = _KNN_DOC.format(
    n_bits=_knn.DEFAULT_N_BITS, level=_knn.DEFAULT_LEVEL_BITS
)
__all__.append("KNeighborsClassifier")
_WRAPPERS[KNeighborsClassifier._sklearn_class] = KNeighborsClassifier
