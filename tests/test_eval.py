"""eval.py: loading workdirs and Hugging Face folders, the cache report, the CLI end to end."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax import config as config_lib
from nemotron_jax import data, hf, sharding
from nemotron_jax import generate as gen
from nemotron_jax.checkpoint import Checkpointer
from nemotron_jax.train_lib import Trainer
from conftest import TEST_XLA_FLAGS, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import eval as eval_cli  # noqa: E402


def test_cache_bytes_match_a_prefilled_cache():
  c = tiny_config("M*M*", {"generation.cache_dtype": "bfloat16"})
  model = nj.build_model(c)
  variables = jax.jit(lambda: nj.init_variables(model, jax.random.PRNGKey(0)))()
  context, batch = 40, 3
  tokens = jnp.zeros((batch, 24), jnp.int32)
  _, cache = jax.jit(gen.prefill, static_argnums=(0, 4))(
      model, variables, tokens, jnp.zeros((batch,), jnp.int32), context)
  actual = sum(x.nbytes for x in jax.tree.leaves(cache.layers)) // batch
  expected = gen.cache_bytes(c.model, context)
  assert actual == expected["total"]
  # By hand: 2 attention layers x (k, v) x 40 slots x 2 heads x 8 x 2 bytes; 2 Mamba layers x
  # (3 conv taps x (32 + 2 x 2 x 16) x 2 bytes + 4 heads x 8 x 16 x 4 bytes of float32 state).
  assert expected["attention"] == 2 * 2 * 40 * 2 * 8 * 2
  assert expected["mamba"] == 2 * (3 * 96 * 2 + 4 * 8 * 16 * 4)


def test_cache_report_nano_and_super():
  models = {n: config_lib.load_config(os.path.join(ROOT, "configs", f"{n}.py")).model
            for n in ("nano", "super")}
  nano = models["nano"]
  nano.generation.cache_dtype = "bfloat16"
  at_8k = gen.cache_bytes(nano, 8192)
  assert at_8k["attention"] == 6 * 2 * 8192 * 2 * 128 * 2  # 6 attention layers
  assert at_8k["mamba"] == 23 * (3 * (64 * 64 + 2 * 8 * 128) * 2 + 64 * 64 * 128 * 4)
  # The Mamba part is constant: at 1M tokens the hybrid holds ~1/5 of an all-attention cache.
  assert gen.cache_bytes(nano, 2 ** 20)["mamba"] == at_8k["mamba"]
  assert eval_cli.all_attention_bytes(nano, 2 ** 20) / gen.cache_bytes(nano, 2 ** 20)["total"] > 4.5
  assert gen.cache_bytes(models["super"], 8192)["mtp_per_depth"] > 0  # Super drafts with MTP


def test_folders_that_are_not_checkpoints_are_refused(tmp_path):
  with pytest.raises(eval_cli.EvalError, match="neither a train.py workdir"):
    eval_cli.checkpoint_kind(str(tmp_path))
  with pytest.raises(eval_cli.EvalError, match="not a folder"):
    eval_cli.checkpoint_kind(str(tmp_path / "missing"))
  c = tiny_config("*", {"vocab_size": 256})
  with open(tmp_path / "config.json", "w") as f:
    f.write(c.to_json_best_effort())
  os.makedirs(tmp_path / "checkpoints")
  with pytest.raises(eval_cli.EvalError, match="has no checkpoint"):
    eval_cli.load(str(tmp_path))


def test_workdir_restores_the_saved_state(tmp_path):
  c = tiny_config("M*", {"vocab_size": 256, "mtp.num_depths": 1})
  c.mesh.data = 1
  trainer = Trainer(c, nj.build_model(c), sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
  state = trainer.init_state(3)
  iterator = data.make_iterator(c, split="train", global_batch_size=c.train.batch_size)
  ckpt = Checkpointer(str(tmp_path), keep=1, async_save=False)
  ckpt.save(5, state, iterator.get_state())
  ckpt.close()
  with open(tmp_path / "config.json", "w") as f:
    f.write(c.to_json_best_effort(indent=2))
  config, _, _, restored = eval_cli.load(str(tmp_path))
  assert config.model.mtp.num_depths == 1 and config.model.mamba.dt_limit[1] == float("inf")
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored.params),
               jax.device_get(state.params))


def test_cli_on_a_hugging_face_folder(tmp_path):
  c = tiny_config("M*", {"vocab_size": 256, "mtp.num_depths": 1})
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                           hf.variable_shapes(c))
  folder, output = str(tmp_path / "hf"), str(tmp_path / "out.json")
  hf.save_checkpoint(c, variables, folder)
  # Parameters sharded 8 ways (fsdp), not replicated.
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=8")
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, "eval.py"), f"--checkpoint={folder}", "--eval_batches=1",
       "--config.mesh.data=1", "--config.mesh.fsdp=8",
       "--max_new_tokens=6", "--think_budget=2", "--think_end_ids=60,61", "--mqar",
       "--mqar_batches=1", "--cache_report",
       "--cache_contexts=1024", f"--output={output}"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(output) as f:
    results = json.load(f)
  # Random weights: about ln(256) nats per byte, i.e. about 8 bits per byte.
  assert 6.0 < results["heldout"]["eval_bpb"] < 11.0
  assert results["sample"]["text"].startswith("def ")
  assert results["sample"]["tokens"][2:4] == [60, 61]  # the budget of 2 forced the marker
  assert set(results["cache_report"]) == {"nano", "super", "this"}
  assert results["parameters_sharded_over"] == 8
  # One held-out MQAR batch: 16 rows of 8 queries; random weights recall about nothing.
  assert results["mqar"]["queries"] == 16 * 8 and results["mqar"]["accuracy"] < 0.2
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "eval.py"), f"--checkpoint={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "neither a train.py workdir" in bad.stderr
