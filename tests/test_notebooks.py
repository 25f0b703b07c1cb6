"""The notebooks in docs/notebooks: stored with their outputs (figures included) so they
read on a repository page, and re-executed top to bottom at small settings (CI=1)."""

import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "docs" / "notebooks").glob("*.ipynb"))
# a cell that ends in a call returning a figure shows it
FIGURE_CALL = re.compile(r"(plots\.\w+\(|labelled_rows\(|figures\[\"\w+\"\])[^\n]*\)?\s*$")


def plotting_cells(notebook):
    return [c for c in notebook.cells if c.cell_type == "code"
            and FIGURE_CALL.search(c.source.strip().splitlines()[-1] if c.source.strip() else "")]


def images(cell) -> list:
    return [o for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]


def stderr(notebook) -> list[str]:
    return ["".join(o["text"]) for c in notebook.cells for o in c.get("outputs", [])
            if o.get("output_type") == "stream" and o.get("name") == "stderr"]


def test_both_notebooks_are_stored_with_their_figures_and_under_1_mb():
    assert [p.name for p in NOTEBOOKS] == ["posterior_diagnostics.ipynb", "swap_likelihood.ipynb"]
    for path in NOTEBOOKS:
        assert path.stat().st_size < 1024**2
        notebook = nbformat.read(path, as_version=4)
        cells = plotting_cells(notebook)
        assert len(cells) >= 3
        assert all(images(c) for c in cells), path.name
        assert not stderr(notebook), path.name
        assert all(o.get("output_type") != "error" for c in notebook.cells
                   for o in c.get("outputs", []))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
@pytest.mark.slow
def test_notebook_executes_and_shows_every_figure_inline(path, tmp_path, monkeypatch):
    monkeypatch.setenv("CI", "1")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # as Jupyter runs it
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    errors = [o for c in notebook.cells for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors
    assert all(images(c) for c in plotting_cells(notebook))
    assert not any("<Figure size" in str(o) for c in notebook.cells
                   for o in c.get("outputs", []))
    assert not stderr(notebook)  # no warnings
    assert os.listdir(tmp_path) == []  # trains in memory; writes nothing
