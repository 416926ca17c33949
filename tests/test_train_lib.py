"""The training library against hand values: LR schedules, the expert-bias rule, remat, the
non-finite guard of the step, and the config record of each start."""

import json
import math
import os
import signal
import threading

import jax
import ml_collections
import numpy as np
import pytest

from conftest import tiny_config
from nemotron_jax import sharding, train_loop
from nemotron_jax.config import default_config
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer, lr_schedule, update_expert_bias


def schedule_config(**overrides):
  t = default_config().train
  t.update(dict(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, decay_fraction=0.2,
                **overrides))
  return t


@pytest.mark.parametrize("shape, at_85, at_90", [
    ("linear", 0.1 + 0.9 * 0.75, 0.1 + 0.9 * 0.5),
    ("minus_sqrt", 0.1 + 0.9 * (1 - math.sqrt(0.25)), 0.1 + 0.9 * (1 - math.sqrt(0.5))),
    ("cosine", 0.1 + 0.45 * (1 + math.cos(math.pi / 4)), 0.1 + 0.45),
])
def test_wsd_schedule_hand_values(shape, at_85, at_90):
  lr = lr_schedule(schedule_config(schedule="wsd", decay_shape=shape))
  # Warmup reaches the peak at step warmup - 1; decay covers the last 20 of 100 steps.
  expected = {0: 0.1, 4: 0.5, 9: 1.0, 50: 1.0, 80: 1.0, 85: at_85, 90: at_90, 100: 0.1, 120: 0.1}
  got = {step: float(lr(step)) for step in expected}
  np.testing.assert_allclose(list(got.values()), list(expected.values()), rtol=1e-6)


def test_cosine_and_constant_schedules_hand_values():
  cosine = lr_schedule(schedule_config(schedule="cosine"))
  # Cosine from the end of warmup (step 10) to the floor at step 100.
  for step, value in {0: 0.1, 10: 1.0, 55: 0.55, 100: 0.1, 32.5: 0.1 + 0.45 * (1 + math.cos(math.pi / 4))}.items():
    np.testing.assert_allclose(float(cosine(step)), value, rtol=1e-6)
  constant = lr_schedule(schedule_config(schedule="constant"))
  np.testing.assert_allclose([float(constant(s)) for s in (0, 9, 10, 99)], [0.1, 1.0, 1.0, 1.0],
                             rtol=1e-6)


def test_expert_bias_update_rule():
  bias = lambda values: {"mixer": {"e_score_correction_bias": np.array(values, np.float32)}}
  state = {"layers_1": bias([0.0, 0.5, 0.0, 0.0]), "mtp_0": {"layers_0": bias([1.0, 1.0, 1.0, 1.0])}}
  loads = {("layers_1",): np.array([1.0, 2.0, 3.0, 6.0]),  # mean 3
           ("mtp_0", "layers_0"): np.array([4.0, 4.0, 4.0, 4.0])}
  new = update_expert_bias(state, loads, 0.01)
  # Under-loaded experts go up by the rate, over-loaded ones down, those at the mean stay.
  np.testing.assert_allclose(new["layers_1"]["mixer"]["e_score_correction_bias"],
                             [0.01, 0.51, 0.0, -0.01], rtol=1e-6)
  np.testing.assert_array_equal(new["mtp_0"]["layers_0"]["mixer"]["e_score_correction_bias"],
                                [1.0, 1.0, 1.0, 1.0])
  np.testing.assert_array_equal(state["layers_1"]["mixer"]["e_score_correction_bias"],
                                [0.0, 0.5, 0.0, 0.0])  # the input is left as it was


def make_trainer(remat: bool) -> Trainer:
  config = tiny_config("ME", {"remat": remat, "mtp.num_depths": 1, "mtp.pattern": "*"})
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  return Trainer(config, build_model(config), mesh)


def make_batch(trainer, nan=False):
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 64, (2, 17)).astype(np.int32)
  mask = np.ones((2, 16), np.float32)
  if nan:
    mask[0, 3] = np.nan
  return trainer.shard_batch({"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                              "segment_ids": np.ones((2, 16), np.int32), "loss_mask": mask})


@pytest.fixture(scope="module")
def plain_trainer():
  return make_trainer(remat=False)


def test_remat_equals_no_remat(plain_trainer):
  results = []
  for trainer in (plain_trainer, make_trainer(remat=True)):
    state, metrics = trainer.train_step(trainer.init_state(0), make_batch(trainer))
    results.append(jax.device_get((state.params, state.moe_state, metrics)))
  (p0, b0, m0), (p1, b1, m1) = results
  for key in ("loss", "grad_norm", "mtp_loss", "balance_loss"):
    np.testing.assert_allclose(m1[key], m0[key], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p1, p0)
  jax.tree.map(np.testing.assert_array_equal, b1, b0)


def test_non_finite_step_leaves_the_state(plain_trainer):
  trainer = plain_trainer
  state = trainer.init_state(0)
  before = jax.device_get(state)
  state, metrics = trainer.train_step(state, make_batch(trainer, nan=True))
  assert int(metrics["nonfinite"]) == 1 and not np.isfinite(float(metrics["loss"]))
  after = jax.device_get(state)
  jax.tree.map(np.testing.assert_array_equal, after, before)  # step, params, moments, rng
  state, metrics = trainer.train_step(state, make_batch(trainer))
  assert int(metrics["nonfinite"]) == 0 and int(state.step) == 1


def test_record_config_keeps_each_start_and_warns_on_schedule_change(tmp_path, capsys):
  config = default_config()
  config.train.steps, config.train.warmup_steps = 24, 4
  train_loop.record_config(config, str(tmp_path), 0)
  assert capsys.readouterr().out == ""
  config.train.steps = 48
  train_loop.record_config(config, str(tmp_path), 16)
  out = capsys.readouterr().out
  # wsd with 24 steps decays from step 19, with 48 from step 38: lr at 16 is the peak in both.
  assert "train.steps 24 -> 48" in out and "lr at step 16" in out
  config.train.decay_fraction = 0.8
  train_loop.record_config(config, str(tmp_path), 16)
  out = capsys.readouterr().out
  assert "train.decay_fraction 0.2 -> 0.8" in out and "0.003 -> 0.002" in out
  files = sorted(f for f in os.listdir(tmp_path) if f.startswith("config"))
  assert files == ["config.from_step_0.json", "config.from_step_16.2.json",
                   "config.from_step_16.json", "config.json"]
  with open(tmp_path / "config.from_step_0.json") as f:
    assert json.load(f)["train"]["steps"] == 24
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["train"]["decay_fraction"] == 0.8


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers are installed only from the main thread")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_one_process_stops_on_sigint_and_sigterm(sig):
  """A Ctrl-C or a scheduler's SIGTERM becomes a request to stop after the current step
  (train.py then saves and exits 0), not an exception; the previous handler comes back."""
  before = signal.getsignal(sig)
  stop = train_loop.StopRequest(manager=None)
  try:
    assert not stop(1, sync=True)
    os.kill(os.getpid(), sig)
    assert stop(2, sync=False) and stop.signal_name == sig.name
  finally:
    stop.restore()
  assert signal.getsignal(sig) is before
