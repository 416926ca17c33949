"""Hugging Face interop: Nemotron-H / Nemotron 3 checkpoints in the hub layout.

`load_checkpoint(path) -> (config, variables)` and
`save_checkpoint(config, variables, path)`. The hub layout names tensors
`backbone.embeddings.weight`, `backbone.layers.{i}.norm.weight`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`, `lm_head.weight`,
with one `experts.{j}.up_proj.weight` / `down_proj.weight` per expert. One
table (`_layout`) says how each hub tensor is made of this project's
parameters; loading, saving and the shape checks all read it.

dt semantics: NVIDIA's modelling code and Megatron clamp dt to the config's
`time_step_limit` (absent: `(0, inf)`, no clamp), which is what the published
checkpoints were trained and are served with; `dt_limit="checkpoint"` (the
default) imports that. transformers 5.23 instead clamps below at
`time_step_min`; `dt_limit="transformers"` reproduces it, for parity tests
against the installed transformers.

Loading streams: each variable is built shard by shard with
`jax.make_array_from_callback` from slices read with the `safetensors`
library, so a process reads only the slices its devices hold and no
whole-model copy exists on the host. Saving converts each variable once,
writes shards as they fill, and works when variables span processes.
"""

from __future__ import annotations

import collections
import json
import logging
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import ml_dtypes
import numpy as np
import flax.linen as nn
from jax.experimental import multihost_utils
from jax.sharding import SingleDeviceSharding
from safetensors import safe_open
from safetensors.numpy import save_file

from nemotron_jax import config as config_lib
from nemotron_jax import model as model_lib
from nemotron_jax import sharding as sharding_lib

log = logging.getLogger(__name__)

_BLOCK_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                "mlp": "-", "moe": "E"}
_HUB_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_SAVE_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# The safetensors library maps dtypes to numpy by name and numpy has no float8 types, so
# float8 tensors (NVIDIA's FP8 checkpoints) are read from the file's header directly.
_FLOAT8 = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
DT_LIMITS = ("checkpoint", "transformers")
DEFAULT_SHARD_BYTES = 5_000_000_000  # transformers' save_pretrained default


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it claims to hold."""


# --- config ---------------------------------------------------------------------------------


def _get(hf: dict, *names, default=None):
  for name in names:
    if name in hf and hf[name] is not None:
      return hf[name]
  return default


def _limit_value(value) -> float:
  """A `time_step_limit` bound as a float; anything past float32's range (Ultra's 1e308) is inf,
  which is what it becomes in the float32 clamp anyway. transformers' save_pretrained writes
  infinity as {"__float__": "Infinity"}, hub files as a bare JSON Infinity."""
  if isinstance(value, dict) and "__float__" in value:
    value = value["__float__"]
  value = float(value)
  return math.inf if value >= float(np.finfo(np.float32).max) else value


def _block_pattern(hf: dict, list_key: str, string_key: str) -> str | None:
  kinds = _get(hf, list_key)
  if kinds:
    unknown = sorted({t for t in kinds if t not in _BLOCK_TYPES})
    if unknown:
      raise CheckpointError(f"config.json {list_key} has unknown types {unknown}; "
                            f"valid: {sorted(_BLOCK_TYPES)}")
    return "".join(_BLOCK_TYPES[t] for t in kinds)
  return _get(hf, string_key)


def config_from_hf(hf: dict, *, dt_limit: str = "checkpoint") -> ml_collections.ConfigDict:
  """A full config from a Hugging Face nemotron_h config.json dict.

  `dt_limit`: "checkpoint" takes `time_step_limit` (absent: (0, inf)), NVIDIA's
  semantics; "transformers" clamps at (time_step_min, inf) as transformers 5.23 does.
  """
  if dt_limit not in DT_LIMITS:
    raise CheckpointError(f"dt_limit = {dt_limit!r} is invalid; expected one of {list(DT_LIMITS)}")
  pattern = _block_pattern(hf, "layers_block_type", "hybrid_override_pattern")
  if not pattern:
    raise CheckpointError("config.json has neither layers_block_type nor hybrid_override_pattern")
  unsupported = {
      "use_bias": (False,), "mlp_bias": (False,), "attention_bias": (False,),
      "mamba_proj_bias": (False,), "tie_word_embeddings": (False,), "use_conv_bias": (True,),
      "mlp_hidden_act": ("relu2",), "mamba_hidden_act": ("silu",)}
  for key, valid in unsupported.items():
    if key in hf and hf[key] not in valid:
      raise CheckpointError(f"config.json {key} = {hf[key]!r} is not supported; valid: {list(valid)}")

  c = config_lib.default_config()
  m = c.model
  m.pattern = pattern
  m.d_model = hf["hidden_size"]
  m.vocab_size = hf["vocab_size"]
  m.norm_eps = _get(hf, "layer_norm_epsilon", "rms_norm_eps", "norm_eps", default=1e-5)
  m.init_std = _get(hf, "initializer_range", default=0.02)
  mcfg = m.mamba
  mcfg.num_heads = _get(hf, "mamba_num_heads", default=mcfg.num_heads)
  mcfg.head_dim = _get(hf, "mamba_head_dim", default=mcfg.head_dim)
  mcfg.d_state = _get(hf, "ssm_state_size", default=mcfg.d_state)
  mcfg.n_groups = _get(hf, "n_groups", "mamba_n_groups", default=mcfg.n_groups)
  mcfg.conv_kernel = _get(hf, "conv_kernel", "mamba_d_conv", default=mcfg.conv_kernel)
  mcfg.chunk_size = _get(hf, "chunk_size", "mamba_chunk_size", default=mcfg.chunk_size)
  mcfg.dt_min = float(_get(hf, "time_step_min", "mamba_dt_min", default=mcfg.dt_min))
  mcfg.dt_max = float(_get(hf, "time_step_max", "mamba_dt_max", default=mcfg.dt_max))
  mcfg.dt_init_floor = float(_get(hf, "time_step_floor", "mamba_dt_init_floor",
                                  default=mcfg.dt_init_floor))
  if dt_limit == "transformers":
    mcfg.dt_limit = (mcfg.dt_min, math.inf)
  else:
    limit = _get(hf, "time_step_limit", "mamba_dt_limit", default=(0.0, math.inf))
    if not isinstance(limit, (list, tuple)) or len(limit) != 2:
      raise CheckpointError(f"config.json time_step_limit = {limit!r} is invalid; "
                            "expected a pair [low, high]")
    mcfg.dt_limit = tuple(_limit_value(v) for v in limit)
  acfg = m.attention
  acfg.num_heads = _get(hf, "num_attention_heads", default=acfg.num_heads)
  acfg.num_kv_heads = _get(hf, "num_key_value_heads", default=acfg.num_heads)
  acfg.head_dim = _get(hf, "head_dim", "attention_head_dim", default=acfg.head_dim)
  acfg.pos_emb = "none"
  acfg.sliding_window = 0
  m.mlp.d_ff = _get(hf, "intermediate_size", default=m.mlp.d_ff)
  ecfg = m.moe
  ecfg.num_experts = _get(hf, "n_routed_experts", default=ecfg.num_experts)
  ecfg.top_k = _get(hf, "num_experts_per_tok", default=ecfg.top_k)
  ecfg.d_ff = _get(hf, "moe_intermediate_size", default=ecfg.d_ff)
  ecfg.shared_d_ff = _get(hf, "moe_shared_expert_intermediate_size", default=ecfg.shared_d_ff)
  ecfg.routed_scaling = float(_get(hf, "routed_scaling_factor", default=1.0))
  ecfg.n_group = _get(hf, "n_group", default=1)
  ecfg.topk_group = _get(hf, "topk_group", default=1)
  ecfg.norm_topk_prob = bool(_get(hf, "norm_topk_prob", default=True))
  ecfg.latent_size = hf.get("moe_latent_size")
  blocks = _get(hf, "num_nextn_predict_layers", default=0)
  if blocks:
    m.mtp.pattern = _block_pattern(hf, "mtp_layers_block_type",
                                   "mtp_hybrid_override_pattern") or m.mtp.pattern
    # The hub config counts physical blocks; how many depths a shared block serves is ours.
    depths = _get(hf, "mtp_num_depths", default=blocks)
    if blocks > 1 and depths != blocks:
      raise CheckpointError(f"config.json has {blocks} MTP blocks but mtp_num_depths = {depths}; "
                            "unshared blocks serve one depth each")
    m.mtp.num_depths = depths
    m.mtp.share_weights = blocks == 1
  config_lib.validate_model(m)
  return c


def config_to_hf(config, dtype: str | None = None) -> dict:
  """The config.json dict of the hub layout, with the field names published hub configs use.

  `time_step_limit` carries `model.mamba.dt_limit` (NVIDIA's semantics); transformers
  ignores it and clamps at `time_step_min`, which here is the dt init range's low end.
  """
  m = config_lib.model_section(config)
  mcfg, acfg, ecfg = m.mamba, m.attention, m.moe
  if acfg.pos_emb != "none" or acfg.sliding_window:
    raise CheckpointError("transformers' nemotron_h has no positional embedding and no sliding "
                          f"window: model.attention.pos_emb={acfg.pos_emb!r}, "
                          f"sliding_window={acfg.sliding_window} cannot be exported")
  if "E" in m.pattern and not ecfg.shared_d_ff:
    raise CheckpointError("model.moe.shared_d_ff = 0 cannot be exported: transformers always "
                          "builds one shared expert")
  return {
      "architectures": ["NemotronHForCausalLM"],
      "model_type": "nemotron_h",
      "torch_dtype": dtype or m.param_dtype,
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "hybrid_override_pattern": m.pattern,
      "num_hidden_layers": len(m.pattern),
      "tie_word_embeddings": False,
      "layer_norm_epsilon": m.norm_eps,
      "norm_eps": m.norm_eps,
      "initializer_range": m.init_std,
      "num_attention_heads": acfg.num_heads,
      "num_key_value_heads": acfg.num_kv_heads,
      "head_dim": acfg.head_dim,
      "attention_bias": False,
      "intermediate_size": m.mlp.d_ff,
      "mlp_hidden_act": "relu2",
      "mamba_num_heads": mcfg.num_heads,
      "mamba_head_dim": mcfg.head_dim,
      "mamba_hidden_act": "silu",
      "mamba_proj_bias": False,
      "ssm_state_size": mcfg.d_state,
      "n_groups": mcfg.n_groups,
      "conv_kernel": mcfg.conv_kernel,
      "chunk_size": mcfg.chunk_size,
      "time_step_min": mcfg.dt_min,
      "time_step_max": mcfg.dt_max,
      "time_step_floor": mcfg.dt_init_floor,
      "time_step_limit": [float(v) for v in mcfg.dt_limit],
      "n_routed_experts": ecfg.num_experts,
      "n_shared_experts": 1,
      "num_experts_per_tok": ecfg.top_k,
      "moe_intermediate_size": ecfg.d_ff,
      "moe_shared_expert_intermediate_size": ecfg.shared_d_ff,
      "moe_latent_size": ecfg.latent_size,
      "routed_scaling_factor": ecfg.routed_scaling,
      "n_group": ecfg.n_group,
      "topk_group": ecfg.topk_group,
      "norm_topk_prob": ecfg.norm_topk_prob,
      "use_bias": False,
      "mlp_bias": False,
      "use_conv_bias": True,
      "residual_in_fp32": False,
      **_mtp_to_hf(m),
  }


def _mtp_to_hf(m) -> dict:
  t = m.mtp
  if not t.num_depths:
    return {"num_nextn_predict_layers": 0}
  return {"num_nextn_predict_layers": 1 if t.share_weights else t.num_depths,
          "mtp_hybrid_override_pattern": t.pattern,
          "mtp_num_depths": t.num_depths}


# --- tensor layout --------------------------------------------------------------------------


class Part(NamedTuple):
  path: tuple  # (collection, module..., leaf)
  kind: str  # "T" transpose a kernel, "conv" [k c] <-> [c 1 k], "id" unchanged
  expert: int | None = None  # index into a stacked [experts, ...] parameter


def _block_layout(m, kind: str, hub: str, path: tuple) -> dict[str, list[Part]]:
  """Hub tensors of one block: `hub` is its hub prefix, `path` its module path in ours."""
  ours = ("params",) + path
  mix = ours + ("mixer",)
  out = {f"{hub}.norm.weight": [Part(ours + ("norm", "weight"), "id")]}
  lin = lambda name: Part(mix + (name, "kernel"), "T")
  if kind == "M":
    out[f"{hub}.mixer.in_proj.weight"] = [lin(f"in_proj_{n}") for n in ("z", "x", "B", "C", "dt")]
    out[f"{hub}.mixer.conv1d.weight"] = [Part(mix + (f"conv_{n}_weight",), "conv")
                                        for n in ("x", "B", "C")]
    out[f"{hub}.mixer.conv1d.bias"] = [Part(mix + (f"conv_{n}_bias",), "id")
                                      for n in ("x", "B", "C")]
    for name in ("A_log", "D", "dt_bias"):
      out[f"{hub}.mixer.{name}"] = [Part(mix + (name,), "id")]
    out[f"{hub}.mixer.norm.weight"] = [Part(mix + ("norm", "weight"), "id")]
    out[f"{hub}.mixer.out_proj.weight"] = [lin("out_proj")]
  elif kind == "*":
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
      out[f"{hub}.mixer.{name}.weight"] = [lin(name)]
  elif kind == "-":
    for name in ("up_proj", "down_proj"):
      out[f"{hub}.mixer.{name}.weight"] = [lin(name)]
  else:
    e = m.moe
    out[f"{hub}.mixer.gate.weight"] = [Part(mix + ("router",), "T")]
    out[f"{hub}.mixer.gate.e_score_correction_bias"] = [
        Part(("moe_state",) + path + ("mixer", "e_score_correction_bias"), "id")]
    for j in range(e.num_experts):
      out[f"{hub}.mixer.experts.{j}.up_proj.weight"] = [Part(mix + ("experts_up",), "T", j)]
      out[f"{hub}.mixer.experts.{j}.down_proj.weight"] = [Part(mix + ("experts_down",), "T", j)]
    if e.shared_d_ff:
      for name in ("up_proj", "down_proj"):
        out[f"{hub}.mixer.shared_experts.{name}.weight"] = [
            Part(mix + ("shared_experts", name, "kernel"), "T")]
    if e.latent_size is not None:
      for name in ("fc1_latent_proj", "fc2_latent_proj"):
        out[f"{hub}.mixer.{name}.weight"] = [lin(name)]
  return out


def _layout(m) -> dict[str, list[Part]]:
  """Hub tensor name -> the parts it concatenates (along its first axis), in order.

  MTP blocks follow the Nemotron 3 hub layout: `mtp.layers.{i}` numbers the
  layers of every physical block in turn; a block's first layer also holds
  enorm, hnorm and eh_proj, its last the final_layernorm.
  """
  out = {"backbone.embeddings.weight": [Part(("params", "embedding"), "id")],
         "backbone.norm_f.weight": [Part(("params", "norm_f", "weight"), "id")],
         "lm_head.weight": [Part(("params", "lm_head", "kernel"), "T")]}
  for i, kind in enumerate(m.pattern):
    out.update(_block_layout(m, kind, f"backbone.layers.{i}", (f"layers_{i}",)))
  t = m.mtp
  blocks = (1 if t.share_weights else t.num_depths) if t.num_depths else 0
  for j in range(blocks):
    first, last = j * len(t.pattern), (j + 1) * len(t.pattern) - 1
    block = ("params", f"mtp_{j}")
    for name in ("enorm", "hnorm"):
      out[f"mtp.layers.{first}.{name}.weight"] = [Part(block + (name, "weight"), "id")]
    out[f"mtp.layers.{first}.eh_proj.weight"] = [Part(block + ("eh_proj", "kernel"), "T")]
    out[f"mtp.layers.{last}.final_layernorm.weight"] = [
        Part(block + ("final_layernorm", "weight"), "id")]
    for i, kind in enumerate(t.pattern):
      out.update(_block_layout(m, kind, f"mtp.layers.{first + i}", (f"mtp_{j}", f"layers_{i}")))
  return out


def _leaf(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _hub_shape(shape, part: Part):
  if part.expert is not None:
    shape = shape[1:]
  if part.kind == "T":
    return tuple(reversed(shape))
  if part.kind == "conv":
    return (shape[1], 1, shape[0])
  return tuple(shape)


def variable_shapes(config):
  """Shapes of this project's variables for a config, computed without allocating."""
  model = model_lib.build_model(config)
  return jax.eval_shape(lambda: model_lib.init_variables(model, jax.random.PRNGKey(0)))


def hub_shapes(config) -> dict[str, tuple]:
  """Expected hub tensor shapes for a config."""
  shapes = variable_shapes(config)
  out = {}
  for name, parts in _layout(config_lib.model_section(config)).items():
    pieces = [_hub_shape(_leaf(shapes, p.path).shape, p) for p in parts]
    out[name] = (sum(s[0] for s in pieces),) + pieces[0][1:]
  return out


def variable_shardings(config, mesh):
  """NamedShardings of the variables ({"params", "moe_state"?}) by the rules table."""
  model = model_lib.build_model(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  boxed = {k: v for k, v in boxed.items() if k != "moe_stats"}
  shardings = sharding_lib.logical_to_sharding(
      boxed, mesh, sharding_lib.rules(config_lib.model_section(config), mesh))
  sharding_lib.check_divisible(nn.meta.unbox(boxed), shardings, mesh)
  return shardings


# --- load -----------------------------------------------------------------------------------


def _weight_files(path: str) -> dict[str, str]:
  """Hub tensor name -> the safetensors file holding it."""
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    for name in sorted(set(weight_map.values())):
      if not os.path.isfile(os.path.join(path, name)):
        raise CheckpointError(f"{index} names shard {name!r}, which does not exist")
    return {k: os.path.join(path, v) for k, v in weight_map.items()}
  if os.path.isfile(single):
    with safe_open(single, framework="numpy") as f:
      return {k: single for k in f.keys()}
  raise CheckpointError(f"{path!r} holds neither model.safetensors nor "
                        "model.safetensors.index.json")


def _float8_slice(file: str, name: str, index: tuple) -> np.ndarray:
  """A slice of a float8 tensor, located through the file's JSON header."""
  with open(file, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    info = json.loads(f.read(n))[name]
  begin, _ = info["data_offsets"]
  data = np.memmap(file, dtype=_FLOAT8[info["dtype"]], mode="r", offset=8 + n + begin,
                   shape=tuple(info["shape"]))
  return np.array(data[index])


class _Reader:
  """Slices of hub tensors from a checkpoint folder's safetensors files; counts bytes read."""

  def __init__(self, path: str):
    self.files = _weight_files(path)
    self._handles = {}
    self.bytes_read = 0

  def _slice(self, name: str):
    file = self.files[name]
    if file not in self._handles:
      self._handles[file] = safe_open(file, framework="numpy")
    return self._handles[file].get_slice(name)

  def shape(self, name: str) -> tuple:
    return tuple(self._slice(name).get_shape())

  def read(self, name: str, index: tuple) -> np.ndarray:
    """tensor[index] in the file's dtype; `index` holds one slice per dimension."""
    piece = self._slice(name)
    if piece.get_dtype() in _FLOAT8:
      out = _float8_slice(self.files[name], name, index)
    else:
      out = piece[index]
    self.bytes_read += out.nbytes
    return out


class _Source(NamedTuple):
  """Where one variable lies in the hub tensors."""
  kind: str  # Part.kind
  names: tuple  # the hub tensor, or one per expert of a stacked [experts, ...] variable
  offset: int  # first row of the variable along the hub tensor's first axis


def _sources(layout: dict, shapes) -> dict[tuple, _Source]:
  out, experts = {}, collections.defaultdict(dict)
  for name, parts in layout.items():
    offset = 0
    for part in parts:
      if part.expert is None:
        out[part.path] = _Source(part.kind, (name,), offset)
      else:
        experts[part.path][part.expert] = (name, part.kind)
      offset += _hub_shape(_leaf(shapes, part.path).shape, part)[0]
  for path, by_expert in experts.items():
    out[path] = _Source(by_expert[0][1], tuple(by_expert[j][0] for j in range(len(by_expert))), 0)
  return out


def _read_variable(reader: _Reader, src: _Source, shape: tuple, index: tuple) -> np.ndarray:
  """variable[index] (one slice per dimension) from the hub slices that hold it."""
  bounds = [s.indices(d)[:2] for s, d in zip(index, shape)]
  rows = lambda lo, hi: slice(src.offset + lo, src.offset + hi)
  if src.kind == "id":
    return reader.read(src.names[0], (rows(*bounds[0]),) + tuple(slice(*b) for b in bounds[1:]))
  if src.kind == "conv":  # ours [k c], hub [c 1 k]
    return reader.read(src.names[0], (rows(*bounds[1]), slice(None), slice(*bounds[0])))[:, 0].T
  if len(src.names) == 1:  # ours [in out], hub [out in]
    return reader.read(src.names[0], (rows(*bounds[1]), slice(*bounds[0]))).T
  (e0, e1), (i0, i1), (o0, o1) = bounds  # ours [experts in out], hub per expert [out in]
  return np.stack([reader.read(src.names[j], (rows(o0, o1), slice(i0, i1))).T
                   for j in range(e0, e1)])


def _build_variable(reader: _Reader, src: _Source, leaf, leaf_sharding) -> jax.Array:
  """One variable as a jax.Array, each addressable shard read and cast (once) on its own."""
  keys = lambda index: tuple(s.indices(d)[:2] for s, d in zip(index, leaf.shape))
  # A shard several local devices hold (replicated axes) is read once and shared.
  uses = collections.Counter(keys(i) for i in
                             leaf_sharding.addressable_devices_indices_map(leaf.shape).values())
  cache = {}

  def shard(index):
    index = tuple(index) + (slice(None),) * (len(leaf.shape) - len(index))
    key = keys(index)
    value = cache.pop(key, None)
    if value is None:
      value = np.ascontiguousarray(_read_variable(reader, src, leaf.shape, index), leaf.dtype)
    uses[key] -= 1
    if uses[key] > 0:
      cache[key] = value
    return value

  return jax.make_array_from_callback(leaf.shape, leaf_sharding, shard)


def _resolve_mtp(m, names: set) -> set:
  """The hub tensor names to load: MTP tensors only where config.json declares MTP layers; a
  declared MTP head without tensors is dropped (model.mtp.num_depths = 0)."""
  mtp = {k for k in names if k.startswith("mtp.")}
  if mtp and not m.mtp.num_depths:
    log.warning("%d MTP tensors (mtp.*) are not loaded: config.json declares no MTP layers "
                "(num_nextn_predict_layers)", len(mtp))
    return names - mtp
  if m.mtp.num_depths and not mtp:
    # transformers' save_pretrained keeps the MTP config but has no MTP weights to save.
    log.warning("config.json declares MTP layers but the checkpoint holds no mtp.* tensors: "
                "loading without the MTP head")
    m.mtp.num_depths = 0
  return names


def read_config(path: str, *, dt_limit: str = "checkpoint") -> ml_collections.ConfigDict:
  """The full config of a hub checkpoint folder's config.json."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{path!r} has no config.json (expected a Hugging Face checkpoint folder)")
  with open(cfg_path) as f:
    return config_from_hf(json.load(f), dt_limit=dt_limit)


def load_checkpoint(path: str, *, mesh=None, dt_limit: str = "checkpoint",
                    param_dtype: str | None = None, config=None):
  """Reads a hub-layout checkpoint folder: returns (config, variables).

  Every variable is a jax.Array: sharded over `mesh` by the rules table
  (`sharding.py`), or on this process's first device without one. Each
  process reads only the slices its devices hold, in the file's dtype, and
  casts them once to `param_dtype` (default: the config's, float32 master
  weights; `model.compute_dtype` is left as it is). `dt_limit` chooses the dt
  clamp: "checkpoint" (NVIDIA's semantics) or "transformers" (see the module
  docstring). `config`, when given, replaces the one read from config.json;
  it must describe the checkpoint's shapes (as `init_config`'s does).
  """
  if config is None:
    config = read_config(path, dt_limit=dt_limit)
  if param_dtype is not None:
    if param_dtype not in config_lib.DTYPES:
      raise CheckpointError(f"param_dtype = {param_dtype!r} is invalid; expected one of "
                            f"{list(config_lib.DTYPES)}")
    config.model.param_dtype = param_dtype
  reader = _Reader(path)
  names = _resolve_mtp(config.model, set(reader.files))

  layout = _layout(config.model)
  expected = hub_shapes(config)
  missing = sorted(set(expected) - names)
  unexpected = sorted(names - set(expected))
  misshaped = sorted(f"{k}: file {reader.shape(k)}, expected {expected[k]}"
                     for k in set(expected) & names if reader.shape(k) != expected[k])
  if missing or unexpected or misshaped:
    lines = [f"checkpoint {path!r} does not match its config.json:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise CheckpointError("\n".join(lines))

  shapes = variable_shapes(config)
  if mesh is None:
    device = SingleDeviceSharding(jax.local_devices()[0])
    shardings = jax.tree.map(lambda _: device, shapes)
  else:
    shardings = variable_shardings(config, mesh)
  sources = _sources(layout, shapes)
  variables = jax.tree_util.tree_map_with_path(
      lambda p, leaf, s: _build_variable(reader, sources[tuple(k.key for k in p)], leaf, s),
      shapes, shardings)
  log.info("%s: read %d bytes of hub tensors on process %d", path, reader.bytes_read,
           jax.process_index())
  return config, variables


# Model fields that change numerics but no shape: a run starting from a hub checkpoint keeps
# its own values of these (and of every field under them).
NUMERICS_FIELDS = ("param_dtype", "compute_dtype", "remat", "mamba.ssd_impl", "mamba.kernel",
                   "moe.impl", "moe.ep_capacity_factor", "moe.bias_update_rate",
                   "moe.balance_loss_coef", "mtp.loss_scale", "precision", "generation")


def _flat(node, prefix: str = ""):
  for key, value in node.items():
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flat(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _numerics(field: str) -> bool:
  return any(field == f or field.startswith(f + ".") for f in NUMERICS_FIELDS)


def init_config(config, overrides: dict | None = None) -> ml_collections.ConfigDict:
  """The run's config with its model section from `config.init.hf_checkpoint`'s config.json.

  The fields in NUMERICS_FIELDS keep the run's values (preset and command line);
  every other model field, dt_limit included (chosen by `init.dt_limit`), comes
  from the checkpoint. `overrides` are the command line's flattened fields
  ("model.d_model": 64, ...): one naming any other model field raises
  ConfigError, since it would change the shapes of the checkpoint's weights.
  """
  path = config.init.hf_checkpoint
  for key in sorted(overrides or {}):
    if key.startswith("model.") and not _numerics(key[len("model."):]):
      raise config_lib.ConfigError(
          f"--config.{key} cannot be set with init.hf_checkpoint={path!r}: the model comes from "
          "its config.json; overridable model fields: " + ", ".join(NUMERICS_FIELDS)
          + " (the dt clamp: init.dt_limit)")
  model = read_config(path, dt_limit=config.init.dt_limit).model
  _resolve_mtp(model, set(_weight_files(path)))
  for field, value in _flat(config.model):
    if _numerics(field):
      *parents, leaf = field.split(".")
      node = model
      for name in parents:
        node = node[name]
      node[leaf] = value
  out = config.copy_and_resolve_references()
  out.model = model
  return config_lib.validate(out)


# --- save -----------------------------------------------------------------------------------


def _to_hub(a: np.ndarray, part: Part) -> np.ndarray:
  if part.expert is not None:
    a = a[part.expert]
  if part.kind == "T":
    return a.T
  if part.kind == "conv":
    return a.T[:, None, :]
  return a


def _host_copy(x, dtype) -> np.ndarray:
  """A variable on the host in `dtype`, cast before the transfer; gathered across processes."""
  if isinstance(x, jax.Array):
    x = x.astype(dtype)
    if not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return np.asarray(x).astype(dtype, copy=False)


def save_checkpoint(config, variables, path: str, *, dtype: str | None = None,
                    max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
  """Writes config.json and safetensors shards of at most `max_shard_bytes` in the hub layout.

  Each variable is cast to `dtype` (default: model.param_dtype; the MoE score
  correction bias stays float32, as transformers keeps it) and copied to the
  host once, and a shard is written as soon as its tensors are complete, so
  the host holds about one shard at a time. Variables may span processes:
  every process must call this, process 0 writes.
  """
  m = config_lib.model_section(config)
  dtype = dtype or m.param_dtype
  if dtype not in _SAVE_DTYPES:
    raise CheckpointError(f"dtype = {dtype!r} cannot be saved; expected one of {list(_SAVE_DTYPES)}")
  hf_config = config_to_hf(config, dtype)
  layout = _layout(m)
  leaf_dtype, uses, nbytes = {}, collections.Counter(), {}
  for name, parts in layout.items():
    keep_f32 = name.endswith("e_score_correction_bias")  # transformers keeps it in fp32
    for p in parts:
      leaf_dtype[p.path] = np.dtype(np.float32 if keep_f32 else _SAVE_DTYPES[dtype])
      uses[p.path] += 1
    shapes = [_hub_shape(_leaf(variables, p.path).shape, p) for p in parts]
    nbytes[name] = (sum(s[0] for s in shapes) * math.prod(shapes[0][1:])
                    * leaf_dtype[parts[0].path].itemsize)
  shards, size = [[]], 0
  for name in layout:
    if shards[-1] and size + nbytes[name] > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(name)
    size += nbytes[name]

  writer = jax.process_index() == 0
  if writer:
    os.makedirs(path, exist_ok=True)
  files = (["model.safetensors"] if len(shards) == 1 else
           [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
  host = {}
  for fname, shard in zip(files, shards):
    tensors = {}
    for name in shard:
      pieces = []
      for p in layout[name]:
        if p.path not in host:
          host[p.path] = _host_copy(_leaf(variables, p.path), leaf_dtype[p.path])
        pieces.append(_to_hub(host[p.path], p))
        uses[p.path] -= 1
        if not uses[p.path]:
          del host[p.path]
      if writer:
        # safetensors writes an array's memory as it lies, so each tensor is made C-ordered
        # (np.concatenate of transposed pieces keeps their Fortran order).
        tensors[name] = np.ascontiguousarray(
            pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0))
    if writer:
      save_file(tensors, os.path.join(path, fname), metadata={"format": "pt"})
  if writer:
    if len(shards) > 1:
      with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes.values())},
                   "weight_map": {n: fname for fname, s in zip(files, shards) for n in s}},
                  f, indent=2)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(hf_config, f, indent=2)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"hf.save_checkpoint {path}")
