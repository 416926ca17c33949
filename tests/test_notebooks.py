"""Executes every notebook in quick mode (NEMOTRON_QUICK=1) and checks that it wrote its figures
(to notebooks/figures/quick/, so the committed full-mode figures stay as they are); checks that
the committed copies hold a full-mode run, within the 20-minute budget, and its figures.

Each takes about a minute of CPU time, almost all of it compiling the models'
training steps: one notebook = one kernel = fresh compiles.
"""

import os
import re
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


FULL_RUN_MINUTES = 20  # on 2 CPU cores; a notebook slower than that gets smaller


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_notebook_holds_its_full_mode_run(name):
  """The repository's copy was executed top to bottom in full mode and its figures are beside it."""
  book = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  code = [cell for cell in book.cells if cell.cell_type == "code"]
  counts = [cell.execution_count for cell in code]
  assert counts == list(range(1, len(code) + 1)), f"{name}: cells not executed in order: {counts}"
  outputs = _outputs(book)
  assert not [o for o in outputs if o.get("output_type") == "error"], f"{name} holds an error"
  assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
             for o in outputs), f"{name} shows no figure"
  text = _text(outputs)
  finished = re.search(r"full mode: ([0-9.]+) min", text)
  assert finished, f"{name} was not run in full mode"
  assert float(finished.group(1)) <= FULL_RUN_MINUTES, f"{name}: full run {finished.group(0)}"
  for figure in FIGURES[name]:
    assert f"saved notebooks/figures/{figure}" in text, f"{name}'s run did not write {figure}"
    assert os.path.exists(os.path.join(NOTEBOOKS, "figures", figure)), f"notebooks/figures/{figure} is missing"


def test_experiment_resume_goes_on_from_the_last_state(monkeypatch):
  # notebooks/common.py sets compile flags in os.environ on import; keep them out of later tests.
  for name in ("XLA_FLAGS", "TQDM_MININTERVAL"):
    if name in os.environ:
      monkeypatch.setenv(name, os.environ[name])
    else:
      monkeypatch.delenv(name, raising=False)
  monkeypatch.syspath_prepend(NOTEBOOKS)
  import common

  config = common.load("tiny", steps=3, seq_len=32, batch_size=8)
  config.model.pattern = "*-"
  exp = common.Experiment(config)
  first = exp.train(heldout=False, steps=2)
  more = exp.train(heldout=False, resume=True)
  assert (first["steps"], more["steps"]) == ([1, 2], [3, 4, 5])
  assert int(exp.state.step) == 5
  assert exp.train(heldout=False, steps=2)["loss"] == first["loss"]  # without resume: from state0
  exp.state = None
  with pytest.raises(ValueError, match=r"resume=True\) needs a state"):
    exp.train(resume=True)
