"""The tutorial notebooks: each one runs top to bottom without an error (executed with
nbclient in a fresh kernel, in a scratch directory, with matplotlib's non-interactive
backend), and the committed files are exactly what ``notebooks/make_notebooks.py``
writes, without outputs."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
#: Seconds one cell may take (a slow, shared machine) before the test fails.
CELL_TIMEOUT = 600


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", NOTEBOOKS / "make_notebooks.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GENERATOR = _generator()


def test_committed_notebooks_are_generated_and_have_no_outputs() -> None:
    committed = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert committed == sorted(GENERATOR.NOTEBOOKS)
    for name, cells in GENERATOR.NOTEBOOKS.items():
        text = (NOTEBOOKS / name).read_text()
        assert text == GENERATOR.render(cells), f"{name}: run notebooks/make_notebooks.py"
        notebook = nbformat.reads(text, as_version=4)
        nbformat.validate(notebook)
        code = [cell for cell in notebook.cells if cell.cell_type == "code"]
        assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(GENERATOR.NOTEBOOKS))
def test_notebook_runs_top_to_bottom(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # NOTE: the kernel inherits the environment: Agg draws figures without a display.
    monkeypatch.setenv("MPLBACKEND", "Agg")
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError, with the cell and traceback, on any error
    elapsed = time.perf_counter() - start
    errors = [
        output
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.outputs
        if output.output_type == "error"
    ]
    assert not errors
    print(f"{name}: {elapsed:.1f} s")
