"""KNeighborsClassifier: the encrypted k-NN program against scikit-learn and itself."""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np
import pytest
import sklearn.exceptions
from sklearn.base import clone
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsClassifier as SkKNN
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fhe_quant.sklearn as fs
from fhe_quant import errors
from fhe_quant.lower import NUMPY
from fhe_quant.program_modules import KNNModule

#: Tiny error probability: any difference between modes is a bug, not noise.
P_ERROR = 1e-12


def _stored(iris: Any, every: int = 2) -> tuple[np.ndarray, np.ndarray]:
    x_train, _, y_train, _ = iris
    return x_train[::every], y_train[::every]


@pytest.fixture(scope="module")
def compiled(iris: Any) -> Any:
    """3 neighbours over 53 stored iris points, compiled once for the module."""
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(n_neighbors=3, p_error=P_ERROR).fit(x, y)
    model.compile(x)
    return model


def test_simulated_accuracy_within_one_point_of_float(compiled: Any, iris: Any) -> None:
    _, x_test, _, y_test = iris
    x, y = _stored(iris)
    float_acc = SkKNN(n_neighbors=3).fit(x, y).score(x_test, y_test)
    simulated = compiled.predict(x_test, fhe="simulate")
    clear = compiled.predict(x_test)
    np.testing.assert_array_equal(simulated, clear)  # disable == simulate, bit for bit
    assert float(np.mean(simulated == y_test)) >= float_acc - 0.01


def test_disable_equals_simulate_on_raw_votes(compiled: Any, iris: Any) -> None:
    module = compiled.quantized_module_
    x = np.concatenate([iris[1][:6], iris[1][:2] * 10.0])  # includes clipped inputs
    np.testing.assert_array_equal(
        module.forward_integers(x, fhe="simulate"), module.forward_integers(x)
    )
    proba = compiled.predict_proba(x)
    # Uniform votes: fractions of k that sum to one.
    np.testing.assert_array_equal(proba.sum(axis=1), np.ones(len(x)))
    np.testing.assert_array_equal(proba * 3, np.round(proba * 3))


def test_a_stored_point_is_its_own_nearest_neighbour(iris: Any) -> None:
    """At distance 0 (level 0), a stored point wins with 1 neighbour, unless a point with
    the same codes and a smaller label ties with it (ties go to the smaller label)."""
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(n_neighbors=1).fit(x, y)
    codes = model.quantized_module_.quantize_input(x)
    same = (codes[:, None, :] == codes[None, :, :]).all(axis=2)
    expected = np.where(same, y[None, :], np.iinfo(np.int64).max).min(axis=1)
    np.testing.assert_array_equal(model.predict(x), expected)


def test_program_votes_equal_a_clear_reference(compiled: Any, iris: Any) -> None:
    """The integer program's votes equal a direct computation: levels
    min(D >> t, 2^e - 1), packed with the label, k smallest, counted per class."""
    module = compiled.quantized_module_
    program = module.program
    q = module.quantize_input(np.concatenate([iris[1], iris[0][:20]]))
    dist = program.distances(q)
    level = np.minimum(dist >> program.shift, 2**program.level_bits - 1)
    packed = level * 2**program.label_bits + program.labels[None]
    np.testing.assert_array_equal(program.packed(q, NUMPY), packed)
    winners = np.sort(packed, axis=1)[:, : program.k] & (2**program.label_bits - 1)
    votes = np.stack([(winners == c).sum(axis=1) for c in range(program.n_classes)], axis=1)
    np.testing.assert_array_equal(program(q), votes)


def test_shift_best_reproduces_scikit_learn_on_calibration_data(iris: Any) -> None:
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(n_neighbors=3, n_bits=4).fit(x, y)
    program = model.quantized_module_.program
    target = model.sklearn_model_.predict(x)
    codes = model.quantized_module_.quantize_input(x)
    dist = program.distances(codes)

    def agreement(shift: int) -> int:
        level = np.minimum(dist >> shift, 2**program.level_bits - 1)
        packed = level * 2**program.label_bits + program.labels[None]
        winners = np.sort(packed, axis=1)[:, :3] & (2**program.label_bits - 1)
        votes = np.stack([(winners == c).sum(axis=1) for c in range(3)], axis=1)
        return int(np.sum(model.classes_[votes.argmax(axis=1)] == target))

    chosen = agreement(program.shift)
    assert all(agreement(shift) <= chosen for shift in range(program.width + 1))
    assert all(agreement(shift) < chosen for shift in range(program.shift))  # smallest


def test_statistics_report_and_source(compiled: Any, iris: Any) -> None:
    module = compiled.quantized_module_
    stats = module.statistics
    program = module.program
    n = len(program.points)
    assert stats["stored_points"] == n == 53
    planned = program.lookups_by_width()
    t, e, f = program.shift, program.level_bits, program.points.shape[1]
    far = any(stage.name == "far" for stage in program.steps)
    # The module docstring's count: squares, dropped bits, far flags, levels, top-k, votes.
    compares = n * 3 - 3 * 4 // 2
    expected = f + (n * (2 * t + e) + n if far else n * t) + n + compares + 3 * 3
    assert sum(planned.values()) == expected
    assert planned.get(1, 0) == (n * (2 * t + e) if far else n * t)
    assert stats["pbs_count"] >= sum(planned.values()) - planned.get(1, 0)
    report = compiled.report(iris[1], iris[3])
    assert set(report.scores) == {"float", "quantized (full tables)", "quantized", "simulate"}
    assert report.scores["simulate"] == report.scores["quantized"]
    assert "top_3" in report.program
    assert "top-k" in str(report)


@parametrize_with_checks([fs.KNeighborsClassifier()])
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


def test_clone_pipeline_and_grid_search(iris: Any) -> None:
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(n_neighbors=3, n_bits=3)
    assert clone(model).get_params() == model.get_params()
    pipe = Pipeline([("scale", StandardScaler()), ("knn", fs.KNeighborsClassifier())])
    assert pipe.fit(x, y).score(x, y) > 0.9
    search = GridSearchCV(model, {"n_neighbors": [1, 3], "n_bits": [2, 3]}, cv=3).fit(x, y)
    assert search.best_params_["n_bits"] in (2, 3)
    assert search.best_estimator_.predict(x).shape == y.shape


def test_deployment_client_quantizes_and_decodes_like_the_model(
    compiled: Any, iris: Any, tmp_path: Any
) -> None:
    """The saved client (clip chain, quantizer, vote dequantization, classes) is the
    model's: checked by FHEModelDev before saving, and here on clipped inputs."""
    from fhe_quant.deploy import FHEModelClient, FHEModelDev

    FHEModelDev(tmp_path, compiled).save()
    processing = FHEModelClient(tmp_path / "client").processing
    x = np.concatenate([iris[1], iris[1][:5] * 10.0])
    module = compiled.quantized_module_
    np.testing.assert_array_equal(processing.quantize(x), module.quantize_input(x))
    votes = module.forward_integers(x)
    np.testing.assert_array_equal(processing.dequantize(votes), compiled.predict_proba(x))


def test_pickle_keeps_the_program(compiled: Any, iris: Any) -> None:
    restored = pickle.loads(pickle.dumps(compiled))
    assert isinstance(restored.quantized_module_, KNNModule)
    np.testing.assert_array_equal(restored.predict(iris[1]), compiled.predict(iris[1]))
    # NOTE: the Concrete circuit is not pickled; the copy would compile it on first use
    # (tests/sklearn/test_pickling_estimators.py simulates such copies).
    circuit = restored.quantized_module_.fhe_circuit
    assert not circuit.is_compiled and compiled.quantized_module_.fhe_circuit.is_compiled
    np.testing.assert_array_equal(circuit.inputset, compiled.quantized_module_.fhe_circuit.inputset)


def test_from_sklearn_imports_without_refitting(iris: Any) -> None:
    x, y = _stored(iris)
    trained = SkKNN(n_neighbors=4).fit(x, y)
    model = fs.from_sklearn(trained, x, n_bits=3)
    assert type(model).__name__ == "KNeighborsClassifier"
    assert model.n_neighbors == 4 and model.n_bits == 3
    assert model.sklearn_model_ is not trained
    np.testing.assert_array_equal(model.classes_, trained.classes_)
    with pytest.raises(errors.InputError, match="features"):
        fs.from_sklearn(trained, x[:, :2])
    with pytest.raises(sklearn.exceptions.NotFittedError):
        fs.from_sklearn(SkKNN(), x)
    with pytest.raises(errors.UnsupportedOpError, match="weights='distance'"):
        fs.from_sklearn(SkKNN(weights="distance").fit(x, y), x)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["predict", "predict_proba", "compile", "report"])
def test_use_before_fit(method: str, iris: Any) -> None:
    with pytest.raises(errors.NotFittedError, match="not fitted yet"):
        getattr(fs.KNeighborsClassifier(), method)(iris[0])


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"weights": "distance"}, "weights='distance'"),
        ({"metric": "manhattan"}, "metric='manhattan'"),
        ({"p": 1}, "p=1"),
        ({"metric": "euclidean", "metric_params": {"w": None}}, "metric_params"),
    ],
)
def test_unsupported_options(params: dict[str, Any], match: str, iris: Any) -> None:
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(**params)
    with pytest.raises(errors.UnsupportedOpError, match=match):
        model.fit(x, y)
    assert not hasattr(model, "quantized_module_")


def test_bad_parameters(iris: Any) -> None:
    x, y = _stored(iris)
    with pytest.raises(errors.ParameterError, match="n_bits"):
        fs.KNeighborsClassifier(n_bits=9).fit(x, y)
    with pytest.raises(errors.ParameterError, match="'n_bits' parameter of KNeighbors"):
        fs.KNeighborsClassifier(n_bits={"inputs": 3}).fit(x, y)
    with pytest.raises(errors.ParameterError, match="rounding_bits"):
        fs.KNeighborsClassifier(rounding_bits=3).fit(x, y)  # 3 classes need >= 4
    with pytest.raises(errors.InputError, match="n_neighbors=9 exceeds the 5 stored"):
        fs.KNeighborsClassifier(n_neighbors=9).fit(x[:5], np.arange(5) % 2)
    with pytest.raises(errors.InputError, match="at least 2 classes"):
        fs.KNeighborsClassifier(n_neighbors=1).fit(x[:5], np.zeros(5))


def test_bad_inputs(compiled: Any, iris: Any) -> None:
    x = iris[1][:3]
    with pytest.raises(errors.InputError, match="features"):
        compiled.predict(x[:, :2])
    with pytest.raises(errors.InputError, match=r"NaN|inf"):
        compiled.predict(np.where(np.eye(3, 4, dtype=bool), np.nan, x))
    with pytest.raises(errors.InputError, match=r"NaN|inf"):
        compiled.predict(np.where(np.eye(3, 4, dtype=bool), np.inf, x))
    with pytest.raises(errors.InputError):
        compiled.predict(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(errors.ParameterError, match="'fhe' parameter"):
        compiled.predict(x, fhe="encrypted")


def test_rounding_bits_sets_the_compare_width(iris: Any) -> None:
    x, y = _stored(iris)
    model = fs.KNeighborsClassifier(n_neighbors=3, rounding_bits=5).fit(x, y)
    program = model.quantized_module_.program
    assert program.level_bits == 2 and program.value_bits == 5


@pytest.mark.slow
@pytest.mark.execute
def test_execute_equals_disable(iris: Any) -> None:
    # NOTE: 2-bit inputs keep the distances at 6 bits: the width of every encrypted value
    # sets Concrete's parameters, and so key generation time.
    x, y = _stored(iris, every=16)  # 7 stored points
    model = fs.KNeighborsClassifier(n_neighbors=3, n_bits=2, p_error=P_ERROR).fit(x, y)
    assert model.quantized_module_.program.width == 6
    model.compile(x)
    x_test = iris[1][:2]
    module = model.quantized_module_
    np.testing.assert_array_equal(
        module.forward_integers(x_test, fhe="execute"), module.forward_integers(x_test)
    )
