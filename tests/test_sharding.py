"""One train step under several meshes equals the unsharded step; parameters follow the rules."""

import math

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nemotron_jax import ConfigError, build_model, sharding
from nemotron_jax.train_lib import Trainer
from conftest import tiny_config

MESHES = [(8, 1, 1, 1), (2, 2, 2, 1), (1, 2, 1, 4)]


def mesh_config(shape):
  c = tiny_config("M*-E", {"moe.n_group": 2, "moe.topk_group": 1})
  c.data.source = "mqar"
  c.train.batch_size = 8
  c.train.lr = 1e-2
  c.train.warmup_steps = 0
  for axis, size in zip(sharding.MESH_AXES, shape):
    c.mesh[axis] = size
  return c


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
  segments = np.where(np.arange(16) < 9, 1, 2)[None].repeat(8, 0).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segments,
          "loss_mask": np.ones((8, 16), np.float32)}


def one_step(shape, devices=None):
  c = mesh_config(shape)
  mesh = sharding.make_mesh(c.mesh, devices)
  trainer = Trainer(c, build_model(c), mesh)
  state = trainer.init_state(0)
  new_state, metrics = trainer.train_step(state, trainer.shard_batch(batch()))
  return new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference():
  state, metrics = one_step((1, 1, 1, 1), devices=jax.devices()[:1])
  return jax.device_get(state), metrics


@pytest.mark.parametrize("shape", MESHES, ids=[str(m) for m in MESHES])
def test_sharded_step_matches_unsharded(shape, reference):
  ref_state, ref_metrics = reference
  state, metrics = one_step(shape)
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  # Adam's first step moves each weight by about lr * sign(g); summation order changes g
  # in the last bits only, so updated weights agree to well under lr = 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               jax.device_get(state.params), ref_state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.moe_state),
               ref_state.moe_state)

  params = state.params
  mesh_sizes = dict(zip(sharding.MESH_AXES, shape))
  dense = ("fsdp", "expert")  # the model width of dense weights splits over both
  expected = {
      ("layers_1", "mixer", "q_proj", "kernel"): P(dense, "tensor"),
      ("layers_1", "mixer", "k_proj", "kernel"): P(dense, "tensor"),
      ("layers_0", "mixer", "in_proj_x", "kernel"): P(dense, "tensor"),
      ("layers_0", "mixer", "out_proj", "kernel"): P("tensor", dense),
      ("layers_2", "mixer", "up_proj", "kernel"): P(dense, "tensor"),
      ("layers_3", "mixer", "experts_up"): P("expert", "fsdp", "tensor"),
      ("layers_3", "mixer", "shared_experts", "up_proj", "kernel"): P(dense, "tensor"),
      ("embedding",): P("tensor", dense),
      ("lm_head", "kernel"): P(dense, "tensor"),
  }
  for path, spec in expected.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    assert leaf.sharding.spec == spec, (path, leaf.sharding.spec)
    # Each device holds exactly its share of the array.
    shard = leaf.addressable_shards[0].data.shape
    for dim, full, axes in zip(shard, leaf.shape, spec):
      assert dim == full // math.prod(mesh_sizes[a] for a in sharding.spec_axes(axes))
  opt_mu = state.opt_state[1][0].mu["layers_3"]["mixer"]["experts_up"]
  assert opt_mu.sharding.spec == P("expert", "fsdp", "tensor")


def test_mesh_errors_name_the_problem():
  c = mesh_config((3, 1, 1, 1))
  with pytest.raises(ConfigError, match="has 3 devices but there are 8"):
    sharding.make_mesh(c.mesh)
  c = mesh_config((-1, 1, 3, 1))
  with pytest.raises(ConfigError, match="multiple of 3 devices"):
    sharding.make_mesh(c.mesh)
  c = mesh_config((1, 1, 8, 1))
  mesh = sharding.make_mesh(c.mesh)
  with pytest.raises(ConfigError, match="mesh.tensor = 8 must divide model.attention.num_heads"):
    Trainer(c, build_model(c), mesh)
  c.model.pattern = "M-E"  # 4 Mamba heads cannot split 8 ways
  with pytest.raises(ConfigError, match=r"A_log'\] dim 4 over \('tensor',\) \(size 8\)"):
    Trainer(c, build_model(c), mesh)
