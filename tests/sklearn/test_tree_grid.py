"""The threshold grid, the client's input encoding of tree models: exact compares,
validation of every field, and saving/loading it as data in the client artifact."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fhe_quant.sklearn as fs
from fhe_quant.deploy import FHEModelClient, FHEModelDev
from fhe_quant.deploy.artifact import _ClientProcessing
from fhe_quant.errors import DeploymentError
from fhe_quant.quant.quantizer import ThresholdGrid


@pytest.mark.parametrize("float32_inputs", [True, False])
def test_codes_decide_every_compare_exactly(float32_inputs: bool) -> None:
    rng = np.random.default_rng(0)
    thresholds = np.sort(rng.normal(size=7))
    if float32_inputs:  # the tree frontend stores the largest float32 <= t
        thresholds = thresholds.astype(np.float32).astype(np.float64)
    grid = ThresholdGrid(3, thresholds, np.array([7]), float32_inputs)
    probes = np.concatenate(
        [rng.normal(size=200), thresholds, np.nextafter(thresholds, np.inf), [-np.inf, np.inf]]
    )
    codes = grid.quantize(probes[:, None])[:, 0]
    x = probes.astype(np.float32).astype(np.float64) if float32_inputs else probes
    for j, t in enumerate(thresholds):
        np.testing.assert_array_equal(codes <= j, x <= t)
    assert codes.min() == 0 and codes.max() == 7


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"bits": 0}, "'bits'"),
        ({"bits": 1}, "counts"),  # 2 thresholds do not fit 1 bit
        ({"values": np.array([1.0, np.nan, 3.0])}, "finite"),
        ({"values": np.array([2.0, 1.0, 3.0])}, "increase"),
        ({"counts": np.array([2, 2])}, "sum"),
        ({"counts": np.array([2.0, 1.0])}, "int array"),
        ({"float32_inputs": 1}, "bool"),
    ],
)
def test_bad_fields_are_named(kwargs: dict, match: str) -> None:
    fields = {"bits": 2, "values": np.array([1.0, 2.0, 0.0]), "counts": np.array([2, 1])}
    fields["float32_inputs"] = True
    with pytest.raises(ValueError, match=match):
        ThresholdGrid(**{**fields, **kwargs})


def test_thresholds_may_restart_between_features_and_features_may_have_none() -> None:
    grid = ThresholdGrid(2, np.array([5.0, 1.0, 2.0]), np.array([0, 1, 2]))
    assert grid.quantize(np.array([[9.0, 9.0, 1.5]])).tolist() == [[0, 1, 1]]
    with pytest.raises(ValueError, match="NaN"):
        grid.quantize(np.array([[np.nan, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="3 features"):
        grid.quantize(np.zeros((2, 4)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: Any, load: Any) -> tuple[Path, Any, np.ndarray]:
    x_train, x_test, y_train, _ = load("breast_cancer")
    model = fs.RandomForestClassifier(n_estimators=3, max_depth=3, random_state=0)
    model.fit(x_train, y_train).compile(x_train[:8])
    root = tmp_path_factory.mktemp("tree_artifact")
    FHEModelDev(root, model).save()
    return root, model, x_test


def test_the_client_artifact_holds_the_grid_as_arrays(saved: Any) -> None:
    root, model, x_test = saved
    client = FHEModelClient(root / "client")
    grid = client.processing.input_quantizer
    assert isinstance(grid, ThresholdGrid)
    np.testing.assert_array_equal(
        grid.values, model.quantized_module_.program.input_quantizer.values
    )
    np.testing.assert_array_equal(
        client.processing.quantize(x_test), model.quantized_module_.quantize_input(x_test)
    )
    data = json.loads((root / "client" / "model.json").read_text())
    assert data["input_quantizer"] == {
        "kind": "threshold_grid",
        "bits": grid.bits,
        "float32_inputs": True,
    }
    with np.load(root / "client" / "model.npz", allow_pickle=False) as arrays:
        assert {"input.values", "input.counts"} <= set(arrays.files)


def _rewrite(directory: Path, edit: Any) -> Path:
    with np.load(directory / "model.npz", allow_pickle=False) as arrays:
        loaded = {name: arrays[name] for name in arrays.files}
    edit(loaded)
    buffer = io.BytesIO()
    np.savez(buffer, **loaded)
    (directory / "model.npz").write_bytes(buffer.getvalue())
    return directory


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda a: a.update({"input.values": a["input.values"][::-1].copy()}), "increase"),
        (lambda a: a.update({"input.counts": a["input.counts"] * 9}), "counts"),
        (lambda a: a.pop("input.values"), "input.values"),
        (lambda a: a.update({"input.values": np.array(["x"] * 3)}), "finite"),
    ],
)
def test_a_corrupt_grid_is_a_deployment_error(
    saved: Any, tmp_path: Path, edit: Any, match: str
) -> None:
    root, _, _ = saved
    copy = tmp_path / "client"
    copy.mkdir()
    for name in ("model.json", "model.npz"):
        (copy / name).write_bytes((root / "client" / name).read_bytes())
    with pytest.raises(DeploymentError, match=match):
        _ClientProcessing.load(_rewrite(copy, edit))
