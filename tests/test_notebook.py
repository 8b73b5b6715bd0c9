"""The example notebook runs from top to bottom on the real default base (CI budget: 10 minutes)."""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "preference_vectors.ipynb"


def test_notebook_is_valid_nbformat():
    import nbformat

    nbformat.validate(nbformat.read(NOTEBOOK, as_version=4))


@pytest.mark.base
def test_notebook_runs():
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": NOTEBOOK.parent}}).execute()
    outputs = "".join(
        output.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])
    )
    assert "cosine(helpful, harmless)" in outputs and "η_helpful=1, η_harmless=1" in outputs
    assert "chosen η:" in outputs and "'adapter', 'frontier.png', 'report.json', 'report.md'" in outputs
    sources = "".join(cell.source for cell in notebook.cells if cell.cell_type == "code")
    assert "from lora_arith" not in sources  # the top-level API only
    assert any(
        "image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", [])
    )
