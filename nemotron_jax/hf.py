"""Hugging Face interop: Nemotron-H / Nemotron 3 checkpoints in the hub layout.

`load_checkpoint(path) -> (config, variables)` and
`save_checkpoint(config, variables, path)`. The hub layout names tensors
`backbone.embeddings.weight`, `backbone.layers.{i}.norm.weight`,
`backbone.layers.{i}.mixer.*`, `backbone.norm_f.weight`, `lm_head.weight`,
with one `experts.{j}.up_proj.weight` / `down_proj.weight` per expert. One
table (`_layout`) says how each hub tensor is made of this project's
parameters; loading, saving and the shape checks all read it.

Semantics follow transformers' `NemotronHForCausalLM`: its Mamba mixer clamps
dt below at `time_step_min` (and nowhere above), so an imported model gets
`mamba.dt_limit = (time_step_min, inf)`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import NamedTuple

import jax
import ml_dtypes
import numpy as np
import ml_collections

from nemotron_jax import config as config_lib
from nemotron_jax import model as model_lib

log = logging.getLogger(__name__)

_BLOCK_TYPES = {"mamba": "M", "linear_attention": "M", "attention": "*", "full_attention": "*",
                "mlp": "-", "moe": "E"}
_BLOCK_NAMES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
_HUB_TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_, "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
# Smallest positive normal float32: stands for "no lower clamp" in a config that must name one.
_TINY = float(np.finfo(np.float32).tiny)


class CheckpointError(ValueError):
  """A checkpoint that does not match the model it claims to hold."""


# --- safetensors ----------------------------------------------------------------------------


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """Memory-maps a .safetensors file: {name: array}."""
  with open(path, "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
  data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _ST_DTYPES:
      raise CheckpointError(f"{path}: tensor {name!r} has dtype {info['dtype']}, "
                            f"supported: {sorted(_ST_DTYPES)}")
    begin, end = info["data_offsets"]
    out[name] = data[begin:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
  return out


def write_safetensors(path: str, tensors: dict[str, np.ndarray]) -> None:
  header, offset = {"__metadata__": {"format": "pt"}}, 0
  arrays = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
  for name, a in arrays.items():
    header[name] = {"dtype": _ST_NAMES[a.dtype], "shape": list(a.shape),
                    "data_offsets": [offset, offset + a.nbytes]}
    offset += a.nbytes
  raw = json.dumps(header, separators=(",", ":")).encode()
  raw += b" " * (-len(raw) % 8)
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)
    for a in arrays.values():
      f.write(a.tobytes())


def _read_all(path: str) -> dict[str, np.ndarray]:
  index = os.path.join(path, "model.safetensors.index.json")
  single = os.path.join(path, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
    tensors = {}
    for name in files:
      shard = os.path.join(path, name)
      if not os.path.isfile(shard):
        raise CheckpointError(f"{index} names shard {name!r}, which does not exist")
      tensors.update(read_safetensors(shard))
    return tensors
  if os.path.isfile(single):
    return read_safetensors(single)
  raise CheckpointError(f"{path!r} holds neither model.safetensors nor "
                        "model.safetensors.index.json")


# --- config ---------------------------------------------------------------------------------


def _get(hf: dict, *names, default=None):
  for name in names:
    if name in hf and hf[name] is not None:
      return hf[name]
  return default


def _infinite(value) -> float:
  if isinstance(value, dict) and "__float__" in value:
    return float(value["__float__"])
  return float(value)


def config_from_hf(hf: dict) -> ml_collections.ConfigDict:
  """A full config from a Hugging Face nemotron_h config.json dict."""
  if "layers_block_type" in hf and hf["layers_block_type"]:
    unknown = sorted({t for t in hf["layers_block_type"] if t not in _BLOCK_TYPES})
    if unknown:
      raise CheckpointError(f"config.json layers_block_type has unknown types {unknown}; "
                            f"valid: {sorted(_BLOCK_TYPES)}")
    pattern = "".join(_BLOCK_TYPES[t] for t in hf["layers_block_type"])
  elif "hybrid_override_pattern" in hf:
    pattern = hf["hybrid_override_pattern"]
  else:
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
  m.norm_eps = _get(hf, "layer_norm_epsilon", "rms_norm_eps", default=1e-5)
  m.init_std = _get(hf, "initializer_range", default=0.02)
  a = m.mamba
  a.num_heads = _get(hf, "mamba_num_heads", default=a.num_heads)
  a.head_dim = _get(hf, "mamba_head_dim", default=a.head_dim)
  a.d_state = _get(hf, "ssm_state_size", default=a.d_state)
  a.n_groups = _get(hf, "n_groups", "mamba_n_groups", default=a.n_groups)
  a.conv_kernel = _get(hf, "conv_kernel", "mamba_d_conv", default=a.conv_kernel)
  a.chunk_size = _get(hf, "chunk_size", "mamba_chunk_size", default=a.chunk_size)
  a.dt_min = float(_get(hf, "time_step_min", "mamba_dt_min", default=a.dt_min))
  a.dt_max = float(_get(hf, "time_step_max", "mamba_dt_max", default=a.dt_max))
  a.dt_init_floor = float(_get(hf, "time_step_floor", "mamba_dt_init_floor", default=a.dt_init_floor))
  a.dt_limit = (a.dt_min, math.inf)
  t = m.attention
  t.num_heads = _get(hf, "num_attention_heads", default=t.num_heads)
  t.num_kv_heads = _get(hf, "num_key_value_heads", default=t.num_heads)
  t.head_dim = _get(hf, "head_dim", "attention_head_dim", default=t.head_dim)
  t.pos_emb = "none"
  t.sliding_window = 0
  m.mlp.d_ff = _get(hf, "intermediate_size", default=m.mlp.d_ff)
  e = m.moe
  e.num_experts = _get(hf, "n_routed_experts", default=e.num_experts)
  e.top_k = _get(hf, "num_experts_per_tok", default=e.top_k)
  e.d_ff = _get(hf, "moe_intermediate_size", default=e.d_ff)
  e.shared_d_ff = _get(hf, "moe_shared_expert_intermediate_size", default=e.shared_d_ff)
  e.routed_scaling = float(_get(hf, "routed_scaling_factor", default=1.0))
  e.n_group = _get(hf, "n_group", default=1)
  e.topk_group = _get(hf, "topk_group", default=1)
  e.norm_topk_prob = bool(_get(hf, "norm_topk_prob", default=True))
  e.latent_size = hf.get("moe_latent_size")
  blocks = _get(hf, "num_nextn_predict_layers", default=0)
  if blocks:
    kinds = _get(hf, "mtp_layers_block_type")
    if kinds:
      unknown = sorted({t for t in kinds if t not in _BLOCK_TYPES})
      if unknown:
        raise CheckpointError(f"config.json mtp_layers_block_type has unknown types {unknown}; "
                              f"valid: {sorted(_BLOCK_TYPES)}")
      m.mtp.pattern = "".join(_BLOCK_TYPES[t] for t in kinds)
    else:
      m.mtp.pattern = _get(hf, "mtp_hybrid_override_pattern", default=m.mtp.pattern)
    # The hub config counts physical blocks; how many depths a shared block serves is ours.
    depths = _get(hf, "mtp_num_depths", default=blocks)
    if blocks > 1 and depths != blocks:
      raise CheckpointError(f"config.json has {blocks} MTP blocks but mtp_num_depths = {depths}; "
                            "unshared blocks serve one depth each")
    m.mtp.num_depths = depths
    m.mtp.share_weights = blocks == 1
  config_lib.validate_model(m)
  return c


def config_to_hf(config) -> dict:
  """The config.json dict transformers' NemotronHConfig reads."""
  m = config_lib.model_section(config)
  a, t, e = m.mamba, m.attention, m.moe
  if t.pos_emb != "none" or t.sliding_window:
    raise CheckpointError("transformers' nemotron_h has no positional embedding and no sliding "
                          f"window: model.attention.pos_emb={t.pos_emb!r}, "
                          f"sliding_window={t.sliding_window} cannot be exported")
  if a.dt_limit[1] != math.inf:
    raise CheckpointError(f"model.mamba.dt_limit = {tuple(a.dt_limit)} cannot be exported: "
                          "transformers clamps dt only from below (at time_step_min)")
  if "E" in m.pattern and not e.shared_d_ff:
    raise CheckpointError("model.moe.shared_d_ff = 0 cannot be exported: transformers always "
                          "builds one shared expert")
  return {
      "architectures": ["NemotronHForCausalLM"],
      "model_type": "nemotron_h",
      "vocab_size": m.vocab_size,
      "hidden_size": m.d_model,
      "layers_block_type": [_HUB_TYPES[ch] for ch in m.pattern],
      "tie_word_embeddings": False,
      "layer_norm_epsilon": m.norm_eps,
      "initializer_range": m.init_std,
      "num_attention_heads": t.num_heads,
      "num_key_value_heads": t.num_kv_heads,
      "head_dim": t.head_dim,
      "intermediate_size": m.mlp.d_ff,
      "mlp_hidden_act": "relu2",
      "mamba_num_heads": a.num_heads,
      "mamba_head_dim": a.head_dim,
      "ssm_state_size": a.d_state,
      "n_groups": a.n_groups,
      "conv_kernel": a.conv_kernel,
      "chunk_size": a.chunk_size,
      # transformers clamps dt at time_step_min, so it carries the lower dt limit.
      "time_step_min": a.dt_limit[0] if a.dt_limit[0] > 0 else _TINY,
      "time_step_max": a.dt_max,
      "time_step_floor": a.dt_init_floor,
      "n_routed_experts": e.num_experts,
      "num_experts_per_tok": e.top_k,
      "moe_intermediate_size": e.d_ff,
      "moe_shared_expert_intermediate_size": e.shared_d_ff,
      "moe_latent_size": e.latent_size,
      "routed_scaling_factor": e.routed_scaling,
      "n_group": e.n_group,
      "topk_group": e.topk_group,
      "norm_topk_prob": e.norm_topk_prob,
      "use_bias": False,
      "mlp_bias": False,
      "use_conv_bias": True,
      **_mtp_to_hf(m),
  }


def _mtp_to_hf(m) -> dict:
  t = m.mtp
  if not t.num_depths:
    return {"num_nextn_predict_layers": 0}
  return {"num_nextn_predict_layers": 1 if t.share_weights else t.num_depths,
          "mtp_layers_block_type": [_HUB_TYPES[ch] for ch in t.pattern],
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


def _to_hub(a: np.ndarray, part: Part) -> np.ndarray:
  if part.expert is not None:
    a = a[part.expert]
  if part.kind == "T":
    return a.T
  if part.kind == "conv":
    return a.T[:, None, :]
  return a


def _from_hub(a: np.ndarray, part: Part) -> np.ndarray:
  if part.kind == "T":
    return a.T
  if part.kind == "conv":
    return a[:, 0, :].T
  return a


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


# --- load / save ----------------------------------------------------------------------------


def load_checkpoint(path: str, *, dtype: str = "float32"):
  """Reads a hub-layout checkpoint folder: returns (config, variables) with params in `dtype`."""
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise CheckpointError(f"{path!r} has no config.json (expected a Hugging Face checkpoint folder)")
  with open(cfg_path) as f:
    config = config_from_hf(json.load(f))
  config.model.param_dtype = dtype
  config.model.compute_dtype = dtype
  tensors = _read_all(path)
  mtp = sorted(k for k in tensors if k.startswith("mtp."))
  if mtp and not config.model.mtp.num_depths:
    log.warning("%d MTP tensors (mtp.*) are not loaded: config.json declares no MTP layers "
                "(num_nextn_predict_layers)", len(mtp))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
  if config.model.mtp.num_depths and not mtp:
    # transformers' save_pretrained keeps the MTP config but has no MTP weights to save.
    log.warning("config.json declares MTP layers but the checkpoint holds no mtp.* tensors: "
                "loading without the MTP head")
    config.model.mtp.num_depths = 0

  layout = _layout(config.model)
  expected = hub_shapes(config)
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  misshaped = sorted(f"{k}: file {tuple(tensors[k].shape)}, expected {expected[k]}"
                     for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k])
  if missing or unexpected or misshaped:
    lines = [f"checkpoint {path!r} does not match its config.json:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
      if items:
        lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:20])
                     + (" ..." if len(items) > 20 else ""))
    raise CheckpointError("\n".join(lines))

  shapes = variable_shapes(config)
  arrays = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  for name, parts in layout.items():
    src = np.asarray(tensors[name], np.float32)
    sizes = [_hub_shape(_leaf(shapes, p.path).shape, p)[0] for p in parts]
    for part, piece in zip(parts, np.split(src, np.cumsum(sizes)[:-1], axis=0)):
      dst = _leaf(arrays, part.path)
      if part.expert is None:
        dst[...] = _from_hub(piece, part)
      else:
        dst[part.expert] = _from_hub(piece, part)
  return config, jax.tree.map(jax.numpy.asarray, arrays)


def save_checkpoint(config, variables, path: str, *, dtype: str | None = None,
                    max_shard_bytes: int | None = None) -> None:
  """Writes config.json and safetensors (sharded above `max_shard_bytes`) in the hub layout."""
  m = config_lib.model_section(config)
  hf_config = config_to_hf(config)
  hf_config["dtype"] = dtype or m.param_dtype
  np_dtype = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16,
              "float16": np.float16}[hf_config["dtype"]]
  layout = _layout(m)
  tensors = {}
  for name, parts in layout.items():
    pieces = [_to_hub(np.asarray(_leaf(variables, p.path), np.float32), p) for p in parts]
    tensor = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=0)
    keep_f32 = name.endswith("e_score_correction_bias")  # transformers keeps it in fp32
    tensors[name] = tensor.astype(np.float32 if keep_f32 else np_dtype)

  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2)
  shards, current, size = [], {}, 0
  for name, tensor in tensors.items():
    if current and max_shard_bytes and size + tensor.nbytes > max_shard_bytes:
      shards.append(current)
      current, size = {}, 0
    current[name] = tensor
    size += tensor.nbytes
  shards.append(current)
  if len(shards) == 1:
    write_safetensors(os.path.join(path, "model.safetensors"), shards[0])
    return
  weight_map = {}
  for k, shard in enumerate(shards):
    fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
    write_safetensors(os.path.join(path, fname), shard)
    weight_map.update({name: fname for name in shard})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f, indent=2)
