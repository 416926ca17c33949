"""End-to-end train.py runs: multi-process equivalence, exact resume after SIGKILL, NaN stop."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "run_config.py")


def command(workdir, *extra):
  return [sys.executable, os.path.join(ROOT, "train.py"), f"--config={CONFIG}",
          f"--workdir={workdir}", *extra]


def environment(devices):
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}"
  return env


def run(workdir, *extra, devices=4):
  proc = subprocess.run(command(workdir, *extra), env=environment(devices), cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  return proc


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records], np.array([r["loss"] for r in records])


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  return values


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_one(reference, tmp_path):
  workdir = str(tmp_path)
  address = f"127.0.0.1:{free_port()}"
  procs = [subprocess.Popen(command(workdir, f"--coordinator_address={address}",
                                    "--num_processes=2", f"--process_id={i}"),
                            env=environment(2), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  # Same global batch and computation; only the order of cross-process sums differs.
  np.testing.assert_allclose(values, reference, rtol=2e-5)


def test_sigkill_and_resume_is_exact(reference, tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(command(workdir), env=environment(4), cwd=ROOT,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  checkpoints = os.path.join(workdir, "checkpoints")
  deadline = time.time() + 600
  # Kill after the step-8 save has completed and training has moved on past it.
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(os.path.join(checkpoints, "8")) and os.path.exists(metrics):
      with open(metrics) as f:
        if sum(1 for _ in f) >= 13:
          break
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
  # What a kill in the middle of a save leaves behind: an unfinished temporary folder.
  os.makedirs(os.path.join(checkpoints, "16.orbax-checkpoint-tmp-1234", "state"), exist_ok=True)
  resumed = run(workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from step 8" in resumed.stdout or "resumed from step 16" in resumed.stdout
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  np.testing.assert_array_equal(values, reference)


def test_non_finite_loss_stops_without_saving(tmp_path):
  workdir = str(tmp_path)
  proc = run(workdir, "--config.train.lr=1e30", "--config.train.warmup_steps=0",
             "--config.train.grad_clip=0", "--config.checkpoint.every=1", devices=1)
  assert proc.returncode == 1
  assert "stopping without saving" in proc.stdout
  steps, values = losses(workdir)
  assert np.isfinite(values).all()  # only finite steps were logged
  saved = sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
  assert saved and saved[-1] == steps[-1]  # the last checkpoint is the last finite state
  # A run whose optimiser differs (clipping on adds state) is refused, touching nothing...
  mismatch = run(workdir, devices=1)
  assert mismatch.returncode != 0 and "does not match the current config" in mismatch.stderr
  # ...and the checkpoint still restores under the config it was written with. Its weights
  # are finite but wrecked by lr = 1e30, so the resumed run stops again at once.
  again = run(workdir, "--config.train.lr=1e30", "--config.train.grad_clip=0", devices=1)
  assert f"resumed from step {steps[-1]}" in again.stdout
  assert again.returncode == 1 and "stopping without saving" in again.stdout
