"""Tree models: the tensor form, exact decisions on the input grid, the integer program
in the three ``fhe`` modes, the scikit-learn contract and every error path."""

from __future__ import annotations

import pickle
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
from sklearn import ensemble as sk_ensemble
from sklearn import tree as sk_tree
from sklearn.base import clone, is_classifier
from sklearn.datasets import make_classification
from sklearn.linear_model import LinearRegression as SkLinearRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks

import fhe_quant.sklearn as fs
from fhe_quant import errors
from fhe_quant.frontends.sklearn import OUTPUT_FUNCTIONS
from fhe_quant.frontends.sklearn.tree import TREE_CLASSES, check_ensemble, ensemble_from_sklearn
from fhe_quant.lower import TableStep
from fhe_quant.lower_tree import NARROWING_BUDGET, TreeQuantConfig, threshold_grid
from fhe_quant.sklearn import _tree_builder

#: The module of a fitted scikit-learn tree model (what the estimators build).
build_tree_module = _tree_builder(ensemble_from_sklearn, check_ensemble)

#: Per-lookup error probability for exactness tests: any mismatch is then a real bug.
TINY_P_ERROR = 1e-12

#: (estimator, data set) pairs for the metric tests, at the default bits.
_METRIC_CASES = [
    (fs.DecisionTreeClassifier, "breast_cancer"),
    (fs.RandomForestClassifier, "breast_cancer"),
    (fs.ExtraTreesClassifier, "wine"),
    (fs.GradientBoostingClassifier, "iris"),
    (fs.DecisionTreeRegressor, "diabetes"),
    (fs.RandomForestRegressor, "diabetes"),
    (fs.ExtraTreesRegressor, "regression"),
    (fs.GradientBoostingRegressor, "diabetes"),
]


def _small(cls: type, **params: Any) -> Any:
    """A small model of ``cls`` (few trees, shallow), for the quick tests."""
    defaults: dict[str, Any] = {"random_state": 0, "max_depth": 3}
    if "n_estimators" in cls().get_params():
        defaults["n_estimators"] = 4
    return cls(**{**defaults, **params})


def _fit(model: Any, load: Any, name: str | None = None) -> tuple[Any, np.ndarray, np.ndarray]:
    name = name or ("iris" if is_classifier(model) else "diabetes")
    x_train, x_test, y_train, _ = load(name)
    return model.fit(x_train, y_train), x_train, x_test


# --------------------------------------------------------------------------- tensor form


@pytest.mark.parametrize("sk_class", TREE_CLASSES, ids=lambda c: c.__name__)
def test_tensor_form_reproduces_sklearn(sk_class: type, load: Any) -> None:
    x_train, x_test, y_train, _ = load("wine" if is_classifier(sk_class()) else "diabetes")
    model = _small(sk_class).fit(x_train, y_train)
    ensemble = ensemble_from_sklearn(model)
    check_ensemble(model, ensemble, x_test)  # raises TraceError on any difference
    raw = ensemble.evaluate(x_test)
    if is_classifier(model):
        np.testing.assert_allclose(
            OUTPUT_FUNCTIONS[ensemble.output](raw), model.predict_proba(x_test), rtol=1e-9
        )
    else:
        np.testing.assert_allclose(raw[:, 0], model.predict(x_test), rtol=1e-9)
    trees = np.asarray(getattr(model, "estimators_", [model]), dtype=object).size
    assert len(np.unique(ensemble.tree)) == trees
    assert np.all(ensemble.depth <= 3)


def test_a_mistranslation_is_caught(load: Any) -> None:
    x_train, x_test, y_train, _ = load("iris")
    model = sk_tree.DecisionTreeClassifier(max_depth=3, random_state=0).fit(x_train, y_train)
    ensemble = ensemble_from_sklearn(model)
    wrong = type(ensemble)(**{**vars(ensemble), "threshold": ensemble.threshold + 0.5})
    with pytest.raises(errors.TraceError, match="predict_proba"):
        check_ensemble(model, wrong, x_test)


def _probes(module: Any, x: np.ndarray) -> np.ndarray:
    """``x``, and inputs on every threshold of the grid and on the float32 values just
    above and below it (where a wrong compare would show)."""
    grid = module.program.input_quantizer
    rows = [x]
    for f in range(grid.n_features):
        for t in grid.thresholds(f):
            for value in (
                np.nextafter(np.float32(t), np.float32(-np.inf)),
                t,
                np.nextafter(np.float32(t), np.float32(np.inf)),
            ):
                row = x[0].copy()
                row[f] = float(value)
                rows.append(row[None, :])
    return np.vstack(rows)


def _reached_codes(model: Any, module: Any, x: np.ndarray) -> np.ndarray:
    """The sum of the integer values of the leaves scikit-learn's own ``apply`` reaches."""
    reached = model.sklearn_model_.apply(x.astype(np.float32)).reshape(len(x), -1)
    ensemble = module.ensemble
    leaf_index = {
        (int(t), int(n)): i
        for i, (t, n) in enumerate(zip(ensemble.tree, ensemble.node, strict=True))
    }
    leaf_codes = module.quantized.leaf_codes
    return sum(
        leaf_codes[[leaf_index[(t, int(node))] for node in reached[:, t]]]
        for t in range(reached.shape[1])
    )


def _keeps_every_threshold(module: Any) -> bool:
    """Whether the grid holds every threshold no float32 input falls between."""
    ensemble = module.ensemble
    t32 = ensemble.threshold.astype(np.float32)
    below = np.where(t32 > ensemble.threshold, np.nextafter(t32, np.float32(-np.inf)), t32)
    counts = module.program.input_quantizer.counts
    return all(len(np.unique(below[ensemble.feature == f])) == c for f, c in enumerate(counts))


@pytest.mark.parametrize(
    "cls",
    [
        fs.DecisionTreeClassifier,
        fs.RandomForestRegressor,
        fs.ExtraTreesClassifier,
        fs.GradientBoostingClassifier,
    ],
    ids=lambda c: c.__name__,
)
@pytest.mark.parametrize("n_bits", [4, 6])
def test_every_input_reaches_the_float_trees_leaves(cls: type, n_bits: int, load: Any) -> None:
    """On every input (random, on the thresholds and next to them), the encrypted sum is
    exactly the sum of the integer values of the leaves scikit-learn's own ``apply``
    reaches: on the threshold grid the quantized trees decide exactly like the float
    trees, and the grouped leaf tables pick the right leaf."""
    model, x_train, x_test = _fit(_small(cls, n_bits=n_bits, max_depth=4), load)
    exact = TreeQuantConfig(n_bits, narrow=False)
    module = build_tree_module(model.sklearn_model_, exact, x_train)
    assert _keeps_every_threshold(module)
    x = _probes(module, x_test)
    np.testing.assert_array_equal(
        module.program(module.quantize_input(x)), _reached_codes(model, module, x)
    )


def test_merged_grid_decides_like_the_snapped_thresholds(load: Any) -> None:
    """A grid too narrow for a feature's thresholds keeps some: every compare is then
    exactly ``x <= kept threshold`` (or a constant), on every input."""
    x_train, x_test, y_train, _ = load("breast_cancer")
    sk = sk_ensemble.RandomForestClassifier(n_estimators=6, max_depth=4, random_state=0)
    sk.fit(x_train, y_train)
    ensemble = ensemble_from_sklearn(sk)
    grid, k = threshold_grid(ensemble, x_train, 2)
    assert grid.bits == 2 and grid.counts.max() == 3
    assert len(np.unique(ensemble.threshold)) > grid.counts.sum()  # some were merged
    kept = [grid.thresholds(f) for f in range(grid.n_features)]
    snapped = np.array(
        [
            -np.inf if j < 0 else np.inf if j >= len(kept[f]) else kept[f][j]
            for f, j in zip(ensemble.feature, k, strict=True)
        ]
    )
    module = fs.RandomForestClassifier(n_estimators=6, max_depth=4, random_state=0, n_bits=2)
    module = module.fit(x_train, y_train).quantized_module_
    x = _probes(module, x_test)
    snapped_ensemble = type(ensemble)(**{**vars(ensemble), "threshold": snapped})
    bits = (x.astype(np.float32)[:, ensemble.feature] <= snapped).astype(np.int64)
    reached = (bits @ ensemble.path.T + ensemble.n_negated) == ensemble.depth
    np.testing.assert_array_equal(
        module.program(module.quantize_input(x)),
        reached.astype(np.int64) @ module.quantized.leaf_codes,
    )
    # merging changed few decisions: the forest keeps most of its accuracy on its data
    assert (
        np.mean(
            snapped_ensemble.evaluate(x_train).argmax(1) == ensemble.evaluate(x_train).argmax(1)
        )
        > 0.9
    )


def test_the_default_grid_is_the_cheapest_that_keeps_the_decisions(load: Any) -> None:
    """``narrow`` takes the grid below what the thresholds need when the decisions on the
    calibration data stay within the budget, and never past it."""
    from fhe_quant import lower_tree as trees

    x_train, x_test, y_train, y_test = load("breast_cancer")
    model = fs.RandomForestClassifier(n_estimators=8, max_depth=4, random_state=0)
    model.fit(x_train, y_train)
    exact = model.quantized_module_  # the default keeps every threshold
    assert _keeps_every_threshold(exact)
    module = build_tree_module(model.sklearn_model_, TreeQuantConfig(5, narrow=True), x_train)
    assert module.program.input_bits < exact.program.input_bits
    assert trees._price(module.program) < trees._price(exact.program)
    ensemble = module.ensemble
    assert trees._agreement(ensemble, module.program, x_train) >= (
        trees._agreement(ensemble, exact.program, x_train) - NARROWING_BUDGET
    )
    labels = model.classes_[(module.forward(x_test)[:, 0] > 0).astype(int)]
    assert np.mean(labels == y_test) >= model.sklearn_model_.score(x_test, y_test) - 0.01
    with pytest.raises(errors.ParameterError, match="'narrow'"):
        TreeQuantConfig(4, narrow=1)


def test_compares_are_shared_and_constants_cost_nothing(load: Any) -> None:
    x_train, _, y_train, _ = load("breast_cancer")
    model = fs.RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0, n_bits=3)
    model.fit(x_train, y_train)
    module = model.quantized_module_
    compare, leaves = [s for s in module.program.steps if isinstance(s, TableStep)]
    ensemble = module.ensemble
    # Distinct (feature, grid threshold) pairs, from the tables themselves.
    thresholds = compare.table.sum(axis=1) - 1
    gather = module.program.steps[0].weight
    pairs = set(zip(gather.argmax(axis=1).tolist(), thresholds.tolist(), strict=True))
    assert len(pairs) == compare.table.shape[0] < len(ensemble.feature)
    counts = module.program.input_quantizer.counts[gather.argmax(axis=1)]
    assert np.all((thresholds >= 0) & (thresholds < counts))  # no constant compare is looked up
    # Binary classes: one output, so leaves are grouped into fewer tables than leaves.
    assert leaves.table.shape[0] < len(ensemble.values)
    assert leaves.index_bits <= 3  # groups narrower than the 3-bit grid, or as narrow
    lookups = module.program.lookups_by_width()
    assert sum(lookups.values()) == compare.table.shape[0] + leaves.table.shape[0]


def test_multiclass_forest_matches_each_leaf(load: Any) -> None:
    x_train, _, y_train, _ = load("iris")
    model = fs.RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0)
    module = model.fit(x_train, y_train).quantized_module_
    leaves = [s for s in module.program.steps if isinstance(s, TableStep)][1]
    # One 0/1 match table per reachable leaf (class probabilities: three outputs).
    assert set(np.unique(leaves.table)) <= {0, 1}
    assert module.program.output_step.weight.shape == (3, leaves.table.shape[0])


def test_output_sum_is_proven_within_the_leaf_bits(load: Any) -> None:
    x_train, x_test, y_train, _ = load("diabetes")
    for bits in (4, 8, 12):
        model = fs.GradientBoostingRegressor(
            n_estimators=10, random_state=0, n_bits={"inputs": 4, "outputs": bits}
        ).fit(x_train, y_train)
        out = model.quantized_module_.program.output_step
        assert out.acc_bits <= bits
        acc = model.quantized_module_.forward_integers(np.vstack([x_train, x_test]))
        assert acc.min() >= 0 and np.all(acc <= out.acc_max)


# --------------------------------------------------------------------------- fhe modes


@pytest.mark.parametrize(("cls", "data"), _METRIC_CASES, ids=lambda v: getattr(v, "__name__", v))
def test_simulated_metric_matches_float(cls: type, data: str, load: Any) -> None:
    x_train, x_test, y_train, y_test = load(data)
    model = cls(random_state=0, p_error=TINY_P_ERROR).fit(x_train, y_train)
    model.compile(x_train)
    simulated = model.predict(x_test, fhe="simulate")
    np.testing.assert_array_equal(simulated, model.predict(x_test))
    float_score = model.sklearn_model_.score(x_test, y_test)
    score = model._score(y_test, simulated)
    assert score >= float_score - 0.01, (float_score, score)


@pytest.mark.parametrize(
    "cls",
    [
        fs.DecisionTreeRegressor,
        fs.ExtraTreesClassifier,
        fs.RandomForestClassifier,
        fs.GradientBoostingRegressor,
    ],
    ids=lambda c: c.__name__,
)
def test_disable_equals_simulate_bit_for_bit(cls: type, load: Any) -> None:
    model, x_train, x_test = _fit(_small(cls, p_error=TINY_P_ERROR, n_bits=4), load)
    model.compile(x_train[:8])
    module = model.quantized_module_
    x = np.vstack([x_test[:30], x_train.min(axis=0) - 1.0, x_train.max(axis=0) + 1.0])
    np.testing.assert_array_equal(
        module.forward_integers(x, fhe="simulate"), module.forward_integers(x)
    )
    stats = module.statistics
    assert stats["pbs_count"] == sum(module.program.lookups_by_width().values())
    # the leaf sum is proven within its default bits (8, plus 1 for these 4 trees)
    assert stats["max_bit_width"] <= module.program.output_step.acc_bits <= 9


def test_only_leaf_values_are_rounded(load: Any) -> None:
    """With every threshold on the grid, the raw outputs differ from the float model's
    only by the rounding of the leaf values: at most half a step per tree (each tree
    reaches one leaf), on any input."""
    x_train, x_test, y_train, _ = load("breast_cancer")
    for model in (
        fs.RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0),
        fs.GradientBoostingClassifier(n_estimators=5, random_state=0),
        fs.GradientBoostingRegressor(n_estimators=5, random_state=0, n_bits={"outputs": 5}),
    ):
        model.fit(x_train, y_train)
        config = replace(model.quantized_module_.quantized.config, input_bits=6, narrow=False)
        module = build_tree_module(model.sklearn_model_, config, x_train)
        assert _keeps_every_threshold(module)
        step = module.program.output_step.scale
        n_trees = len(np.unique(module.ensemble.tree))
        error = np.abs(module.forward(x_test) - module.float_forward(x_test))
        assert np.all(error <= n_trees * step / 2 + 1e-9)


def test_predict_proba_and_decision_function(load: Any) -> None:
    x_train, x_test, y_train, _ = load("breast_cancer")
    forest = fs.RandomForestClassifier(n_estimators=5, max_depth=3, random_state=0)
    forest.fit(x_train, y_train)
    proba = forest.predict_proba(x_test)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(forest.predict(x_test), forest.classes_[proba.argmax(axis=1)])
    assert not hasattr(forest, "decision_function")  # as scikit-learn's forests
    boosted = fs.GradientBoostingClassifier(n_estimators=5, random_state=0)
    boosted.fit(x_train, y_train)
    decision = boosted.decision_function(x_test)
    assert decision.shape == (len(x_test),)
    np.testing.assert_allclose(boosted.predict_proba(x_test)[:, 1], 1 / (1 + np.exp(-decision)))
    np.testing.assert_array_equal(boosted.predict(x_test), (decision > 0).astype(int))


def test_multioutput_regression(load: Any) -> None:
    x_train, x_test, _, _ = load("diabetes")
    y = np.stack([x_train[:, 0] + x_train[:, 1], x_train[:, 2]], axis=1)
    model = fs.RandomForestRegressor(n_estimators=3, max_depth=3, random_state=0).fit(x_train, y)
    assert model.predict(x_test).shape == (len(x_test), 2)
    assert fs.DecisionTreeRegressor().fit(x_train, y[:, 0]).predict(x_test).shape == (len(x_test),)


def test_inputs_outside_the_calibration_range_are_clipped(load: Any) -> None:
    model, x_train, x_test = _fit(_small(fs.GradientBoostingRegressor), load)
    low, high = x_train.min(axis=0), x_train.max(axis=0)
    far = np.vstack([low - 1e6, high + 1e6, x_test[:5] * 1e3])
    np.testing.assert_array_equal(model.predict(far), model.predict(np.clip(far, low, high)))


def test_constant_model_compiles(load: Any) -> None:
    x_train, x_test, _, _ = load("diabetes")
    model = fs.DecisionTreeRegressor(p_error=TINY_P_ERROR).fit(x_train, np.full(len(x_train), 3.5))
    assert len(model.quantized_module_.program.steps) == 1
    model.compile(x_train[:4])
    np.testing.assert_allclose(model.predict(x_test[:3], fhe="simulate"), 3.5)


@pytest.mark.slow
@pytest.mark.execute
def test_decision_tree_execute(load: Any) -> None:
    x_train, x_test, y_train, _ = load("breast_cancer")
    model = fs.DecisionTreeClassifier(max_depth=3, random_state=0, n_bits=4, p_error=TINY_P_ERROR)
    model.fit(x_train, y_train)
    model.compile(x_train)
    module = model.quantized_module_
    np.testing.assert_array_equal(
        module.forward_integers(x_test[:2], fhe="execute"), module.forward_integers(x_test[:2])
    )


# --------------------------------------------------------------------------- sklearn contract


def _expected_failures(estimator: Any) -> dict[str, str]:
    """Checks these estimators cannot pass: only the one scikit-learn's own gradient
    boosting fails too (it lists it among its expected failures)."""
    if isinstance(estimator, fs.GradientBoostingRegressor):
        return {
            "check_sample_weight_equivalence_on_dense_data": (
                "as scikit-learn's GradientBoostingRegressor: sample_weight is not "
                "equivalent to removing or repeating samples"
            )
        }
    return {}


@parametrize_with_checks(
    [fs.DecisionTreeClassifier(), fs.GradientBoostingRegressor(n_estimators=5)],
    expected_failed_checks=_expected_failures,
)
def test_sklearn_estimator_checks(estimator: Any, check: Any) -> None:
    check(estimator)


def test_defaults_names_and_signatures() -> None:
    pairs = [
        (fs.DecisionTreeClassifier, sk_tree.DecisionTreeClassifier, {"max_depth": 5}),
        (fs.RandomForestRegressor, sk_ensemble.RandomForestRegressor, {"n_estimators": 20}),
        (fs.GradientBoostingClassifier, sk_ensemble.GradientBoostingClassifier, {}),
    ]
    for ours, theirs, changed in pairs:
        params = ours().get_params()
        assert set(params) - set(theirs().get_params()) <= {
            "n_bits",
            "rounding_bits",
            "p_error",
            "verbose",
        }
        for name, value in changed.items():
            assert params[name] == value and f"``{name}={value!r}``" in ours.__doc__
        assert params["n_bits"] == (5 if is_classifier(ours()) else 6)
    assert fs.RandomForestClassifier().max_depth == 4
    assert fs.GradientBoostingRegressor().n_estimators == 20


def test_clone_grid_search_pipeline_and_cross_validation(load: Any) -> None:
    x_train, x_test, y_train, y_test = load("iris")
    model = fs.DecisionTreeClassifier(max_depth=3, n_bits=4)
    copy = clone(model)
    assert copy.get_params() == model.get_params() and copy is not model
    search = GridSearchCV(
        fs.DecisionTreeClassifier(random_state=0), {"n_bits": [1, 5], "max_depth": [2, 3]}, cv=3
    )
    search.fit(x_train, y_train)
    assert search.best_params_["n_bits"] == 5  # a 2-point grid cannot split iris well
    assert search.best_estimator_.quantized_module_.quantized.config.input_bits == 5
    assert search.score(x_test, y_test) > 0.9
    pipeline = make_pipeline(StandardScaler(), fs.GradientBoostingClassifier(n_estimators=5))
    assert pipeline.fit(x_train, y_train).score(x_test, y_test) > 0.9
    scores = cross_val_score(fs.RandomForestClassifier(n_estimators=3), x_train, y_train, cv=3)
    assert scores.shape == (3,) and scores.min() > 0.8


def test_n_bits_roles(load: Any) -> None:
    model, _, _ = _fit(fs.DecisionTreeRegressor(n_bits={"inputs": 3, "outputs": 10}), load)
    config = model.quantized_module_.quantized.config
    assert (config.input_bits, config.leaf_bits) == (3, 10)
    assert model.quantized_module_.program.input_bits == 3
    assert model.quantized_module_.program.output_step.acc_bits <= 10
    assert TreeQuantConfig.from_n_bits(6) == TreeQuantConfig(6, None)


def test_pickle_rebuilds_the_same_program(load: Any) -> None:
    for cls in (fs.RandomForestClassifier, fs.GradientBoostingRegressor):
        model, _, x_test = _fit(_small(cls), load)
        restored = pickle.loads(pickle.dumps(model))
        np.testing.assert_array_equal(
            restored.quantized_module_.forward_integers(x_test),
            model.quantized_module_.forward_integers(x_test),
        )
        assert restored.quantized_module_.program.source() == (
            model.quantized_module_.program.source()
        )


@pytest.mark.parametrize("sk_class", TREE_CLASSES, ids=lambda c: c.__name__)
def test_from_sklearn_imports_without_refitting(sk_class: type, load: Any) -> None:
    x_train, x_test, y_train, _ = load("iris")
    trained = _small(sk_class, max_depth=2).fit(x_train, y_train)
    model = fs.from_sklearn(trained, x_train, n_bits=6)
    assert type(model).__name__ == sk_class.__name__ and model.n_bits == 6
    assert model.sklearn_model_ is not trained
    assert model.get_params()["max_depth"] == 2
    ours, theirs = model.predict(x_test), trained.predict(x_test)
    if is_classifier(trained):
        assert np.mean(ours == theirs) > 0.95
    else:
        assert np.abs(ours - theirs).max() < 0.5  # iris labels 0..2 as targets


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("method", ["predict", "compile", "predict_proba", "report"])
def test_use_before_fit(method: str, load: Any) -> None:
    x_train, _, _, _ = load("iris")
    model = fs.RandomForestClassifier()
    with pytest.raises(fs.EstimatorNotFittedError):
        getattr(model, method)(x_train) if method != "report" else model.report()


def test_fhe_modes_before_compile(load: Any) -> None:
    model, _, x_test = _fit(_small(fs.GradientBoostingClassifier), load)
    for method in ("predict", "predict_proba", "decision_function"):
        with pytest.raises(errors.NotCompiledError, match="compile"):
            getattr(model, method)(x_test, fhe="simulate")
    with pytest.raises(errors.ParameterError, match="'fhe'"):
        model.predict(x_test, fhe="encrypted")


def test_bad_inputs(load: Any) -> None:
    model, _, x_test = _fit(_small(fs.DecisionTreeClassifier), load)
    with pytest.raises(errors.InputError, match="features"):
        model.predict(x_test[:, :3])
    for bad in (np.nan, np.inf):
        x = x_test.copy()
        x[1, 2] = bad
        with pytest.raises(errors.InputError):
            model.predict(x)
    with pytest.raises(errors.InputError):
        model.predict(np.array([["a", "b", "c", "d"]]))
    with pytest.raises(errors.InputError):
        fs.DecisionTreeRegressor().fit(x_test, np.where(np.arange(len(x_test)) == 0, np.nan, 1.0))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (fs.GradientBoostingClassifier(init=SkLinearRegression()), "init"),
        (fs.GradientBoostingClassifier(loss="exponential"), "exponential"),
        (fs.DecisionTreeClassifier(rounding_bits=4), "rounding_bits"),
        (fs.DecisionTreeClassifier(n_bits={"weights": 4}), "unknown key 'weights'"),
        (fs.DecisionTreeClassifier(n_bits={"outputs": 17}), "leaf_bits"),
        (fs.DecisionTreeClassifier(n_bits=9), "n_bits"),
        (fs.RandomForestClassifier(n_estimators=0), "n_estimators"),
    ],
    ids=["init", "exponential", "rounding_bits", "dict-key", "leaf-bits", "n_bits", "sklearn"],
)
def test_unsupported_options_and_bad_parameters(model: Any, match: str) -> None:
    x, y = make_classification(n_samples=60, n_features=4, random_state=0)
    with pytest.raises((errors.UnsupportedOpError, errors.ParameterError), match=match):
        model.fit(x, y)
    assert not hasattr(model, "quantized_module_")


def test_multioutput_classification_is_unsupported() -> None:
    x, y = make_classification(n_samples=60, n_features=4, random_state=0)
    with pytest.raises(errors.UnsupportedOpError, match="target columns"):
        fs.DecisionTreeClassifier().fit(x, np.stack([y, 1 - y], axis=1))


def test_from_sklearn_errors(load: Any) -> None:
    x_train, _, y_train, _ = load("iris")
    with pytest.raises(fs.EstimatorNotFittedError):
        fs.from_sklearn(sk_tree.DecisionTreeClassifier(), x_train)
    trained = sk_tree.DecisionTreeClassifier(max_depth=2).fit(x_train, y_train)
    with pytest.raises(errors.InputError, match="features"):
        fs.from_sklearn(trained, x_train[:, :2])
    with pytest.raises(errors.UnsupportedOpError, match=r"HistGradientBoosting.*RandomForest"):
        fs.from_sklearn(sk_ensemble.HistGradientBoostingClassifier().fit(x_train, y_train), x_train)


def test_report_scores_and_cost(load: Any) -> None:
    model, x_train, _ = _fit(_small(fs.RandomForestRegressor, p_error=TINY_P_ERROR), load)
    _, _, _, y_test = load("diabetes")
    _, x_test, _, _ = load("diabetes")
    model.compile(x_train[:8])
    report = model.report(x_test[:20], y_test[:20])
    assert report.metric == "r2" and report.scores["simulate"] == report.scores["quantized"]
    assert report.pbs_count == sum(report.pbs_per_precision.values())
    assert "leaf_tables" in report.program and "round_bit_pattern" not in report.program


@pytest.mark.slow
@pytest.mark.execute
@pytest.mark.parametrize(
    "model",
    [
        fs.DecisionTreeClassifier(max_depth=3, random_state=0, n_bits=4, p_error=TINY_P_ERROR),
        fs.GradientBoostingClassifier(
            n_estimators=3, max_depth=2, random_state=0, n_bits=4, p_error=TINY_P_ERROR
        ),
    ],
    ids=["binary-tree", "multiclass-boosting"],
)
def test_deployed_tree_decodes_like_the_estimator(model: Any, load: Any, tmp_path: Any) -> None:
    from fhe_quant.deploy import FHEModelClient, FHEModelDev, FHEModelServer

    x_train, x_test, y_train, _ = load("breast_cancer" if "Decision" in repr(model) else "iris")
    model.fit(x_train, y_train)
    model.compile(x_train)
    FHEModelDev(tmp_path, model).save()
    client = FHEModelClient(tmp_path / "client", key_dir=tmp_path / "keys")
    server = FHEModelServer(tmp_path / "server")
    keys = client.get_serialized_evaluation_keys()
    x = x_test[:2]
    results = [server.run(c, keys) for c in client.quantize_encrypt_serialize(x)]
    np.testing.assert_array_equal(client.predict(results), model.predict(x, fhe="simulate"))
    np.testing.assert_array_equal(
        client.predict_proba(results), model.predict_proba(x, fhe="simulate")
    )
