"""The quickstart notebook runs top to bottom (train, evaluate, picture, index + search, save + reload)."""

from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_runs(tmp_path, monkeypatch):
    # one thread per process: the CPUs are shared, and oversubscribed torch threads make the kernel crawl
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(
        notebook, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the evaluation grid and the search grid
    assert (tmp_path / "quickstart_run" / "metrics.json").is_file()
    assert (tmp_path / "my_images.index" / "index.json").is_file()
    assert (tmp_path / "my_model" / "model.safetensors").is_file()
