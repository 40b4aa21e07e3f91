"""XGBoost and LightGBM: trees read from the libraries' dumps, the tree lowering unchanged."""

from __future__ import annotations

import pickle
import sys
from typing import Any

import numpy as np
import pytest

import fhe_quant.sklearn as fs
from fhe_quant import errors
from fhe_quant.frontends.sklearn import boosting
from fhe_quant.lower_tree import TreeQuantConfig
from fhe_quant.sklearn import _tree_builder

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

TINY_P_ERROR = 1e-12

#: (our wrapper, the library class, data set)
_CASES = [
    ("XGBClassifier", xgb.XGBClassifier, "breast_cancer"),
    ("XGBClassifier", xgb.XGBClassifier, "wine"),
    ("XGBRegressor", xgb.XGBRegressor, "diabetes"),
    ("LGBMClassifier", lgb.LGBMClassifier, "breast_cancer"),
    ("LGBMClassifier", lgb.LGBMClassifier, "wine"),
    ("LGBMRegressor", lgb.LGBMRegressor, "diabetes"),
]


def _ids(value: Any) -> str:
    return getattr(value, "__name__", str(value))


def _library_model(library_class: type, **params: Any) -> Any:
    if library_class.__module__.startswith("lightgbm"):
        params.setdefault("verbose", -1)
    return library_class(**params)


@pytest.mark.parametrize(("name", "library_class", "data"), _CASES, ids=_ids)
def test_tensor_form_gives_the_library_margins(
    name: str, library_class: type, data: str, load: Any
) -> None:
    x_train, x_test, y_train, _ = load(data)
    model = _library_model(library_class, n_estimators=10, max_depth=3).fit(x_train, y_train)
    ensemble = boosting.ensemble_from_booster(model)
    margins = boosting._margins(model, x_test)
    np.testing.assert_allclose(ensemble.evaluate(x_test), margins, rtol=1e-6, atol=1e-5)
    assert ensemble.float32_inputs == name.startswith("XGB")


@pytest.mark.parametrize(("name", "library_class", "data"), _CASES, ids=_ids)
def test_six_bits_keep_the_library_score(
    name: str, library_class: type, data: str, load: Any
) -> None:
    x_train, x_test, y_train, y_test = load(data)
    model = getattr(fs, name)(n_bits=6, random_state=0).fit(x_train, y_train)
    ours = model.score(x_test, y_test)
    theirs = model.sklearn_model_.score(x_test, y_test)
    # NOTE: issue 17's targets. The threshold grid makes every compare exact (measured
    # before it: LightGBM on breast_cancer 94.2% vs 95.3%, XGBoost on diabetes R² 0.243
    # vs 0.281); what is left is the rounding of the leaf values.
    assert model.quantized_module_.program.input_bits <= 5  # every threshold kept
    assert ours >= theirs - (0.005 if model._metric == "accuracy" else 0.01), (ours, theirs)
    default = getattr(fs, name)(random_state=0).fit(x_train, y_train)
    assert default.score(x_test, y_test) >= theirs - (
        0.005 if model._metric == "accuracy" else 0.01
    )


@pytest.mark.parametrize("library", ["xgboost", "lightgbm"])
def test_splits_on_their_thresholds_decide_like_the_library(library: str) -> None:
    # Integer features: the libraries put thresholds on (or next to) the values, so the
    # inputs below sit exactly on thresholds and on the float next to them.
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, size=(300, 3)).astype(np.float64)
    y = (x[:, 0] >= 4) ^ (x[:, 1] == 2)
    cls = xgb.XGBClassifier if library == "xgboost" else lgb.LGBMClassifier
    model = _library_model(cls, n_estimators=5, max_depth=3).fit(x, y)
    ensemble = boosting.ensemble_from_booster(model)
    if library == "xgboost":
        # stored float32 threshold t: the ensemble holds prev32(t)
        stored = np.nextafter(ensemble.threshold.astype(np.float32), np.float32(np.inf))
        probes = [stored, np.nextafter(stored, np.float32(-np.inf))]
    else:
        stored = ensemble.threshold
        probes = [stored, np.nextafter(stored, np.inf)]
    rows = []
    for values in probes:
        for f, t in zip(ensemble.feature, values, strict=True):
            row = x[0].copy()
            row[f] = float(t)
            rows.append(row)
    probe = np.asarray(rows)
    np.testing.assert_allclose(
        ensemble.evaluate(probe), boosting._margins(model, probe), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize(
    ("name", "data", "n_bits"),
    [("XGBClassifier", "wine", 4), ("LGBMRegressor", "diabetes", 5)],
)
@pytest.mark.slow
def test_simulate_equals_disable(name: str, data: str, n_bits: int, load: Any) -> None:
    x_train, x_test, y_train, _ = load(data)
    model = getattr(fs, name)(n_estimators=5, max_depth=3, n_bits=n_bits, p_error=TINY_P_ERROR)
    model.fit(x_train, y_train)
    model.compile(x_train[:20])
    module = model.quantized_module_
    np.testing.assert_array_equal(
        module.forward_integers(x_test, fhe="simulate"), module.forward_integers(x_test)
    )
    np.testing.assert_array_equal(model.predict(x_test, fhe="simulate"), model.predict(x_test))


@pytest.mark.parametrize("name", ["XGBClassifier", "LGBMClassifier"])
@pytest.mark.slow
@pytest.mark.execute
def test_execute(name: str, load: Any) -> None:
    x_train, x_test, y_train, _ = load("breast_cancer")
    model = getattr(fs, name)(n_estimators=3, max_depth=2, n_bits=4, p_error=TINY_P_ERROR)
    model.fit(x_train, y_train)
    model.compile(x_train[:20])
    module = model.quantized_module_
    assert module.statistics["max_bit_width"] <= 9  # the leaf sum of 3 trees: 8 + 1 bits
    np.testing.assert_array_equal(
        module.forward_integers(x_test[:2], fhe="execute"), module.forward_integers(x_test[:2])
    )


# --------------------------------------------------------------------------- the estimators


@pytest.mark.parametrize(("name", "library_class", "data"), _CASES[1:3] + _CASES[4:], ids=_ids)
def test_from_sklearn_and_pickle(name: str, library_class: type, data: str, load: Any) -> None:
    x_train, x_test, y_train, _ = load(data)
    trained = _library_model(library_class, n_estimators=5, max_depth=3).fit(x_train, y_train)
    model = fs.from_sklearn(trained, x_train, n_bits=5)
    assert type(model) is getattr(fs, name) and model.n_bits == 5
    assert model.sklearn_model_ is not trained and model.n_estimators == 5
    if hasattr(trained, "classes_"):
        np.testing.assert_array_equal(model.classes_, trained.classes_)
        agree = np.mean(model.predict(x_test) == trained.predict(x_test))
        assert agree >= 0.95
    copy = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(copy.predict(x_test), model.predict(x_test))


def test_labels_defaults_and_signature(load: Any) -> None:
    x_train, x_test, y_train, _ = load("wine")
    labels = np.array(["a", "b", "c"])[y_train]
    model = fs.XGBClassifier(n_estimators=5).fit(x_train, labels)
    assert list(model.classes_) == ["a", "b", "c"]
    assert set(model.predict(x_test)) <= {"a", "b", "c"}
    assert fs.XGBClassifier().get_params()["max_depth"] == 4
    assert fs.LGBMRegressor().get_params()["num_leaves"] == 15
    assert "``n_estimators=20``" in fs.LGBMClassifier.__doc__
    assert fs.XGBClassifier().n_bits == 5 and fs.XGBRegressor().n_bits == 6
    with pytest.raises(TypeError):
        fs.XGBClassifier(not_a_parameter=1)


# --------------------------------------------------------------------------- bad input


def test_categorical_splits_are_refused_by_tree_and_node() -> None:
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.integers(0, 6, 400), rng.normal(size=400)]).astype(np.float64)
    y = np.isin(x[:, 0], [1, 4]).astype(int)
    model = xgb.XGBClassifier(
        n_estimators=2, max_depth=2, enable_categorical=True, feature_types=["c", "q"]
    ).fit(x, y)
    with pytest.raises(errors.UnsupportedOpError, match=r"categorical split.*tree 0, node 0"):
        boosting.ensemble_from_booster(model)
    light = lgb.LGBMClassifier(
        n_estimators=2, verbose=-1, min_child_samples=5, min_data_per_group=5, cat_smooth=1
    )
    light.fit(x, y, categorical_feature=[0])
    with pytest.raises(errors.UnsupportedOpError, match=r"categorical split.*tree 0, node 0"):
        fs.from_sklearn(light, x)


def test_too_deep_and_too_many_trees_name_the_tree(
    monkeypatch: pytest.MonkeyPatch, load: Any
) -> None:
    x_train, _, y_train, _ = load("breast_cancer")
    model = xgb.XGBClassifier(n_estimators=6, max_depth=3).fit(x_train, y_train)
    monkeypatch.setattr(boosting, "MAX_DEPTH", 2)
    with pytest.raises(errors.UnsupportedOpError, match=r"depth 3.*'tree 0, node \d+'"):
        fs.from_sklearn(model, x_train)
    monkeypatch.setattr(boosting, "MAX_DEPTH", 31)
    monkeypatch.setattr(boosting, "MAX_TREES", 4)
    with pytest.raises(errors.UnsupportedOpError, match=r"'6 trees'.*tree 4"):
        fs.from_sklearn(model, x_train)
    wrapper = fs.XGBClassifier(n_estimators=6, max_depth=2)
    with pytest.raises(errors.UnsupportedOpError, match="n_estimators"):
        wrapper.fit(x_train, y_train)
    assert not hasattr(wrapper, "quantized_module_")  # nothing half-fitted


def test_unsupported_options_are_named(load: Any) -> None:
    x_train, _, y_train, _ = load("breast_cancer")
    hinge = xgb.XGBClassifier(n_estimators=2, objective="binary:hinge").fit(x_train, y_train)
    with pytest.raises(errors.UnsupportedOpError, match="binary:hinge"):
        fs.from_sklearn(hinge, x_train)
    missing = xgb.XGBClassifier(n_estimators=2, missing=0.0).fit(x_train, y_train)
    with pytest.raises(errors.UnsupportedOpError, match=r"missing=0\.0"):
        fs.from_sklearn(missing, x_train)
    dart = xgb.XGBClassifier(n_estimators=2, booster="dart").fit(x_train, y_train)
    with pytest.raises(errors.UnsupportedOpError, match="dart"):
        fs.from_sklearn(dart, x_train)


def test_nan_inputs_are_refused(load: Any) -> None:
    x_train, x_test, y_train, _ = load("breast_cancer")
    model = fs.LGBMClassifier(n_estimators=3).fit(x_train, y_train)
    bad = x_test[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(errors.InputError, match="NaN"):
        model.predict(bad)
    assert model.predict(x_test[:3]).shape == (3,)  # still usable


def test_missing_library_is_an_import_error_with_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    with pytest.raises(ImportError, match=r"fhe-quant\[boosting\]"):
        fs._boosting_wrapper.__wrapped__("LGBMRegressor")


def test_quiet_lightgbm(capfd: pytest.CaptureFixture[str], load: Any) -> None:
    x_train, _, y_train, _ = load("diabetes")
    fs.LGBMRegressor(n_estimators=3).fit(x_train[:40], y_train[:40])
    assert "[LightGBM]" not in capfd.readouterr().out


def test_zero_as_missing_is_checked_per_node() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2))
    x[::3, 0] = 0.0
    y = x[:, 0] > 0.2
    model = lgb.LGBMClassifier(
        n_estimators=3, verbose=-1, zero_as_missing=True, min_child_samples=5
    ).fit(x, y)
    try:
        ensemble = boosting.ensemble_from_booster(model)
    except errors.UnsupportedOpError as exc:
        assert "tree" in str(exc) and "zero_as_missing=False" in str(exc)
    else:
        boosting.check_booster(model, ensemble, x)
        config = TreeQuantConfig(5)
        assert _tree_builder(boosting.ensemble_from_booster, boosting.check_booster)(
            model, config, x
        ).float_forward(x).shape == (300, 1)
