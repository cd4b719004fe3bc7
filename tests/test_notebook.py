"""The example notebook runs headless (as CI runs it)."""

from pathlib import Path

import pytest

from tests.conftest import REPO, requires_ffmpeg, requires_shared

pytestmark = [requires_ffmpeg, requires_shared, pytest.mark.shared_data, pytest.mark.slow]


@pytest.mark.parametrize(
    "notebook", sorted((REPO / "notebooks").glob("*.ipynb")), ids=lambda p: p.name
)
def test_notebook_executes(notebook: Path, monkeypatch, shared_dir, tmp_path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("BUZZDASK_SHARED_DIR", str(shared_dir))
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the kernel's results, not left in /tmp
    monkeypatch.setenv("MPLBACKEND", "Agg")
    book = nbformat.read(notebook, as_version=4)
    nbclient.NotebookClient(
        book,
        timeout=600,
        kernel_name="python3",
        resources={"metadata": {"path": str(notebook.parent)}},
    ).execute()
    if notebook.name == "example.ipynb":
        # analyze()'s progress bar is tqdm's notebook widget, not text in the cell's output.
        outputs = [o for cell in book.cells if "buzzdask.analyze(" in cell.source
                   for o in cell.get("outputs", [])]  # fmt: skip
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) for o in outputs)
