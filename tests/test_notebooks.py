"""Executes every notebook in quick mode (NEMOTRON_QUICK=1) and checks that it wrote its figures
(to notebooks/figures/quick/, so the committed full-mode figures stay as they are).

Each takes about a minute of CPU time, almost all of it compiling the models'
training steps: one notebook = one kernel = fresh compiles.
"""

import os
import time

import nbclient
import nbformat
import pytest

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")
FIGURES = {
    "01_quickstart.ipynb": ["01_quickstart_loss.png"],
    "02_hybrid_vs_transformer_vs_mamba.ipynb": ["02_hybrid_vs_transformer_vs_mamba.png"],
    "03_moe_vs_latent_moe.ipynb": ["03_moe_vs_latent_moe.png"],
    "04_low_precision.ipynb": ["04_low_precision.png"],
    "05_ssd_algorithm.ipynb": ["05_ssd_scaling.png"],
    "06_hybrid_ratio.ipynb": ["06_hybrid_ratio.png"],
}


def test_every_notebook_is_listed():
  assert sorted(f for f in os.listdir(NOTEBOOKS) if f.endswith(".ipynb")) == sorted(FIGURES)


def _outputs(book):
  return [o for cell in book.cells if cell.cell_type == "code" for o in cell.outputs]


def _text(outputs) -> str:
  return "".join(o.get("text", "") if o.get("output_type") == "stream" else
                 "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_runs_in_quick_mode(name, monkeypatch):
  # The kernel inherits this environment. conftest.py's XLA flags (8 simulated
  # devices) are dropped: the notebooks train on one device, as a user's machine
  # would, and notebooks/common.py picks the compile flags.
  monkeypatch.setenv("NEMOTRON_QUICK", "1")
  monkeypatch.setenv("XLA_FLAGS", "")
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  start = time.time()
  # The kernel runs this interpreter (ipykernel's built-in "python3" spec), so it sees the
  # same installed packages as the tests.
  client = nbclient.NotebookClient(book, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  client.execute()
  print(f"{name}: {time.time() - start:.1f} s")
  for figure in FIGURES[name]:
    path = os.path.join(NOTEBOOKS, "figures", "quick", figure)
    assert os.path.exists(path) and os.path.getmtime(path) >= start - 1, f"{name} did not write {path}"
  outputs = _outputs(book)
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), f"{name} showed no figure inline"
  assert "quick mode: " in _text(outputs), f"{name} does not end with common.finished()"
