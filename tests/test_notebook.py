"""The quickstart notebook runs end to end (shrunk config)."""

import os

import pytest

from tests.conftest import REPO


def test_quickstart_notebook_executes(tmp_path, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("CPT_NOTEBOOK_QUICK", "1")
  monkeypatch.setenv("XLA_FLAGS", "")  # the kernel is a fresh process: one CPU device
  monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's cpt_jax; run from tmp_path
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(tmp_path)}}).execute()
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "backward transfer" in outputs
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the loss plot is displayed"
