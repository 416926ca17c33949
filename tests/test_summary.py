"""Parameter, FLOP and cache accounting: published counts, XLA's cost analysis, the CLI."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import build_model, init_variables, load_config, summary
from nemotron_jax.layers import ssd as ssd_lib
from nemotron_jax.layers.mamba import Mamba2
from conftest import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = ("nemotron_h_8b", "nano", "super", "tiny_transformer", "tiny_mamba", "tiny_moe",
           "tiny_latent_moe")


def preset(name):
  return load_config(os.path.join(ROOT, "configs", f"{name}.py"))


@functools.cache
def counts(name):
  """Tracing a published model takes seconds: once per preset."""
  return summary.count_params(preset(name))


@pytest.mark.parametrize("name", PRESETS + ("tiny", "small"))
def test_presets_validate(name):
  preset(name)  # load_config validates every section


@pytest.mark.parametrize("name, devices", [("nano", 64), ("super", 256), ("nemotron_h_8b", 64)])
def test_published_presets_launch_one_row_per_device_per_microbatch(name, devices):
  """The launch settings stated in the presets (measured by benchmarks/memory_fit.py --preset):
  the mesh's device count, a global batch the mesh and accumulation divide, one row per
  device per microbatch, and rules that accept the mesh."""
  from nemotron_jax import sharding
  c = preset(name)
  sizes = tuple(c.mesh[a] for a in sharding.MESH_AXES)
  mesh = jax.sharding.AbstractMesh(sizes, sharding.MESH_AXES)
  assert math.prod(sizes) == devices
  sharding.check_batch(c.train.batch_size, mesh, c.train.grad_accum_steps)
  shards = math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  assert c.train.batch_size == 3072 and c.train.batch_size // c.train.grad_accum_steps == shards
  sharding.rules(c.model, mesh)


# NVIDIA's figures, rounded to 0.1B (NEMOTRON.md §3).
PUBLISHED = [
    ("nano", "total", 31.6e9),
    ("nano", "active_no_embedding", 3.2e9),
    ("nano", "active", 3.6e9),
    ("super", "total", 120.6e9),
    ("super", "active", 12.7e9),
    ("nemotron_h_8b", "total", 8.1e9),
]


@pytest.mark.parametrize("name,key,published", PUBLISHED, ids=[f"{n}-{k}" for n, k, _ in PUBLISHED])
def test_counts_match_published(name, key, published):
  assert counts(name)[key] == pytest.approx(published, rel=0.01)


def test_super_mtp_is_one_shared_star_e_block_outside_the_totals():
  c = counts("super")
  m = preset("super").model
  # eh_proj (2d -> d) plus one attention and one LatentMoE layer, stored once for two depths.
  assert c["mtp"] == pytest.approx(2 * m.d_model ** 2 + c["by_mixer"]["*"] / 8
                                   + c["by_mixer"]["E"] / 40, rel=1e-3)
  assert counts("nano")["mtp"] == 0


# Widths chosen so matmuls dominate, as in the published models.
XLA_SIZES = {"d_model": 256, "vocab_size": 512, "mamba.num_heads": 8, "mamba.head_dim": 64,
             "mamba.d_state": 64, "mamba.n_groups": 2, "mamba.chunk_size": 64,
             "attention.num_heads": 8, "attention.num_kv_heads": 2, "attention.head_dim": 32,
             "mlp.d_ff": 1024, "moe.num_experts": 4, "moe.top_k": 2, "moe.d_ff": 256,
             "moe.shared_d_ff": 256,
             # XLA's CPU cost analysis charges ragged_dot for every group on every row
             # (8x the real work with 8 groups); the dense path's einsums are counted right.
             "moe.impl": "dense"}


@pytest.mark.parametrize("pattern", ["M", "*", "-E", "M*-E"])
def test_forward_flops_match_xla_cost_analysis(pattern):
  c = tiny_config(pattern, XLA_SIZES)
  model = build_model(c)
  variables = jax.eval_shape(lambda rng: init_variables(model, rng), jax.random.key(0))
  seq_len = 256
  tokens = jax.ShapeDtypeStruct((1, seq_len), jnp.int32)
  xla = jax.jit(model.apply).lower(variables, tokens).compile().cost_analysis()["flops"] / seq_len
  # Like with like: the masked jnp attention computes the full square, dense MoE every expert.
  ours = summary.forward_flops(c, seq_len, causal=False,
                               experts_per_token=c.model.moe.num_experts)["total"]
  # XLA also counts elementwise work (norms, activations, masks), which we leave out.
  assert ours <= xla <= 1.10 * ours


@pytest.mark.parametrize("seq_len,chunk", [(512, 128), (200, 64)])
def test_ssd_flops_match_xla_cost_analysis(seq_len, chunk):
  h, p, g, n = 8, 64, 2, 64
  shapes = [(1, seq_len, h, p), (1, seq_len, h), (h,), (1, seq_len, g, n), (1, seq_len, g, n), (h,)]
  args = [jax.ShapeDtypeStruct(shape, jnp.float32) for shape in shapes]
  compiled = jax.jit(lambda *a: ssd_lib.ssd_chunked(*a, chunk_size=chunk)).lower(*args).compile()
  xla = compiled.cost_analysis()["flops"] / seq_len
  m = tiny_config("M", {"mamba.num_heads": h, "mamba.head_dim": p, "mamba.n_groups": g,
                        "mamba.d_state": n, "mamba.chunk_size": chunk}).model
  ours = summary.ssd_flops(m, seq_len)
  # The decay masks (segment sums, exp) are the elementwise remainder.
  assert ours <= xla <= 1.10 * ours
  # The compiled dots alone: the formula's state passing (2 c H P N) is elementwise, the
  # in-chunk cumulative sum a small dot, and the two nearly cancel.
  dots = sum(d["flops"] for d in summary.compiled_dots(compiled.as_text())) / seq_len
  assert dots == pytest.approx(ours, rel=0.01)


def test_compiled_dots_reads_shapes_dimensions_and_flops():
  f = jax.jit(lambda a, b, c: jnp.einsum("bij,bjk->bik", a, b).sum() + (a.reshape(-1, 5) @ c).sum())
  text = f.lower(jnp.ones((3, 4, 5)), jnp.ones((3, 5, 6)), jnp.ones((5, 7))).compile().as_text()
  dots = sorted(summary.compiled_dots(text), key=lambda d: d["flops"])
  assert dots == [
      {"lhs": ("f32", (3, 4, 5)), "rhs": ("f32", (3, 5, 6)), "dims": (((2,), (1,)), ((0,), (0,))),
       "flops": 2 * 3 * 4 * 5 * 6},
      {"lhs": ("f32", (12, 5)), "rhs": ("f32", (5, 7)), "dims": (((1,), (0,)), ((), ())),
       "flops": 2 * 12 * 5 * 7}]


def test_ablation_presets_have_equal_active_flops():
  flops = {name: summary.forward_flops(preset(name), 256)["total"] for name in PRESETS[3:]}
  assert flops["tiny_latent_moe"] == pytest.approx(flops["tiny_moe"], rel=0.02)
  for name, value in flops.items():
    assert value == pytest.approx(flops["tiny_moe"], rel=0.03), (name, flops)


def test_latent_moe_follows_the_design_rule():
  moe, latent = preset("tiny_moe").model.moe, preset("tiny_latent_moe").model
  assert latent.moe.latent_size * 4 == latent.d_model
  assert latent.moe.num_experts == 4 * moe.num_experts
  assert 3 * moe.top_k <= latent.moe.top_k <= 4 * moe.top_k


@pytest.mark.parametrize("window", [0, 5, 64])
def test_mean_keys_counts_the_mask(window):
  seq_len = 37
  q, k = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
  mask = (q >= k) & ((q - k < window) if window else True)
  assert summary.mean_keys(seq_len, window) == pytest.approx(mask.sum() / seq_len)
  assert summary.mean_keys(seq_len, window, causal=False) == seq_len


def test_cache_bytes_match_the_mamba_state_and_kv_shapes():
  c = tiny_config("M*M", {"attention.sliding_window": 16})
  m = c.model
  x = jax.ShapeDtypeStruct((1, 8, m.d_model), jnp.float32)
  layer = Mamba2(m, 0.02)
  variables = jax.eval_shape(layer.init, jax.random.key(0), x)
  _, state = jax.eval_shape(layer.apply, variables, x)
  got = summary.cache_bytes(c, 100, dtype="bfloat16", ssm_dtype="float32")
  assert got["conv"] == 2 * np.prod(state.conv.shape) * 2
  assert got["ssm"] == 2 * np.prod(state.ssm.shape) * 4
  # The window caps the keys kept: K and V of kv_heads x head_dim each.
  a = m.attention
  assert got["kv"] == 2 * a.num_kv_heads * a.head_dim * 16 * 2
  assert summary.cache_bytes(c, 100)["dtype"] == m.compute_dtype


def test_cli_json_has_the_keys_and_takes_overrides():
  cmd = [sys.executable, "-m", "nemotron_jax.summary", "--config=configs/tiny_moe.py", "--json",
         "--seq_len=128", "--context=512", "--config.model.moe.top_k=3"]
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
  s = json.loads(out)
  for key in ("total", "active", "active_no_embedding", "embedding", "lm_head", "mtp",
              "by_mixer", "forward_flops_per_token", "train_flops_per_token", "cache_bytes"):
    assert key in s, key
  assert s["seq_len"] == 128 and s["context"] == 512
  m = preset("tiny_moe").model
  expert = 2 * m.d_model * m.moe.d_ff
  # One more expert per token in each of the 3 MoE layers.
  assert s["active"] - counts("tiny_moe")["active"] == 3 * expert
  assert s["train_flops_per_token"] == 3 * s["forward_flops_per_token"]


def test_cli_memory_report_splits_the_state_and_names_a_bad_mesh():
  cmd = [sys.executable, "-m", "nemotron_jax.summary", "--config=configs/tiny_moe.py", "--json",
         "--memory", "--devices=4", "--config.mesh.data=1", "--config.mesh.fsdp=4",
         "--config.train.batch_size=4", "--config.data.seq_len=32"]
  s = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.splitlines()[-1])
  r = s["memory"]
  assert r["devices"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1, "expert": 1}
  b = r["per_device_bytes"]
  assert b["peak"] == b["arguments"] + b["outputs"] + b["temp"] - b["aliased"]
  # float32 parameters and two Adam moments, a quarter of them per device.
  state = 3 * 4 * s["total"]
  assert state / 4 <= b["arguments"] <= 1.25 * state / 4, b["arguments"] / state
  bad = subprocess.run(cmd[:-4] + ["--config.mesh.data=3", "--config.mesh.fsdp=1"], cwd=ROOT,
                       capture_output=True, text=True)
  assert bad.returncode != 0 and "has 3 devices but there are 4" in bad.stderr
