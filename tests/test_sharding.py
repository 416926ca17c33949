"""One train step under several meshes equals the unsharded step; parameters follow the rules."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from nemotron_jax import ConfigError, build_model, sharding
from nemotron_jax.layers import moe
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


def one_step(shape, devices=None, tensor_split="width"):
  c = mesh_config(shape)
  c.model.moe.tensor_split = tensor_split
  mesh = sharding.make_mesh(c.mesh, devices)
  trainer = Trainer(c, build_model(c), mesh)
  state = trainer.init_state(0)
  new_state, metrics = trainer.train_step(state, trainer.shard_batch(batch()))
  return new_state, jax.device_get(metrics)


@pytest.fixture(scope="module")
def reference():
  state, metrics = one_step((1, 1, 1, 1), devices=jax.devices()[:1])
  return jax.device_get(state), metrics


def assert_step_matches(reference, state, metrics):
  """The sharded step's metrics, parameters and expert biases equal the unsharded step's."""
  ref_state, ref_metrics = reference
  assert metrics["moe_dropped_fraction"] == 0.0  # nothing overflows, so the steps agree
  np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], ref_metrics["grad_norm"], rtol=1e-4)
  # Adam's first step moves each weight by about lr * sign(g); summation order changes g
  # in the last bits only, so updated weights agree to well under lr = 1e-2.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4),
               jax.device_get(state.params), ref_state.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.moe_state),
               ref_state.moe_state)
  return state


@pytest.mark.parametrize("shape", MESHES, ids=[str(m) for m in MESHES])
def test_sharded_step_matches_unsharded(shape, reference):
  state = assert_step_matches(reference, *one_step(shape))

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


def test_experts_split_over_tensor_match_unsharded(reference):
  """moe.tensor_split = "experts" on expert 4 x tensor 2: each device holds one whole expert
  and routes an eighth of the tokens; the step equals the unsharded one."""
  state = assert_step_matches(reference, *one_step((1, 1, 2, 4), tensor_split="experts"))
  up = state.params["layers_3"]["mixer"]["experts_up"]
  assert up.sharding.spec == P(("expert", "tensor"), "fsdp", None)
  assert up.addressable_shards[0].data.shape == (1, *up.shape[1:])


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


def test_process_rows_are_the_rows_the_process_devices_own():
  # 8 simulated devices split between 2 simulated processes: devices 0-3 and 4-7.
  devices = jax.devices()[:8]
  process_of = lambda device: devices.index(device) // 4  # noqa: E731

  def rows(order, shape, p):
    mesh = jax.sharding.Mesh(np.array([devices[i] for i in order]).reshape(shape), sharding.MESH_AXES)
    return sharding.process_rows(mesh, 16, process_index=p, process_count=2, process_of=process_of)

  # Devices in process order, on data alone, data x fsdp, or data x tensor (replicas in a process).
  for shape in ((8, 1, 1, 1), (2, 4, 1, 1), (4, 1, 2, 1)):
    assert [rows(range(8), shape, p) for p in range(2)] == [(0, 8), (8, 16)], shape
  # Processes interleaved along the batch: process 1 would feed rows 8-15 to devices holding
  # rows 2, 3, 6, 7, ...
  interleaved = [0, 4, 1, 5, 2, 6, 3, 7]
  with pytest.raises(ConfigError, match=r"process 1 of 2 feeds rows \[8, 16\) .* own rows "
                                        r"\[2, 3, 6, 7, 10, 11, 14, 15\]"):
    rows(interleaved, (8, 1, 1, 1), 1)
  # Tensor replicas of each row block in both processes: each process's devices own every row.
  with pytest.raises(ConfigError, match=r"process 0 of 2 feeds rows \[0, 8\) .* own rows "
                                        r"\[0, 1, 2, 3, 4, 5, 6, 7\]\.\.\."):
    rows(interleaved, (4, 1, 2, 1), 0)
  # The real process: one process owns every row.
  assert sharding.process_rows(sharding.make_mesh(mesh_config((8, 1, 1, 1)).mesh), 16) == (0, 16)


# MoE at scale: compile-only checks of the train step on 8 simulated devices, at a shape
# where every device holds 2 rows x 64 tokens (128 tokens, 512 token copies at top-4) and
# the global batch holds 8 times that.
ROWS, SEQ, TOP_K = 2, 64, 4
COLLECTIVE = re.compile(r"^\s*(?:ROOT )?%?[\w.\-]+ = (.*?) (all-gather|all-reduce|all-to-all|"
                        r"reduce-scatter|collective-permute)(?:-start)?\(", re.M)
SHAPE = re.compile(r"\w+\[([\d,]*)\]")


def moe_step(shape, *, latent=None, tensor_split="width"):
  """The compiled train step of a two-layer MoE model on a mesh of `shape`, ROWS rows per
  batch shard."""
  c = tiny_config("EE", {"moe.num_experts": 16, "moe.top_k": TOP_K, "moe.d_ff": 16,
                         "moe.shared_d_ff": 40, "moe.latent_size": latent,
                         "moe.tensor_split": tensor_split})
  c.data.seq_len = SEQ
  for axis, size in zip(sharding.MESH_AXES, shape):
    c.mesh[axis] = size
  n = math.prod(shape)
  c.train.batch_size = ROWS * n // shape[2]
  trainer = Trainer(c, build_model(c), sharding.make_mesh(c.mesh, jax.devices()[:n]))
  return trainer.compile_train_step()


def collective_dims(compiled) -> dict:
  """Collective op name -> set of operand/result shapes (tuples of dims) in the HLO."""
  found = {}
  for types, op in COLLECTIVE.findall(compiled.as_text()):
    for dims in SHAPE.findall(types):
      found.setdefault(op, set()).add(tuple(int(d) for d in dims.split(",") if d))
  return found


@pytest.fixture(scope="module")
def one_device_moe():
  return moe_step((1, 1, 1, 1)).memory_analysis()


@pytest.mark.parametrize("shape,bound", [((8, 1, 1, 1), 1.3), ((1, 1, 1, 8), 1.5)],
                         ids=["data8", "expert8"])
def test_moe_runs_per_shard(shape, bound, one_device_moe):
  compiled = moe_step(shape)
  ratio = compiled.memory_analysis().temp_size_in_bytes / one_device_moe.temp_size_in_bytes
  assert ratio <= bound, f"per-device temp is {ratio:.2f}x one device's with its share"
  tokens, copies = ROWS * SEQ * 8, ROWS * SEQ * 8 * TOP_K
  found = collective_dims(compiled)
  for op, shapes in found.items():
    for dims in shapes:
      assert tokens not in dims and copies not in dims, f"{op} of global token shape {dims}"
  if shape[3] > 1:
    # Each destination gets ceil(2.0 * 512 / 8) = 128 rows: twice the even share, not
    # the worst case of all 512.
    a2a = {dims for dims in found["all-to-all"] if len(dims) == 3}
    assert a2a == {(1, 128, 32)}, a2a


def test_experts_split_over_tensor_exchange_a_tensor_share_of_the_copies():
  """Expert 2 x tensor 4: splitting the width leaves every device of a tensor group with all
  its 128 tokens' 512 copies (capacity ceil(2.0 * 512 / 2) = 512 rows per destination);
  splitting the experts over all 8 devices gives each 32 tokens, 128 copies and
  ceil(2.0 * 128 / 8) = 32 rows per destination, and less temp."""
  shape = (1, 1, 4, 2)
  width, experts = moe_step(shape), moe_step(shape, tensor_split="experts")
  rows = lambda compiled: {dims for dims in collective_dims(compiled)["all-to-all"]
                           if len(dims) == 3}
  assert rows(width) == {(1, 512, 32)} and rows(experts) == {(1, 32, 32)}
  ratio = (experts.memory_analysis().temp_size_in_bytes
           / width.memory_analysis().temp_size_in_bytes)
  assert ratio <= 0.5, f"splitting the experts over tensor keeps {ratio:.2f}x the temp"


def test_latent_moe_parameters_split_eight_ways():
  one = moe_step((1, 1, 1, 1), latent=24).memory_analysis().argument_size_in_bytes
  eight = moe_step((1, 4, 1, 2), latent=24).memory_analysis().argument_size_in_bytes
  assert eight <= 1.25 * one / 8, f"fsdp 4 x expert 2 holds {8 * eight / one:.2f}/8 of the state"


@pytest.mark.parametrize("exchange", ["padded", "emulated"])
def test_expert_parallel_overflow_is_counted_exactly(exchange):
  """Capacity 3 rows per destination: the copies past it are dropped, counted, and contribute
  zero; everything else equals the dense reference. "emulated" checks the offsets of the
  ragged exchange that accelerators run."""
  ep, t, k, d, f, e = 4, 6, 2, 8, 12, 8
  keys = jax.random.split(jax.random.PRNGKey(3), 4)
  x = jax.random.normal(keys[0], (ep * t, d))
  logits = jax.random.normal(keys[1], (ep * t, e)) * 3
  weights, experts, _ = moe.route(logits, jnp.zeros(e), top_k=k, n_group=1, topk_group=1,
                                  norm_topk_prob=True, routed_scaling=1.0)
  up = jax.random.normal(keys[2], (e, d, f)) / d ** 0.5
  down = jax.random.normal(keys[3], (e, f, d)) / f ** 0.5
  capacity = 3
  mesh = jax.make_mesh((ep,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:ep])

  def body(*args):
    out, dropped = moe.expert_parallel_experts(*args, axis="expert", capacity=capacity,
                                               exchange=exchange)
    return out, dropped[None]

  split = P("expert")
  out, dropped = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(split,) * 5,
                                       out_specs=(split, split)))(x, weights, experts, up, down)
  # Reference: per source shard, copies in (expert, token, slot) order fill each
  # destination's rows; those past `capacity` are dropped.
  ids = np.asarray(experts)
  kept = np.ones(ids.shape, bool)
  expected_drops = []
  for s in range(ep):
    used = np.zeros(ep, int)
    drops = 0
    rows = ids[s * t:(s + 1) * t]
    for flat in sorted(range(t * k), key=lambda i: (rows.reshape(-1)[i], i)):
      dest = rows.reshape(-1)[flat] // (e // ep)
      if used[dest] >= capacity:
        kept[s * t + flat // k, flat % k] = False
        drops += 1
      used[dest] += 1
    expected_drops.append(drops)
  assert sum(expected_drops) > 0  # the case really overflows
  np.testing.assert_array_equal(np.asarray(dropped), expected_drops)
  reference = moe.dense_experts(x, jnp.where(kept, weights, 0.0), experts, up, down)
  np.testing.assert_allclose(out, reference, rtol=1e-5, atol=1e-5)


def test_expert_parallel_step_sends_ragged_rows_on_gpu():
  """Exported for CUDA, the expert-parallel train step exchanges tokens with
  ragged-all-to-all (only the real rows); on CPU it runs the padded all-to-all."""
  c = tiny_config("E", {"moe.num_experts": 8, "moe.top_k": 2})
  c.data.seq_len, c.train.batch_size = 16, 4
  c.mesh.data, c.mesh.expert = 1, 4
  trainer = Trainer(c, build_model(c), sharding.make_mesh(c.mesh, jax.devices()[:4]))
  with jax.set_mesh(trainer.mesh):
    exported = jax.export.export(trainer._train_jit, platforms=("cuda",), disabled_checks=[
        jax.export.DisabledSafetyCheck.custom_call("ragged_all_to_all")])(
        trainer.abstract_state(), trainer.abstract_batch())
  text = exported.mlir_module()
  # Forward: rows and expert ids out, results back; backward: the transposes of both ways.
  assert text.count("@ragged_all_to_all(") >= 4, "no ragged exchange in the CUDA module"
  assert "ragged-all-to-all" not in trainer.compile_train_step().as_text()


def test_train_step_reports_dropped_copies():
  """A quarter of the even share per destination cannot hold the copies: the step counts
  the dropped ones (at least three quarters of all) in moe_dropped_fraction."""
  c = mesh_config((1, 1, 1, 4))
  c.model.moe.ep_capacity_factor = 0.25
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:4])
  trainer = Trainer(c, build_model(c), mesh)
  _, metrics = trainer.train_step(trainer.init_state(0), trainer.shard_batch(batch()))
  assert 0.75 <= float(metrics["moe_dropped_fraction"]) < 1.0
  assert np.isfinite(float(metrics["loss"]))
