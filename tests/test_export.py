"""train.py -> nemotron_jax.export -> transformers -> train.py --config.init.hf_checkpoint."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file  # noqa: E402

from conftest import TEST_XLA_FLAGS  # noqa: E402
from nemotron_jax import build_model, config as config_lib, export, hf, sharding  # noqa: E402
from nemotron_jax import train_loop  # noqa: E402
from nemotron_jax.generate import generate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# configs/tiny.py at test size (every mixer, an MTP head); the model fields apply to the
# first run only, the fine-tuning run takes its model from the exported config.json.
MODEL = {"pattern": "ME*-", "d_model": 32, "mamba.num_heads": 4, "mamba.head_dim": 8,
         "mamba.d_state": 16, "mamba.chunk_size": 16, "attention.head_dim": 8, "mlp.d_ff": 64,
         "moe.num_experts": 4, "moe.d_ff": 32, "moe.shared_d_ff": 32, "mtp.num_depths": 1}
RUN = {"data.seq_len": 64, "train.batch_size": 8, "train.log_every": 1, "train.warmup_steps": 2,
       "train.eval_batches": 1, "train.sample_tokens": 0, "checkpoint.async_save": False}


def tiny_run_config(steps: int):
  config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
  for key, value in [*(("model." + k, v) for k, v in MODEL.items()), *RUN.items(),
                     ("train.steps", steps)]:
    *parents, leaf = key.split(".")
    node = config
    for name in parents:
      node = node[name]
    node[leaf] = value
  return config_lib.validate(config)


def run(*args, devices=4):
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line)["loss"] for line in f]


def test_train_export_load_in_transformers_and_fine_tune(tmp_path):
  trained, hub, tuned = (str(tmp_path / n) for n in ("trained", "hub", "tuned"))
  train_loop.run(tiny_run_config(steps=12), trained)  # what train.py runs
  first = losses(trained)
  run("-m", "nemotron_jax.export", f"--workdir={trained}", f"--out={hub}")
  names = set()
  for f in glob.glob(os.path.join(hub, "*.safetensors")):
    names |= set(load_file(f))
  assert "mtp.layers.0.eh_proj.weight" in names  # the MTP head is exported

  config, variables, step = export.load_workdir(trained)
  assert step == 12
  tokens = np.random.default_rng(0).integers(0, 256, (2, 40))
  ours = np.asarray(jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32)))
  reference = transformers.NemotronHForCausalLM.from_pretrained(hub).eval()
  for layer in reference.model.layers:  # NVIDIA's semantics, as exported in time_step_limit
    if hasattr(layer.mixer, "time_step_limit"):
      layer.mixer.time_step_limit = tuple(config.model.mamba.dt_limit)
  with torch.no_grad():
    theirs = reference(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(ours - theirs).max() <= 1e-4

  # Fine-tuning starts at the trained loss (same first batch), not at a fresh model's.
  proc = run("train.py", "--config=configs/tiny.py", f"--workdir={tuned}",
             f"--config.init.hf_checkpoint={hub}", "--config.train.steps=1",
             *(f"--config.{k}={v}" for k, v in RUN.items()))
  assert "started from the weights of" in proc.stdout
  start = losses(tuned)[0]
  assert first[0] - first[-1] > 0.5, first  # the first run learned something
  assert abs(start - first[-1]) < 0.25 * (first[0] - first[-1]), (start, first)

  # A run whose model section would change the checkpoint's shapes is refused by name.
  c = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
  c.init.hf_checkpoint = hub
  with pytest.raises(config_lib.ConfigError, match="model.d_model cannot be set"):
    hf.init_config(c, {"model.d_model": 64})
  # Numerics-only fields keep the run's values (here as if set on the command line).
  c.model.compute_dtype, c.model.remat = "bfloat16", True
  tuned_config = hf.init_config(c, {"model.compute_dtype": "bfloat16", "model.remat": True})
  assert tuned_config.model.d_model == 32 and tuned_config.model.pattern == "ME*-"
  assert tuned_config.model.compute_dtype == "bfloat16" and tuned_config.model.remat
  assert tuned_config.model.mtp.num_depths == 1


def test_generate_with_sharded_parameters(tmp_path):
  from conftest import tiny_config
  c = tiny_config("M*E", {"vocab_size": 256})
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.2 * rng.normal(size=s.shape)).astype(np.float32),
                           hf.variable_shapes(c))
  path = str(tmp_path / "hub")
  hf.save_checkpoint(c, variables, path)
  config = hf.read_config(path)
  config.mesh.data, config.mesh.fsdp = 1, 8
  _, sharded = hf.load_checkpoint(path, mesh=sharding.make_mesh(config.mesh))
  _, plain = hf.load_checkpoint(path)
  model = build_model(config)
  prompts = [[1, 2, 3, 4], [5, 6]]
  ours = generate(model, sharded, prompts, 6).to_lists()
  assert ours == generate(model, plain, prompts, 6).to_lists()
  embedding = sharded["params"]["embedding"]
  assert embedding.addressable_shards[0].data.size == embedding.size // 8  # still sharded
