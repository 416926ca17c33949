"""Device mesh and the one table that maps logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with parameters
sharded along `embed`), tensor (attention heads, MLP width, Mamba heads,
vocabulary), expert (experts split across devices, tokens exchanged by
all-to-all in `layers/moe.py`). Activations are sharded along the batch over
data, fsdp and expert together.
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

RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", "tensor"),
    ("ssm_inner", "tensor"),
    ("ssm_heads", "tensor"),
    ("expert_mlp", "tensor"),
    ("exp", "expert"),
    ("latent", None),
    ("ssm_state", None),
    ("conv", None),
    ("norm", None),
    ("length", None),
    ("act_embed", None),
)


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


def logical_to_sharding(boxed_tree, mesh: Mesh):
  """NamedShardings for a tree of logically partitioned (boxed) values."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, RULES)


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


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def expert_axis_size() -> int:
  """Size of the `expert` axis of the mesh in context (1 outside a mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or "expert" not in mesh.axis_names:
    return 1
  return mesh.shape["expert"]


def local_batch_to_global(batch: dict, mesh: Mesh) -> dict:
  """Each process's rows -> global arrays sharded along the batch."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_rows(mesh: Mesh, global_batch: int) -> tuple[int, int]:
  """The rows [lo, hi) of a global batch that this process's devices own in `batch_sharding`.

  The data pipeline feeds process p rows [p B / P, (p + 1) B / P); raises if the
  mesh gives this process other rows, which would pair its rows with the wrong devices.
  """
  owned = set()
  for index in batch_sharding(mesh).addressable_devices_indices_map((global_batch, 1)).values():
    owned.update(range(global_batch)[index[0]])
  local = global_batch // jax.process_count()
  lo = jax.process_index() * local
  if owned != set(range(lo, lo + local)):
    raise ConfigError(
        f"process {jax.process_index()} of {jax.process_count()} feeds rows [{lo}, {lo + local}) "
        f"of each batch of {global_batch}, but its devices own rows {sorted(owned)[:8]}... in the "
        f"batch sharding of mesh {dict(mesh.shape)}; order the mesh's devices by process")
  return lo, lo + local
