"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters
sharded along `embed`), tensor (attention heads, MLP width, Mamba heads,
vocabulary), expert (experts split across devices, tokens exchanged by
all-to-all in `layers/moe.py`; dense weights split over it like fsdp).
Activations are sharded along the batch over data, fsdp and expert together,
and constrained by logical names inside each mixer and on the logits.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import flax.linen as nn
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from nemotron_jax.config import ConfigError

MESH_AXES = ("data", "fsdp", "tensor", "expert")
BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axes, by priority: a name takes the first of its rules whose mesh
# axes the array has not used yet. Batch-like axes split over data, fsdp and expert
# together. Weights split their model width (embed, latent) over fsdp and expert, so
# the expert axis shards dense weights as FSDP does; expert weights, whose `exp` axis
# takes `expert`, split their width over fsdp alone. Heads, widths and the vocabulary
# split over tensor; `kv` (KV heads x head_dim of the K/V projections) and `kv_heads`
# split only whole heads: `rules` replicates them where tensor does not divide the KV
# heads, as Megatron-LM does.
RULES = (
    ("batch", BATCH_AXES),
    ("exp", "expert"),
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("latent", ("fsdp", "expert")),
    ("latent", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("expert_mlp", "tensor"),
    ("ssm_state", None),
    ("conv", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


def rules(model_cfg=None, mesh: Mesh | None = None) -> tuple:
  """RULES for a model on a mesh: K/V heads are replicated over `tensor` where its size
  does not divide model.attention.num_kv_heads (never split inside a head); with
  model.moe.tensor_split = "experts", routed experts split over expert x tensor and
  keep their width whole."""
  if model_cfg is None or mesh is None:
    return RULES
  table = RULES
  if model_cfg.moe.tensor_split == "experts":
    # `expert_mlp` then finds `tensor` taken by `exp` and stays whole.
    table = tuple((name, ("expert", "tensor") if name == "exp" else axes)
                  for name, axes in table)
  if "*" not in model_cfg.pattern + (model_cfg.mtp.pattern if model_cfg.mtp.num_depths else ""):
    return table
  a, tensor = model_cfg.attention, mesh.shape["tensor"]
  if a.num_heads % tensor:
    raise ConfigError(f"mesh.tensor = {tensor} must divide model.attention.num_heads = "
                      f"{a.num_heads}; pick a tensor size that divides it")
  if a.num_kv_heads % tensor == 0:
    return table
  return tuple((name, None if name in ("kv", "kv_heads") else axes) for name, axes in table)


def spec(logical, rules=None, keep=None) -> P:
  """The PartitionSpec of logical axis names under `rules` (default: those in context, else
  RULES). With `keep`, only those names keep their mesh axes; the others are None."""
  rules = rules or nn.get_logical_axis_rules() or RULES
  axes = list(nn.logical_to_mesh_axes(logical, rules))
  axes += [None] * (len(logical) - len(axes))
  if keep is not None:
    axes = [a if name in keep else None for name, a in zip(logical, axes)]
  return P(*axes)


def spec_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, a name, or a tuple of names)."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """Sizes of (data, fsdp, tensor, expert), resolving one -1; checks they use every device."""
  sizes = [mesh_cfg[a] for a in MESH_AXES]
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise ConfigError(
          f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes need a multiple of {fixed} devices "
          f"but there are {num_devices}; choose sizes whose product divides {num_devices}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices but there are "
        f"{num_devices}; make the product equal {num_devices} or set one axis to -1")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_cfg, len(devices))
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


def logical_to_sharding(boxed_tree, mesh: Mesh, table: tuple = RULES):
  """NamedShardings for a tree of logically partitioned (boxed) values under `table`."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, table)


def check_divisible(abstract_tree, shardings, mesh: Mesh) -> None:
  """Raises ConfigError listing every array dimension its mesh axes do not divide."""
  problems = []

  def visit(path, leaf, sharding):
    for dim, axes in zip(leaf.shape, sharding.spec):
      if axes is None:
        continue
      axes = (axes,) if isinstance(axes, str) else axes
      size = math.prod(mesh.shape[a] for a in axes)
      if dim % size:
        problems.append(f"{jax.tree_util.keystr(path)} dim {dim} over {axes} (size {size})")

  jax.tree_util.tree_map_with_path(visit, abstract_tree, shardings)
  if problems:
    raise ConfigError("the mesh does not divide these parameter dimensions: "
                      + "; ".join(problems[:10]) + (" ..." if len(problems) > 10 else "")
                      + f". Mesh: {dict(mesh.shape)}; pick axis sizes that divide them")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token arrays [batch, length]: batch split over data, fsdp and expert."""
  return NamedSharding(mesh, P(BATCH_AXES, None))


def check_batch(batch_size: int, mesh: Mesh, grad_accum_steps: int = 1) -> None:
  """Raises ConfigError unless the batch axes (data x fsdp x expert) times the microbatches
  divide `batch_size`."""
  sizes = [mesh.shape[a] for a in BATCH_AXES]
  if batch_size % math.prod(sizes):
    raise ConfigError(f"config field 'train.batch_size' = {batch_size} is invalid: it must be "
                      f"divisible by the batch axes data x fsdp x expert = "
                      f"{' x '.join(map(str, sizes))} = {math.prod(sizes)} of the mesh")
  if (batch_size // math.prod(sizes)) % grad_accum_steps:
    raise ConfigError(
        f"config field 'train.grad_accum_steps' = {grad_accum_steps} is invalid: it must divide "
        f"each batch shard's {batch_size // math.prod(sizes)} rows (train.batch_size "
        f"{batch_size} / batch axes {math.prod(sizes)})")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def local_batch_to_global(batch: dict, mesh: Mesh) -> dict:
  """Each process's rows -> global arrays sharded along the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_rows(mesh: Mesh, global_batch: int, *, process_index: int | None = None,
                 process_count: int | None = None, process_of=None) -> tuple[int, int]:
  """The rows [lo, hi) of a global batch that this process's devices own in `batch_sharding`.

  The data pipeline feeds process p rows [p B / P, (p + 1) B / P); raises if the
  mesh gives this process other rows, which would pair its rows with the wrong devices.
  The keywords default to this process: jax.process_index(), jax.process_count() and each
  device's `process_index` (`process_of(device)`), and let a check of a simulated
  multi-process mesh name others.
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  process_of = (lambda device: device.process_index) if process_of is None else process_of
  owned = set()
  for device, rows in batch_sharding(mesh).devices_indices_map((global_batch, 1)).items():
    if process_of(device) == index:
      owned.update(range(global_batch)[rows[0]])
  local = global_batch // count
  lo = index * local
  if owned != set(range(lo, lo + local)):
    raise ConfigError(
        f"process {index} of {count} feeds rows [{lo}, {lo + local}) "
        f"of each batch of {global_batch}, but its devices own rows {sorted(owned)[:8]}... in the "
        f"batch sharding of mesh {dict(mesh.shape)}; order the mesh's devices by process")
  return lo, lo + local
