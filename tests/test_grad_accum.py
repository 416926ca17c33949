"""Gradient accumulation through train.py: the same trajectory as the whole batch in one step."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS
from nemotron_jax import config as config_lib, sharding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(workdir, *extra):
  """train.py on 4 devices with batch 16: 4 rows per batch shard on the default mesh."""
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4")
  cmd = [sys.executable, os.path.join(ROOT, "train.py"),
         f"--config={os.path.join(ROOT, 'tests', 'run_config.py')}", f"--workdir={workdir}",
         "--config.train.batch_size=16", *extra]
  return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def train(workdir, *extra):
  """Metrics of 5 steps with expert parallelism, one MTP depth and a loss in chunks of 16
  of the 64 positions."""
  proc = run(workdir, "--config.train.steps=5", "--config.mesh.data=2", "--config.mesh.expert=2",
             "--config.model.mtp.num_depths=1", "--config.train.loss_chunk=16",
             "--config.checkpoint.every=0", *extra)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_four_microbatches_follow_the_whole_batch(tmp_path):
  whole = train(tmp_path / "whole")
  micro = train(tmp_path / "micro", "--config.train.grad_accum_steps=4")
  assert [r["step"] for r in micro] == [1, 2, 3, 4, 5]
  for key in ("loss", "ce", "mtp_ce_1", "tokens", "grad_norm"):
    np.testing.assert_allclose([r[key] for r in micro], [r[key] for r in whole], rtol=1e-4,
                               err_msg=key)
  # An argmax or a routing choice may flip where two values are within rounding: a token
  # or two of 1008 predictions, a few of 2048 expert copies (one copy moves the max by 0.002).
  np.testing.assert_allclose([r["mtp_acc_1"] for r in micro], [r["mtp_acc_1"] for r in whole],
                             atol=2.5 / whole[0]["tokens"])
  assert micro[0]["expert_load_max"] == whole[0]["expert_load_max"]
  np.testing.assert_allclose([r["expert_load_max"] for r in micro],
                             [r["expert_load_max"] for r in whole], atol=0.01)
  # The parameters moved: the trajectory is not the initial loss repeated.
  assert whole[-1]["loss"] < whole[0]["loss"] - 0.1


@pytest.mark.parametrize("steps, message", [
    (3, "'train.grad_accum_steps' = 3 is invalid: it must divide each batch shard's 4 rows"),
    (0, "'train.grad_accum_steps' = 0 is invalid: expected a positive integer")])
def test_bad_grad_accum_steps_is_named(steps, message):
  """Batch 16 on 4 batch shards: 4 rows each, which 3 microbatches do not divide."""
  c = config_lib.load_config(os.path.join(ROOT, "tests", "run_config.py"))
  c.train.batch_size, c.train.grad_accum_steps = 16, steps
  mesh = jax.sharding.AbstractMesh((4, 1, 1, 1), sharding.MESH_AXES)
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(c)
    sharding.check_batch(c.train.batch_size, mesh, c.train.grad_accum_steps)
