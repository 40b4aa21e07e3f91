"""Report.plot: one bar per layer whose height is its lookups, coloured by table width
and annotated with the table's bits; accumulator bits on a twin axis; layers named on
the x axis. Drawn with matplotlib's Agg backend, read back from the artists."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

from fhe_quant.report import Report  # noqa: E402
from fhe_quant.torch import compile_torch_model  # noqa: E402

LAYERS = [
    {"layer": "fc1", "accumulator_bits": 11, "truncated_bits": 6, "table_input_bits": 5,
     "table_output_bits": 3, "lookups": 24},
    {"layer": "fc2", "accumulator_bits": 9, "truncated_bits": 5, "table_input_bits": 4,
     "table_output_bits": 4, "lookups": 7},
    {"layer": "fc3", "accumulator_bits": 8},
]  # fmt: skip


def _report(layers: list[dict]) -> Report:
    return Report(
        metric=None, scores={}, layers=layers, input_bits=4, pbs_count=31, max_bit_width=11
    )


def _bars(ax) -> list[Rectangle]:
    return [patch for container in ax.containers for patch in container]


def _twin(ax):
    (twin,) = [other for other in ax.figure.axes if other is not ax]
    return twin


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_one_bar_per_layer_with_its_lookups_and_names() -> None:
    ax = _report(LAYERS).plot()
    bars = _bars(ax)
    assert [bar.get_height() for bar in bars] == [24, 7, 0]
    assert [label.get_text() for label in ax.get_xticklabels()] == ["fc1", "fc2", "fc3"]
    # each bar sits over its layer's tick
    centres = [bar.get_x() + bar.get_width() / 2 for bar in bars]
    assert np.allclose(centres, ax.get_xticks())
    annotations = sorted(text.get_text() for text in ax.texts)
    assert annotations == sorted(["5→3", "4→4", "no table"])
    assert ax.get_title() == "inputs 4 bits, 31 PBS per sample"


def test_colours_follow_table_width_and_accumulators_are_on_a_twin_axis() -> None:
    ax = _report(LAYERS).plot()
    fc1, fc2, fc3 = (tuple(bar.get_facecolor()) for bar in _bars(ax))
    assert fc1 != fc2 and fc3 == matplotlib.colors.to_rgba("lightgrey")
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["tables read 4 bits", "tables read 5 bits", "accumulator bits"]
    (line,) = _twin(ax).get_lines()
    assert list(line.get_xdata()) == [0, 1, 2]
    assert list(line.get_ydata()) == [11, 9, 8]
    assert _twin(ax).get_ylim()[1] > 11


def test_draws_in_the_axes_it_is_given() -> None:
    _, (left, right) = plt.subplots(1, 2)
    assert _report(LAYERS[:1]).plot(ax=right) is right
    assert not _bars(left) and [bar.get_height() for bar in _bars(right)] == [24]


def test_a_compiled_models_report(digits) -> None:
    x_train = digits[0]
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 6), torch.nn.ReLU(), torch.nn.Linear(6, 10))
    qm = compile_torch_model(net, x_train[:200], n_bits=3, compile=False)
    report = qm.report()
    ax = report.plot()
    names = [layer["layer"] for layer in report.layers]
    assert [label.get_text() for label in ax.get_xticklabels()] == names
    assert [bar.get_height() for bar in _bars(ax)] == [6, 0]  # one lookup per hidden neuron
    accumulators = [layer["accumulator_bits"] for layer in report.layers]
    assert list(_twin(ax).get_lines()[0].get_ydata()) == accumulators


def test_without_matplotlib_the_error_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.raises(ImportError, match=r"pip install 'fhe-quant\[plot\]'"):
        _report(LAYERS).plot()
