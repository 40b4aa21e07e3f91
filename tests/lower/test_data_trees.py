"""Tree programs are plain data too: their input encoding, a ThresholdGrid, has a data
form (its fields and thresholds), so ``IntegerProgram.from_dict(program.to_dict())`` of a
decision tree, forest or boosted ensemble computes the identical integers."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from shared_helpers import through_json
from sklearn.datasets import load_breast_cancer, load_diabetes

import fhe_quant.sklearn as fs
from fhe_quant.lower import IntegerProgram
from fhe_quant.quant.quantizer import ThresholdGrid


def _estimator(name: str) -> Any:
    if name.startswith("XGB"):
        pytest.importorskip("xgboost")
    if name.startswith("LGBM"):
        pytest.importorskip("lightgbm")
    options: dict[str, Any] = {"n_bits": 4}
    if name not in ("DecisionTreeClassifier", "DecisionTreeRegressor"):
        options["n_estimators"] = 4
    return getattr(fs, name)(max_depth=3, **options)


NAMES = [
    "DecisionTreeClassifier",
    "DecisionTreeRegressor",
    "RandomForestClassifier",
    "RandomForestRegressor",
    "GradientBoostingClassifier",
    "GradientBoostingRegressor",
    "XGBClassifier",
    "XGBRegressor",
    "LGBMClassifier",
    "LGBMRegressor",
]


@pytest.mark.parametrize("name", NAMES)
def test_tree_programs_round_trip_to_identical_integers(name: str) -> None:
    loader = load_diabetes if name.endswith("Regressor") else load_breast_cancer
    x, y = loader(return_X_y=True)
    x_train, x_test, y_train = x[:300], x[300:], y[:300]
    model = _estimator(name).fit(x_train, y_train)
    program = model.quantized_module_.program
    assert isinstance(program.input_quantizer, ThresholdGrid)
    again = IntegerProgram.from_dict(through_json(program.to_dict()))
    grid = again.input_quantizer
    assert isinstance(grid, ThresholdGrid)
    assert grid.bits == program.input_quantizer.bits
    assert grid.float32_inputs == program.input_quantizer.float32_inputs
    q = program.input_quantizer.quantize(x_test)
    np.testing.assert_array_equal(grid.quantize(x_test), q)
    np.testing.assert_array_equal(again(q), program(q))
    assert again.source() == program.source()
    assert again.lookups_by_width() == program.lookups_by_width()


def test_a_bad_grid_in_a_program_is_refused_naming_the_field() -> None:
    x, y = load_breast_cancer(return_X_y=True)
    data = fs.DecisionTreeClassifier(max_depth=2, n_bits=3).fit(x, y).quantized_module_.program
    data = data.to_dict()
    grid = data["input_quantizer"]
    cases = [
        ({**grid, "values": np.full_like(grid["values"], np.nan)}, "finite floats"),
        ({**grid, "counts": grid["counts"].tolist()}, "must be a NumPy array"),
        ({key: v for key, v in grid.items() if key != "counts"}, "needs exactly the keys"),
        ({**grid, "bits": 9}, "bits"),
        ({**grid, "kind": "uniform"}, "unknown keys"),
    ]
    for bad, match in cases:
        with pytest.raises(ValueError, match=rf"IntegerProgram\.input_quantizer: .*{match}"):
            IntegerProgram.from_dict({**data, "input_quantizer": bad})


def test_a_grid_round_trips_with_its_arrays_inside_or_apart() -> None:
    grid = ThresholdGrid(3, np.array([0.5, 1.5, -2.0, 0.0, 4.0]), np.array([2, 0, 3]), False)
    for again in (
        ThresholdGrid.from_dict(grid.to_dict()),
        ThresholdGrid.from_dict(
            {k: v for k, v in grid.to_dict().items() if k not in grid.arrays()}, grid.arrays()
        ),
    ):
        np.testing.assert_array_equal(again.values, grid.values)
        np.testing.assert_array_equal(again.counts, grid.counts)
        assert (again.bits, again.float32_inputs) == (3, False)
    with pytest.raises(ValueError, match="needs exactly the keys"):
        ThresholdGrid.from_dict(grid.to_dict(), grid.arrays())  # arrays twice
