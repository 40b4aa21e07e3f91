"""k-NN under the one step protocol (issue 13 part 3): the frontend reads the model into a
KNNSpec, fhe_quant.lower_knn builds the program from runnable steps, and the module has
no statistics of its own."""

from __future__ import annotations

import importlib
import warnings

import numpy as np
import pytest
from sklearn.neighbors import KNeighborsClassifier

from fhe_quant import errors
from fhe_quant.frontends.sklearn import neighbors
from fhe_quant.lower import NUMPY, ProgramStep
from fhe_quant.lower_knn import KNNProgram, KNNStep, lower_knn
from fhe_quant.model import QuantizedModule
from fhe_quant.program_modules import KNNModule, build_knn_module
from fhe_quant.specs import KNNSpec


@pytest.fixture(scope="module")
def fitted() -> tuple[KNeighborsClassifier, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30, 3))
    y = (x[:, 0] > 0).astype(int) + (x[:, 1] > 0.8)
    return KNeighborsClassifier(n_neighbors=3).fit(x, y), x


def test_the_frontend_reads_a_plain_spec(fitted) -> None:
    model, x = fitted
    spec = neighbors.knn_spec(model, x)
    assert isinstance(spec, KNNSpec)
    assert spec.points.shape == (30, 3) and spec.k == 3 and spec.n_classes == 3
    np.testing.assert_array_equal(spec.target, model.predict(x))
    with pytest.raises(errors.InputError, match="n_neighbors=5 exceeds the 3 stored"):
        neighbors.knn_spec(KNeighborsClassifier(n_neighbors=5).fit(x[:3], [0, 1, 1]), x)
    with pytest.raises(ValueError, match="one label per point"):
        KNNSpec(spec.points, spec.labels[:-1], 3, 3, x, spec.target)


def test_every_stage_is_a_step_that_runs(fitted) -> None:
    model, x = fitted
    program = lower_knn(neighbors.knn_spec(model, x), 3).program
    assert all(isinstance(step, ProgramStep) for step in program.steps)
    names = [step.name for step in program.steps]
    assert names[0] == "squares" and names[-3:] == ["top-k", "labels", "votes"]
    q = program.input_quantizer.quantize(np.clip(x - x.min(axis=0), 0, None))
    values = program.values(q)
    np.testing.assert_array_equal(values[-1], program(q))
    np.testing.assert_array_equal(values[len(program.steps) - 3], program.packed(q, NUMPY))
    # the votes of the top-k reproduce the reference computed in clear from distances
    dist = program.distances(q)
    level = np.minimum(dist >> program.shift, 2**program.level_bits - 1)
    packed = level * 2**program.label_bits + program.labels[None]
    winners = np.sort(packed, axis=1)[:, :3] & (2**program.label_bits - 1)
    votes = np.stack([(winners == c).sum(axis=1) for c in range(3)], axis=1)
    np.testing.assert_array_equal(program(q), votes)


def test_lookups_and_statistics_come_from_the_steps(fitted) -> None:
    model, x = fitted
    module = build_knn_module(model, neighbors.knn_spec(model, x), 3)
    program = module.program
    assert "statistics" not in vars(KNNModule)  # no override: the program's own
    total: dict[int, int] = {}
    for step in program.steps:
        for width, n in step.lookups_by_width().items():
            total[width] = total.get(width, 0) + n
    assert program.lookups_by_width() == total
    stats = module.statistics
    assert stats["layers"] == [step.statistics().row() for step in program.steps]
    assert stats["stored_points"] == 30 and stats["planned_pbs_per_precision"] == total
    top = next(s for s in program.steps if isinstance(s, KNNStep) and s.name == "top-k")
    assert top.stage.lookups == program.n_compares == 30 * 3 - 3 * 4 // 2
    assert top.statistics().row()["lookups"] == program.n_compares
    names = ["q"] + [f"v{k + 1}" for k in range(len(program.steps))]
    assert top.describe(names).startswith(f"top-k(v{program.steps.index(top)})  # ")
    assert f"{program.n_compares} lookups of {program.value_bits} bits" in top.describe(names)


def test_a_module_with_the_program_statistics_is_a_plain_quantized_module(fitted) -> None:
    model, x = fitted
    module = build_knn_module(model, neighbors.knn_spec(model, x), 3)
    assert isinstance(module, QuantizedModule) and isinstance(module.program, KNNProgram)
    np.testing.assert_allclose(module.float_forward(x[:4]), model.predict_proba(x[:4]))


@pytest.mark.parametrize("name", sorted(neighbors.MOVED))
def test_moved_names_still_resolve_with_a_deprecation_warning(name: str) -> None:
    with pytest.warns(DeprecationWarning, match=f"neighbors.{name} moved to"):
        value = getattr(neighbors, name)
    assert value is getattr(importlib.import_module(neighbors.MOVED[name]), name)
    with pytest.raises(AttributeError):
        neighbors.not_a_name  # noqa: B018


def test_deprecated_knn_to_module_builds_the_same_module(fitted) -> None:
    model, x = fitted
    with pytest.warns(DeprecationWarning, match="knn_to_module is deprecated"):
        old = neighbors.knn_to_module(model, x, 3)
    new = build_knn_module(model, neighbors.knn_spec(model, x), 3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert old.program.source() == new.program.source()
    np.testing.assert_array_equal(old.forward_integers(x), new.forward_integers(x))
