"""User mistakes through the real CLIs: one `error:` line naming what is wrong, exit 2, no traceback."""

import json
import os
import subprocess
import sys

import pytest

from conftest import TEST_XLA_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "tests", "run_config.py")


def bad_inputs(tmp):
  """(name, argv, words the error line must contain); every one fails before compiling."""
  train = [os.path.join(ROOT, "train.py"), f"--config={CONFIG}", f"--workdir={tmp}/run"]
  broken = os.path.join(tmp, "broken")
  os.makedirs(broken)
  with open(os.path.join(broken, "config.json"), "w") as f:
    f.write('{"model": {"pattern": "ME*",')
  no_ckpt = os.path.join(tmp, "no_ckpt")
  os.makedirs(no_ckpt)
  with open(os.path.join(no_ckpt, "config.json"), "w") as f:
    json.dump({"model": {"pattern": "ME*"}}, f)
  summary = ["-m", "nemotron_jax.summary"]
  return [
      ("pattern", train + ["--config.model.pattern=MX"], ["model.pattern", "'M' (mamba)"]),
      ("top_k", train + ["--config.model.moe.top_k=0"], ["model.moe.top_k", "positive integer"]),
      ("mesh", train + ["--config.mesh.data=3"], ["mesh", "there are 4"]),
      ("batch", train + ["--config.train.batch_size=6"], ["train.batch_size", "divisible"]),
      ("data_path", train + ["--config.data.source=text", f"--config.data.path={tmp}/none.txt"],
       ["data.path", "no such file"]),
      ("field", train + ["--config.train.step=3"], ["train.step", "Did you mean"]),
      ("value", train + ["--config.train.steps=abc"], ["--config.train.steps", "abc"]),
      ("preset", [os.path.join(ROOT, "train.py"), f"--config={tmp}/nope.py", f"--workdir={tmp}/r"],
       ["nope.py", "get_config"]),
      ("eval_json", [os.path.join(ROOT, "eval.py"), f"--checkpoint={broken}"],
       ["config.json", "not valid JSON"]),
      ("eval_no_ckpt", [os.path.join(ROOT, "eval.py"), f"--checkpoint={no_ckpt}"],
       ["has no checkpoint"]),
      ("summary", summary + [f"--config={CONFIG}", "--config.model.attention.num_kv_heads=3"],
       ["model.attention.num_kv_heads", "divisible"]),
  ]


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=4")
  env.pop("NEMOTRON_TRACEBACK", None)
  cases = bad_inputs(str(tmp_path))
  procs = []
  # Two at a time: each start imports jax, and the machine has few cores.
  for i in range(0, len(cases), 2):
    batch = [(name, words, subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, text=True,
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE))
             for name, argv, words in cases[i:i + 2]]
    procs += [(name, words, p, *p.communicate(timeout=300)) for name, words, p in batch]
  wrong = []
  for name, words, p, _, err in procs:
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    if (p.returncode != 2 or "Traceback" in err or len(errors) != 1
        or not all(word in errors[0] for word in words)):
      wrong.append((name, p.returncode, err[-1500:]))
  assert not wrong, wrong


def test_traceback_flag_shows_the_traceback(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "nemotron_jax.summary", f"--config={CONFIG}",
                         "--config.model.pattern=MX", "--traceback"], cwd=ROOT,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "ConfigError" in proc.stderr
