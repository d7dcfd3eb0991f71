"""Notebooks run top to bottom offline."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
    notebook = nbformat.read(NOTEBOOKS / "quickstart.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    assert "reload exact" in outputs and "held-out NLL" in outputs
    assert any("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


@pytest.mark.slow
def test_results_notebook_plots_every_benchmark_result():
    notebook = nbformat.read(NOTEBOOKS / "results.ipynb", as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    outputs = "".join(o.get("text", "") for cell in notebook.cells for o in cell.get("outputs", []))
    results = {path.stem for path in (NOTEBOOKS.parent / "benchmarks" / "results").glob("*.json")}
    plotted = {"overhead", "quality", "bake_forward", "selection_scaling", "memory_store", "ddp_scaling"} & results
    assert all(name in outputs.split("plotted:")[-1] for name in plotted), outputs[-500:]
    assert sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", [])) >= 2
