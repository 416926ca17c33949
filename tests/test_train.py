"""End-to-end train.py runs: multi-process equivalence, exact resume after SIGKILL and SIGTERM,
from a corrupted latest checkpoint and on another process count and mesh, periodic evaluation,
and the stop on non-finite steps."""

import glob
import json
import math
import os
import shutil
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
def reference_run(tmp_path_factory):
  """An uninterrupted 1-process x 4-device run: its workdir (checkpoints 8, 16, 24) and losses."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  return workdir, values


@pytest.fixture(scope="module")
def reference(reference_run):
  return reference_run[1]


def copy_run(reference_run, tmp_path, keep_steps):
  """A copy of the reference workdir holding only the checkpoints of `keep_steps`."""
  workdir = str(tmp_path / "run")
  shutil.copytree(reference_run[0], workdir)
  for folder in os.listdir(os.path.join(workdir, "checkpoints")):
    if folder.isdigit() and int(folder) not in keep_steps:
      shutil.rmtree(os.path.join(workdir, "checkpoints", folder))
  return workdir


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, *extra):
  address = f"127.0.0.1:{free_port()}"
  return [subprocess.Popen(command(workdir, f"--coordinator_address={address}",
                                   "--num_processes=2", f"--process_id={i}", *extra),
                           env=environment(2), cwd=ROOT, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True) for i in range(2)]


def wait_for_steps(procs, metrics, count):
  """Until `metrics` has `count` records, or a process has ended."""
  deadline = time.time() + 600
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if os.path.exists(metrics):
      with open(metrics) as f:
        if sum(1 for _ in f) >= count:
          return
    time.sleep(0.02)


def stopped_step(out, signal_name):
  stopped = [line for line in out.splitlines()
             if line.startswith(f"stopped by {signal_name} after step")]
  assert stopped, out[-3000:]
  return int(stopped[0].split()[5].rstrip(";"))


def test_two_processes_match_one_through_sigint(reference, tmp_path):
  """Two processes train the one-process trajectory. A Ctrl-C reaching one of them stops
  both after the same step (they agree at the next host sync), saved; the rerun resumes."""
  workdir = str(tmp_path)
  metrics = os.path.join(workdir, "metrics.jsonl")
  procs = start_two_processes(workdir)
  wait_for_steps(procs, metrics, 10)
  procs[1].send_signal(signal.SIGINT)
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  step = stopped_step(outputs[0][0], "SIGINT")
  assert 10 <= step < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  procs = start_two_processes(workdir)
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  assert f"resumed from step {step}" in outputs[0][0]
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
  assert mismatch.returncode == 2 and "does not match the current config" in mismatch.stderr
  assert "Traceback" not in mismatch.stderr
  assert sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit()) == saved
  # ...and the checkpoint still restores under the config it was written with. Its weights
  # are finite but wrecked by lr = 1e30, so the resumed run stops again at once.
  again = run(workdir, "--config.train.lr=1e30", "--config.train.grad_clip=0", devices=1)
  assert f"resumed from step {steps[-1]}" in again.stdout
  # Warmup is back at the preset's 4 steps: the resume says the schedule changed.
  assert "changed learning-rate schedule: train.warmup_steps 0 -> 4" in again.stdout
  assert again.returncode == 1 and "stopping without saving" in again.stdout


def test_corrupted_latest_checkpoint_falls_back(reference_run, tmp_path):
  workdir = copy_run(reference_run, tmp_path, keep_steps=(16, 24))
  # Damage every data file of step 24's state, as a disk or a half-finished copy would.
  files = glob.glob(os.path.join(workdir, "checkpoints", "24", "state", "**", "d", "*"),
                    recursive=True)
  assert files
  for name in files:
    size = os.path.getsize(name)
    with open(name, "r+b") as f:
      f.seek(size // 2)
      f.write(b"\0" * max(size // 4, 1))
  proc = run(workdir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  aside = os.path.join(workdir, "checkpoints.unrestorable", "24")
  warning = [line for line in proc.stdout.splitlines() if "cannot be restored" in line]
  assert len(warning) == 1 and "checkpoint step 24" in warning[0] and aside in warning[0]
  assert "resuming from step 16" in warning[0]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert os.path.isdir(aside)  # moved aside, not deleted
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  np.testing.assert_array_equal(values, reference_run[1])


def test_data_state_of_the_earlier_text_packing_is_one_line_error(reference_run, tmp_path):
  workdir = copy_run(reference_run, tmp_path, keep_steps=(24,))
  # What the single-stream packing (grain's window shuffle over one packer) saved.
  files = glob.glob(os.path.join(workdir, "checkpoints", "24", "data", "*"))
  states = [name for name in files if "slots" in open(name).read()]
  assert len(states) == 1
  old = {"parent_window_start_state": {"parent": {"next_index": 40}, "offset": 3},
         "window_index": 0, "pos_in_window": 192}
  with open(states[0], "w") as f:
    json.dump(old, f)
  proc = run(workdir)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1 and "earlier text pipeline" in errors[0] and "new --workdir" in errors[0]
  assert "Traceback" not in proc.stderr
  with open(states[0]) as f:
    assert json.load(f) == old  # the checkpoint is left as it was
  assert not os.path.exists(os.path.join(workdir, "checkpoints.unrestorable"))


def test_sigterm_saves_and_resume_is_exact(reference, tmp_path):
  workdir = str(tmp_path)
  proc = subprocess.Popen(command(workdir), env=environment(4), cwd=ROOT, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
  metrics = os.path.join(workdir, "metrics.jsonl")
  wait_for_steps([proc], metrics, 10)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out[-3000:]
  step = stopped_step(out, "SIGTERM")
  assert 10 <= step < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  # The resumed run also evaluates every 8 steps, which must not change training.
  resumed = run(workdir, "--config.train.eval_every=8")
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resumed from step {step}" in resumed.stdout
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  np.testing.assert_array_equal(values, reference)
  with open(metrics) as f:
    records = {r["step"]: r for r in map(json.loads, f)}
  for s in (16, 24):
    r = records[s]
    assert math.isclose(r["eval_ppl"], math.exp(r["eval_loss"]), rel_tol=1e-9)
    assert 0 < r["eval_bpb"] < 8 * r["eval_loss"]
  assert "eval_loss" not in records[15]
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.*"))
  assert any(b"eval_bpb" in open(e, "rb").read() for e in events)
  # Each start's config is kept, named by the step it started from.
  assert os.path.isfile(os.path.join(workdir, "config.from_step_0.json"))
  with open(os.path.join(workdir, f"config.from_step_{step}.json")) as f:
    assert json.load(f)["train"]["eval_every"] == 8


def test_resume_on_two_processes_and_another_mesh(reference_run, tmp_path):
  """A 1-process x 4-device checkpoint continues on 2 processes x 2 devices with fsdp = 2,
  is preempted there by SIGTERM (orbax's preemption sync point), and resumes again."""
  workdir = copy_run(reference_run, tmp_path, keep_steps=(8,))
  metrics = os.path.join(workdir, "metrics.jsonl")
  with open(metrics) as f:
    kept = f.readlines()[:8]
  with open(metrics, "w") as f:
    f.writelines(kept)

  start = lambda *extra: start_two_processes(workdir, "--config.mesh.fsdp=2", *extra)
  procs = start()
  wait_for_steps(procs, metrics, 10)
  for p in procs:  # a scheduler preempting the job signals every process
    p.send_signal(signal.SIGTERM)
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  out = outputs[0][0]
  assert "resumed from step 8" in out
  step = stopped_step(out, "SIGTERM")
  assert 10 <= step < 24 and os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))

  procs = start("--config.train.sample_tokens=4")
  outputs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  out = outputs[0][0]
  # The sample needs the fsdp-sharded parameters of both processes on process 0.
  assert f"resumed from step {step}" in out and "sample:" in out
  steps, values = losses(workdir)
  assert steps == list(range(1, 25))
  # Same global batches; only the order of cross-device sums differs.
  np.testing.assert_allclose(values, reference_run[1], rtol=2e-5)
