"""Checkpointer restore paths on a tiny state: fallback past a damaged step, the layout of
earlier versions, and a mismatch that leaves every folder in place."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.checkpoint import Checkpointer, CheckpointMismatchError


def saved(workdir, steps=(1, 2)):
  ckpt = Checkpointer(str(workdir), keep=5, async_save=False)
  for step in steps:
    ckpt.save(step, {"w": jnp.full((64,), float(step))}, {"next_index": 8 * step})
  ckpt.wait()
  return ckpt


def abstract(shape=(64,)):
  return {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}


def test_damaged_newest_step_is_moved_aside(tmp_path, capsys):
  saved(tmp_path).close()
  state_dir = os.path.join(tmp_path, "checkpoints", "2", "state")
  for name in glob.glob(os.path.join(state_dir, "**", "d", "*"), recursive=True):
    with open(name, "r+b") as f:
      f.write(b"\0" * os.path.getsize(name))
  ckpt = Checkpointer(str(tmp_path), keep=5, async_save=False)
  state, data_state = ckpt.restore(abstract())
  np.testing.assert_array_equal(state["w"], np.ones(64))
  assert data_state == {"next_index": 8}
  out = capsys.readouterr().out
  assert "checkpoint step 2 cannot be restored" in out and "resuming from step 1" in out
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints.unrestorable", "2"))
  # The step number is free again: a new step 2 saves and becomes the latest.
  ckpt.save(2, {"w": jnp.zeros(64)}, {"next_index": 16})
  ckpt.wait()
  assert ckpt.latest_step() == 2
  ckpt.close()


def test_earlier_layout_restores_from_process_0_file(tmp_path):
  saved(tmp_path).close()
  data_dir = os.path.join(tmp_path, "checkpoints", "2", "data")
  os.remove(os.path.join(data_dir, "metadata"))
  for i in range(2):  # what grain's handler wrote from each of 2 processes
    with open(os.path.join(data_dir, f"process_{i}-of-2.json"), "w") as f:
      json.dump({"next_index": 16}, f)
  state, data_state = Checkpointer(str(tmp_path), keep=5, async_save=False).restore(abstract())
  np.testing.assert_array_equal(state["w"], np.full(64, 2.0))
  assert data_state == {"next_index": 16}


def test_mismatch_touches_nothing(tmp_path):
  saved(tmp_path).close()
  with pytest.raises(CheckpointMismatchError, match="step 2 .* does not match .* older steps \\[1\\]"):
    Checkpointer(str(tmp_path), keep=5, async_save=False).restore(abstract((65,)))
  assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["1", "2"]
  assert not os.path.exists(os.path.join(tmp_path, "checkpoints.unrestorable"))
