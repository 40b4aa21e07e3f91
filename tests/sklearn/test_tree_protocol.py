"""Trees under issue 13 part 3: the frontend reads the fitted model into a TreeEnsemble
(fhe_quant.specs), fhe_quant.lower_tree lowers it, fhe_quant.program_modules wraps it;
the names that moved still resolve from the frontend, with a DeprecationWarning."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from sklearn.tree import DecisionTreeClassifier

from fhe_quant.frontends.sklearn import tree
from fhe_quant.lower import ProgramStep
from fhe_quant.lower_tree import TreeQuantConfig, quantize_ensemble
from fhe_quant.model import QuantizedModule
from fhe_quant.program_modules import TreeModule, build_tree_ensemble_module
from fhe_quant.sklearn import _tree_builder
from fhe_quant.specs import TreeEnsemble


@pytest.fixture(scope="module")
def fitted() -> tuple[DecisionTreeClassifier, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 4))
    y = (x[:, 0] + x[:, 1] * x[:, 2] > 0).astype(int)
    return DecisionTreeClassifier(max_depth=4, random_state=0).fit(x, y), x


def test_the_frontend_emits_a_spec_the_lowering_reads(fitted) -> None:
    model, x = fitted
    ensemble = tree.ensemble_from_sklearn(model)
    assert isinstance(ensemble, TreeEnsemble) and tree.TreeEnsemble is TreeEnsemble
    program, _ = quantize_ensemble(ensemble, x, TreeQuantConfig(4))
    assert all(isinstance(step, ProgramStep) for step in program.steps)
    assert [s.name for s in program.steps] == [
        "gather",
        "compare",
        "paths",
        "leaf_tables",
        "leaves",
    ]
    module = build_tree_ensemble_module(ensemble, TreeQuantConfig(4), x)
    assert isinstance(module, TreeModule) and isinstance(module, QuantizedModule)
    assert "statistics" not in vars(TreeModule)
    # the program's own rows: the compare and leaf tables merged into their layers
    assert [row["layer"] for row in module.statistics["layers"]] == ["gather", "paths", "leaves"]
    raw = module.dequantize_output(module.forward_integers(x))
    assert np.mean((raw[:, 0] > 0) == model.predict(x).astype(bool)) > 0.95


def test_a_range_instead_of_data_needs_both_ends(fitted) -> None:
    model, x = fitted
    ensemble = tree.ensemble_from_sklearn(model)
    ranged = build_tree_ensemble_module(
        ensemble, TreeQuantConfig(4), low=x.min(axis=0), high=x.max(axis=0)
    )
    assert ranged.program.input_shape == (4,)
    with pytest.raises(Exception, match="needs calibration data x, or low and high"):
        build_tree_ensemble_module(ensemble, TreeQuantConfig(4), low=x.min(axis=0))


@pytest.mark.parametrize("name", sorted(tree.MOVED))
def test_moved_names_still_resolve_with_a_deprecation_warning(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"tree.{name} moved to"):
        value = getattr(tree, name)
    assert value is getattr(importlib.import_module(tree.MOVED[name]), name)


def test_deprecated_build_tree_module_builds_the_same_module(fitted) -> None:
    model, x = fitted
    with pytest.warns(DeprecationWarning, match="build_tree_module is deprecated"):
        old = tree.build_tree_module(model, TreeQuantConfig(4), x)
    new = _tree_builder(tree.ensemble_from_sklearn, tree.check_ensemble)(
        model, TreeQuantConfig(4), x
    )
    assert old.program.source() == new.program.source()
    np.testing.assert_array_equal(old.forward_integers(x), new.forward_integers(x))


def test_deprecated_build_boosting_module_builds_the_same_module() -> None:
    xgb = pytest.importorskip("xgboost")
    from fhe_quant.frontends.sklearn import boosting

    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 3))
    model = xgb.XGBRegressor(n_estimators=3, max_depth=2).fit(x, x[:, 0] - x[:, 1])
    with pytest.warns(DeprecationWarning, match="build_boosting_module is deprecated"):
        old = boosting.build_boosting_module(model, TreeQuantConfig(4), x)
    new = _tree_builder(boosting.ensemble_from_booster, boosting.check_booster)(
        model, TreeQuantConfig(4), x
    )
    np.testing.assert_array_equal(old.forward_integers(x), new.forward_integers(x))
