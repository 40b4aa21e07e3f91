"""The tutorial notebooks are committed with their outputs: their cells are exactly what
``notebooks/make_notebooks.py`` writes, they ran top to bottom once, each shows a
figure, and a fresh execution (nbclient, a new ``python3`` kernel, a scratch directory)
prints the same outputs.

"The same", robustly: the text written to stdout and the displayed values' text must be
equal once wall-clock times (a number followed by a time unit) and memory addresses are
masked; a displayed figure must be there in both, its PNG bytes are not compared (fonts
and library versions change them). stderr is not compared: warnings print the paths of
the machine they ran on.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
import time
from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
REGENERATE = "run `python notebooks/make_notebooks.py {name}` and commit the notebook"


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()

#: A wall-clock time: a number followed by a time unit ("7.4 s", "30 ms", "2 s/sample").
TIME = re.compile(
    r"\d[\d,]*(?:\.\d+)?(?:e[-+]?\d+)?(?=\s*(?:ns|us|µs|ms|s|sec|seconds?|min|minutes?)\b)"
)
ADDRESS = re.compile(r"\b0x[0-9a-fA-F]+\b")


def _mask(text: str) -> str:
    return ADDRESS.sub("0x<address>", TIME.sub("<time>", text))


def _text(value: Any) -> str:
    return "".join(value) if isinstance(value, list) else str(value)


def _normalised(cell: Any) -> list[str]:
    """What a code cell shows, as lines to compare (see the module docstring)."""
    lines: list[str] = []
    for output in cell.get("outputs", []):
        kind = output.output_type
        if kind == "stream" and output.name == "stdout":
            lines += [f"stdout: {line}" for line in _mask(_text(output.text)).splitlines()]
        elif kind in ("display_data", "execute_result"):
            lines.append(f"{kind}: {sorted(output.data)}")
            plain = _mask(_text(output.data.get("text/plain", "")))
            lines += [f"  {line}" for line in plain.splitlines()]
        elif kind == "error":
            lines.append(f"error: {output.ename}: {output.evalue}")
    return lines


def _images(notebook: Any) -> int:
    return sum(
        "image/png" in output.get("data", {})
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
    )


def _read(name: str) -> Any:
    return nbformat.read(NOTEBOOKS / name, as_version=4)


def test_committed_notebooks_are_the_generated_cells_executed_once() -> None:
    committed = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert committed == sorted(GENERATOR.NOTEBOOKS)
    for name, cells in GENERATOR.NOTEBOOKS.items():
        hint = REGENERATE.format(name=name)
        text = (NOTEBOOKS / name).read_text()
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
        assert text == GENERATOR.render(notebook), f"{name} was not written by the script: {hint}"
        sources = GENERATOR.render(GENERATOR.strip_outputs(notebook))
        assert sources == GENERATOR.render(GENERATOR.build(cells)), f"{name}: {hint}"
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        counts = [cell.execution_count for cell in code]
        assert counts == list(range(1, len(code) + 1)), f"{name} not run top to bottom: {hint}"
        assert not [line for c in code for line in _normalised(c) if line.startswith("error")]
        assert _images(notebook) >= 1, f"{name} shows no figure"


def test_the_comparison_masks_times_only() -> None:
    timed = ["wall clock: key generation 7.4 s, one run 12.00 s", "estimated 0.15 s/sample"]
    again = ["wall clock: key generation 0.3 s, one run 1,204.5 s", "estimated 3e-05 s/sample"]
    assert [_mask(t) for t in timed] == [_mask(t) for t in again]
    assert _mask("took 30 ms, then 2 min") == "took <time> ms, then <time> min"
    kept = "accuracy 0.880, 224 PBS, 84 bytes, 3 bits, 5 samples, class 7"
    assert _mask(kept) == kept
    assert _mask("<Circuit at 0x7f417d8ecf50>") == "<Circuit at 0x<address>>"


def test_the_comparison_sees_a_changed_number_or_a_lost_figure() -> None:
    notebook = _read("2_torch_post_training_quantization.ipynb")
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = next(c for c in code if any("accuracy 0." in line for line in _normalised(c)))
    before = _normalised(printed)
    stream = next(o for o in printed.outputs if o.output_type == "stream")
    stream.text = re.sub(r"accuracy 0\.\d", "accuracy 0.0", _text(stream.text), count=1)
    assert _normalised(printed) != before
    figure = next(c for c in code if any("image/png" in o.get("data", {}) for o in c.outputs))
    before = _normalised(figure)
    for output in figure.outputs:
        output.get("data", {}).pop("image/png", None)
    assert _normalised(figure) != before


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GENERATOR.NOTEBOOKS))
def test_a_fresh_execution_shows_the_committed_outputs(name: str, tmp_path: Path) -> None:
    start = time.perf_counter()
    # raises CellExecutionError, with the cell and its traceback, on any error
    fresh = GENERATOR.execute(GENERATOR.build(GENERATOR.NOTEBOOKS[name]), tmp_path)
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    committed = _read(name)
    assert len(fresh.cells) == len(committed.cells)
    for index, (new, old) in enumerate(zip(fresh.cells, committed.cells, strict=True)):
        expected, got = _normalised(old), _normalised(new)
        diff = "\n".join(difflib.unified_diff(expected, got, "committed", "fresh", lineterm=""))
        assert got == expected, f"{name}, cell {index}:\n{diff}\n{REGENERATE.format(name=name)}"
