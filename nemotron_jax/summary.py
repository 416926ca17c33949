"""Parameter, FLOP and inference-cache accounting of a config, without allocating weights.

  python -m nemotron_jax.summary --config=configs/nano.py --seq_len=8192 --context=131072
  python -m nemotron_jax.summary --config=configs/super.py --json \
      --config.model.generation.cache_dtype=float32
  python -m nemotron_jax.summary --config=configs/nano.py --memory --devices=8 \
      --config.mesh.fsdp=8 --config.train.batch_size=8

`--memory` compiles the real training step (forward, backward, optimiser
update, with the config's mesh, remat and precision) for `--devices`
simulated CPU devices from abstract arrays, so nothing is allocated and no
data is read, and reports XLA's per-device buffer sizes (`memory_report`,
scheduled to save memory: MEMORY_XLA_FLAGS).

Parameter shapes come from `jax.eval_shape` of the model's own init, so the
counts are those of the code, never of a second formula that could drift.
Conventions (NEMOTRON.md §3): `active` counts the top_k chosen experts, the
shared expert, the router and everything outside the MoE layers, including
both embedding matrices; `active_no_embedding` leaves the input embedding out.
MTP parameters are outside both and reported apart. Per-mixer counts include
each block's pre-norm.

Forward FLOPs per token at sequence length T (a multiply-add is 2 FLOPs;
norms, activations, softmax, routing and other elementwise work are left out):
  matmul     2 x every active parameter that multiplies an activation: all
             kernels, the router, the top_k experts' up/down matrices, the
             depthwise conv (2 k C) and the LM head. The input embedding is a
             gather and costs nothing.
  attention  per '*' layer 4 x heads x head_dim x keys (2 for q.k, 2 for p.v),
             keys = the mean number of keys a query attends to: (T + 1) / 2
             causal, sum_i min(i + 1, window) / T with a sliding window, and T
             when the masked full square is computed (causal=False).
  ssd        per 'M' layer, the chunked algorithm with chunk Q on c = ceil(T / Q)
             chunks (the length padded to c Q), heads H of width P, G groups of
             state N, divided by T:
               C.B^T inside each chunk        2 c Q^2 G N
               diagonal blocks (scores.x)     2 c Q^2 H P
               each chunk's final state       2 c Q H P N
               state passing across chunks    2 c H P N
               entering state -> outputs      2 c Q H P N
  mtp        per depth: the MTP block's matmuls (eh_proj and its layers) with
             their attention / SSD work, plus the shared LM head; a shared
             block is counted once per depth.
Training FLOPs per token = 3 x forward (the backward pass costs two forwards).

Inference cache of one sequence at context T, in model.generation's dtypes
(the MTP block's own cache during speculative decoding is not counted):
  '*' layer  K and V: 2 x kv_heads x head_dim x min(T, window) x bytes(dtype)
  'M' layer  conv state (conv_kernel - 1) x (d_inner + 2 G N) x bytes(dtype)
             + SSM state H x P x N x bytes(ssm_dtype), whatever T
"""

from __future__ import annotations

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from nemotron_jax import config as config_lib
from nemotron_jax.model import build_model, init_variables

MIXERS = ("M", "*", "-", "E")
EXPERT_PARAMS = ("experts_up", "experts_down")  # [experts, ...]: a token touches top_k of them


def param_shapes(config: ml_collections.ConfigDict) -> dict:
  """The model's parameter tree as ShapeDtypeStructs: traced, never allocated."""
  model = build_model(config)
  return jax.eval_shape(lambda rng: init_variables(model, rng), jax.random.key(0))["params"]


def _group(top: str, pattern: str) -> str:
  """The accounting group of a top-level parameter name."""
  if top in ("embedding", "lm_head", "norm_f"):
    return top
  if top.startswith("layers_"):
    return pattern[int(top.split("_")[1])]
  if top.startswith("mtp"):
    return "mtp"
  raise ValueError(f"summary: top-level parameter {top!r} belongs to no known group "
                   "(embedding, lm_head, norm_f, layers_<i>, mtp*); add it to summary._group")


def _leaves(params: dict, pattern: str):
  """(group, parameter name, shape) of every parameter."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(k, "key", str(k)) for k in path]
    yield _group(names[0], pattern), names[-1], leaf.shape


def _touched(name: str, shape, experts_per_token: int, num_experts: int) -> int:
  """How many of a parameter's entries one token uses."""
  size = math.prod(shape)
  return size * experts_per_token // num_experts if name in EXPERT_PARAMS else size


def count_params(config: ml_collections.ConfigDict, params: dict | None = None) -> dict:
  """Total, active and per-group parameter counts (see the module docstring)."""
  m = config_lib.model_section(config)
  params = param_shapes(config) if params is None else params
  total, active = {}, {}
  for group, name, shape in _leaves(params, m.pattern):
    total[group] = total.get(group, 0) + math.prod(shape)
    active[group] = active.get(group, 0) + _touched(name, shape, m.moe.top_k, m.moe.num_experts)
  main_total = sum(v for k, v in total.items() if k != "mtp")
  main_active = sum(v for k, v in active.items() if k != "mtp")
  return {
      "total": main_total,
      "active": main_active,
      "active_no_embedding": main_active - total["embedding"],
      "embedding": total["embedding"],
      "lm_head": total["lm_head"],
      "mtp": total.get("mtp", 0),
      "mtp_active": active.get("mtp", 0),
      "by_mixer": {k: total.get(k, 0) for k in MIXERS},
      "active_by_mixer": {k: active.get(k, 0) for k in MIXERS},
  }


def mean_keys(seq_len: int, window: int = 0, causal: bool = True) -> float:
  """Mean number of keys per query over a sequence of `seq_len` tokens."""
  if not causal:
    return float(seq_len)
  if not window or window >= seq_len:
    return (seq_len + 1) / 2
  return (window * (window + 1) / 2 + (seq_len - window) * window) / seq_len


def attention_flops(m: ml_collections.ConfigDict, seq_len: int, causal: bool = True) -> float:
  """Score and value FLOPs per token of one attention layer."""
  a = m.attention
  return 4 * a.num_heads * a.head_dim * mean_keys(seq_len, a.sliding_window, causal)


def ssd_flops(m: ml_collections.ConfigDict, seq_len: int) -> float:
  """FLOPs per token of the chunked SSD scan of one Mamba layer."""
  a = m.mamba
  h, p, g, n, q = a.num_heads, a.head_dim, a.n_groups, a.d_state, a.chunk_size
  c = -(-seq_len // q)
  per_sequence = (2 * c * q * q * g * n + 2 * c * q * q * h * p
                  + 2 * c * q * h * p * n + 2 * c * h * p * n + 2 * c * q * h * p * n)
  return per_sequence / seq_len


def forward_flops(config: ml_collections.ConfigDict, seq_len: int, *, causal: bool = True,
                  experts_per_token: int | None = None, params: dict | None = None) -> dict:
  """Forward FLOPs per token at `seq_len`: the main model by kind and by mixer, MTP apart.

  `causal=False` counts the full attention square the masked jnp path computes;
  `experts_per_token` (default moe.top_k) is num_experts for the dense reference
  MoE path, which runs every expert on every token. `mtp` counts every depth:
  its block, its attention / SSD work and the shared LM head.
  """
  m = config_lib.model_section(config)
  if not isinstance(seq_len, int) or seq_len < 1:
    raise ValueError(f"seq_len = {seq_len!r} is invalid: expected a positive integer")
  params = param_shapes(config) if params is None else params
  k = m.moe.top_k if experts_per_token is None else experts_per_token
  by_mixer = {key: 0.0 for key in MIXERS + ("lm_head", "mtp")}
  for group, name, shape in _leaves(params, m.pattern):
    # Vectors (norms, biases, dt_bias, A_log, D) are elementwise work.
    if len(shape) >= 2 and group != "embedding":
      by_mixer[group] += 2 * _touched(name, shape, k, m.moe.num_experts)
  mtp_matmul = by_mixer.pop("mtp")
  matmul = sum(by_mixer.values())

  def sequence_work(pattern: str) -> tuple[float, float]:
    attention = pattern.count("*") * attention_flops(m, seq_len, causal) if "*" in pattern else 0.0
    ssd = pattern.count("M") * ssd_flops(m, seq_len) if "M" in pattern else 0.0
    return attention, ssd

  attention, ssd = sequence_work(m.pattern)
  by_mixer["*"] += attention
  by_mixer["M"] += ssd
  t = m.mtp
  mtp = 0.0
  if t.num_depths:
    # Shared weights: the one physical block runs once per depth.
    mtp = (t.num_depths if t.share_weights else 1) * mtp_matmul + t.num_depths * (
        by_mixer["lm_head"] + sum(sequence_work(t.pattern)))
  return {"matmul": matmul, "attention": attention, "ssd": ssd,
          "total": matmul + attention + ssd, "by_mixer": by_mixer, "mtp": mtp}


def _itemsize(name: str, field: str) -> int:
  if name not in config_lib.DTYPES:
    raise ValueError(f"{field} = {name!r} is invalid: expected one of {list(config_lib.DTYPES)}")
  return jnp.dtype(name).itemsize


def cache_bytes(config: ml_collections.ConfigDict, context: int, *, dtype: str | None = None,
                ssm_dtype: str | None = None) -> dict:
  """Decoding-cache bytes of one sequence at `context` tokens (see the module docstring).

  `dtype` (KV and conv state) defaults to model.generation.cache_dtype, itself
  defaulting to model.compute_dtype; `ssm_dtype` to model.generation.ssm_state_dtype.
  """
  m = config_lib.model_section(config)
  if not isinstance(context, int) or context < 1:
    raise ValueError(f"context = {context!r} is invalid: expected a positive integer")
  dtype = dtype or m.generation.cache_dtype or m.compute_dtype
  ssm_dtype = ssm_dtype or m.generation.ssm_state_dtype
  act, ssm_size = _itemsize(dtype, "dtype"), _itemsize(ssm_dtype, "ssm_dtype")
  kv = conv = ssm = 0
  if "*" in m.pattern:
    a = m.attention
    keys = min(context, a.sliding_window) if a.sliding_window else context
    kv = m.pattern.count("*") * 2 * a.num_kv_heads * a.head_dim * keys * act
  if "M" in m.pattern:
    a = m.mamba
    d_inner = a.num_heads * a.head_dim
    layers = m.pattern.count("M")
    conv = layers * (a.conv_kernel - 1) * (d_inner + 2 * a.n_groups * a.d_state) * act
    ssm = layers * a.num_heads * a.head_dim * a.d_state * ssm_size
  return {"kv": kv, "conv": conv, "ssm": ssm, "total": kv + conv + ssm, "dtype": dtype,
          "ssm_dtype": ssm_dtype}


def summarize(config: ml_collections.ConfigDict, *, seq_len: int, context: int) -> dict:
  """Everything above in one JSON-ready dict."""
  m = config_lib.model_section(config)
  params = param_shapes(config)
  flops = forward_flops(config, seq_len, params=params)
  return {
      **count_params(config, params),
      "layers": {k: m.pattern.count(k) for k in MIXERS},
      "mtp_depths": m.mtp.num_depths,
      "seq_len": seq_len,
      "forward_flops_per_token": flops["total"],
      "train_flops_per_token": 3 * flops["total"],
      "mtp_train_flops_per_token": 3 * flops["mtp"],
      "forward_flops": flops,
      "context": context,
      "cache_bytes": cache_bytes(config, context),
  }


# XLA:CPU's default scheduler starts independent work concurrently and so holds many
# more buffers at once (a Nano MoE layer pair: 49 GB of temp against 28 GB); the report
# uses its memory-minimising order, as GPU compilers schedule under a memory limit.
MEMORY_XLA_FLAGS = "--xla_cpu_enable_concurrency_optimized_scheduler=false"


def memory_report(config: ml_collections.ConfigDict, devices: int) -> dict:
  """Per-device bytes of the compiled train step on the first `devices` CPU devices.

  The mesh is the config's (`mesh.*`, one axis may be -1), the global batch
  train.batch_size x data.seq_len. peak = arguments + outputs + temp - aliased
  (the donated state is both an argument and an output).
  """
  from nemotron_jax import sharding
  from nemotron_jax.train_lib import Trainer
  available = jax.devices("cpu")
  if not isinstance(devices, int) or not 1 <= devices <= len(available):
    raise config_lib.ConfigError(
        f"devices = {devices!r} is invalid: this process has {len(available)} CPU devices; "
        "pass --devices before anything else starts JAX, or set "
        "XLA_FLAGS=--xla_force_host_platform_device_count=N")
  mesh = sharding.make_mesh(config.mesh, available[:devices])
  trainer = Trainer(config, build_model(config), mesh)
  analysis = trainer.compile_train_step().memory_analysis()
  sizes = {"arguments": analysis.argument_size_in_bytes, "outputs": analysis.output_size_in_bytes,
           "temp": analysis.temp_size_in_bytes, "aliased": analysis.alias_size_in_bytes}
  sizes["peak"] = sizes["arguments"] + sizes["outputs"] + sizes["temp"] - sizes["aliased"]
  return {"devices": devices, "mesh": dict(zip(sharding.MESH_AXES, mesh.devices.shape)),
          "batch_size": config.train.batch_size, "seq_len": config.data.seq_len,
          "per_device_bytes": sizes}


_HLO_DEF = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (\w+)\[([\d,]*)\]")
_HLO_DOT = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = \S+ dot\(%([\w.\-]+), %([\w.\-]+)\)(.*)")


def _dims(attrs: str, key: str) -> tuple[int, ...]:
  found = re.search(key + r"=\{([\d,]*)\}", attrs)
  return tuple(int(d) for d in found.group(1).split(",") if d) if found else ()


def compiled_dots(hlo_text: str) -> list[dict]:
  """The dot instructions of a compiled module's text (fused ones included), each as
  {"lhs", "rhs": (dtype, shape), "dims": ((lhs_contracting, rhs_contracting),
  (lhs_batch, rhs_batch)), "flops": 2 x output size x contracted size
  = 2 x lhs size x rhs's free size}.

  Dots inside loop bodies appear once, whatever the trip count. Instruction
  names are unique in a module, so operands are looked up across computations.
  """
  shapes = {}
  for line in hlo_text.splitlines():
    found = _HLO_DEF.match(line)
    if found:
      shapes[found.group(1)] = (found.group(2), tuple(int(d) for d in found.group(3).split(",") if d))
  dots = []
  for line in hlo_text.splitlines():
    found = _HLO_DOT.match(line)
    if not found:
      continue
    lhs, rhs, attrs = shapes[found.group(1)], shapes[found.group(2)], found.group(3)
    contract = (_dims(attrs, "lhs_contracting_dims"), _dims(attrs, "rhs_contracting_dims"))
    batch = (_dims(attrs, "lhs_batch_dims"), _dims(attrs, "rhs_batch_dims"))
    free_rhs = math.prod(n for d, n in enumerate(rhs[1]) if d not in contract[1] + batch[1])
    dots.append({"lhs": lhs, "rhs": rhs, "dims": (contract, batch),
                 "flops": 2 * math.prod(lhs[1]) * free_rhs})
  return dots


def format_memory(r: dict) -> str:
  """A readable table of `memory_report`'s output."""
  mesh = " x ".join(f"{k} {v}" for k, v in r["mesh"].items())
  rows = [(f"train step per device ({r['devices']} devices: {mesh}; "
           f"batch {r['batch_size']} x {r['seq_len']})", "")]
  rows += [(f"  {k}", _bytes(v)) for k, v in r["per_device_bytes"].items()]
  width = max(len(a) for a, _ in rows)
  return "\n".join(f"{a:<{width}}  {b:>12}".rstrip() for a, b in rows)


def _num(x: float, billion: str = "B") -> str:
  """3 decimals with K, M, B (parameters) or G (FLOPs), T suffixes."""
  for scale, suffix in ((1e12, "T"), (1e9, billion), (1e6, "M"), (1e3, "K")):
    if abs(x) >= scale:
      return f"{x / scale:.3f}{suffix}"
  return f"{x:.0f}"


def _flops(x: float) -> str:
  return _num(x, "G")


def _bytes(x: float) -> str:
  for scale, suffix in ((2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
    if x >= scale:
      return f"{x / scale:.2f} {suffix}"
  return f"{x:.0f} B"


def format_table(s: dict) -> str:
  """A readable table of `summarize`'s output."""
  names = {"M": "Mamba-2 (M)", "*": "attention (*)", "-": "MLP (-)", "E": "MoE (E)"}
  rows = [("parameters", "total", "active"),
          ("model (no MTP)", _num(s["total"]), _num(s["active"])),
          ("  without input embedding", _num(s["total"] - s["embedding"]),
           _num(s["active_no_embedding"])),
          ("  input embedding", _num(s["embedding"]), _num(s["embedding"])),
          ("  LM head", _num(s["lm_head"]), _num(s["lm_head"]))]
  for k in MIXERS:
    if s["layers"][k]:
      rows.append((f"  {names[k]} x{s['layers'][k]}", _num(s["by_mixer"][k]),
                   _num(s["active_by_mixer"][k])))
  rows.append(("MTP (outside the totals)", _num(s["mtp"]), _num(s["mtp_active"])))
  f = s["forward_flops"]
  rows += [("", "", ""), (f"FLOPs per token at seq_len {s['seq_len']}", "forward", "training"),
           ("total", _flops(f["total"]), _flops(3 * f["total"]))]
  for kind in ("matmul", "attention", "ssd"):
    rows.append((f"  {kind}", _flops(f[kind]), _flops(3 * f[kind])))
  for k in MIXERS:
    if s["layers"][k]:
      rows.append((f"  {names[k]}", _flops(f["by_mixer"][k]), _flops(3 * f["by_mixer"][k])))
  rows.append(("  LM head", _flops(f["by_mixer"]["lm_head"]), _flops(3 * f["by_mixer"]["lm_head"])))
  rows.append((f"MTP ({s['mtp_depths']} depths, outside the total)", _flops(f["mtp"]),
               _flops(3 * f["mtp"])))
  c = s["cache_bytes"]
  rows += [("", "", ""),
           (f"cache at context {s['context']}", "bytes", ""),
           (f"  KV ({c['dtype']})", _bytes(c["kv"]), ""),
           (f"  Mamba conv ({c['dtype']})", _bytes(c["conv"]), ""),
           (f"  Mamba SSM ({c['ssm_dtype']})", _bytes(c["ssm"]), ""),
           ("  total", _bytes(c["total"]), "")]
  width = max(len(r[0]) for r in rows)
  return "\n".join(f"{a:<{width}}  {b:>12}  {c_:>12}".rstrip() for a, b, c_ in rows)


def define_flags():
  config_flags.DEFINE_config_file("config", None, "Preset file with get_config().")
  flags.DEFINE_bool("json", False, "Print one JSON object instead of the table.")
  flags.DEFINE_integer("seq_len", None, "Sequence length of the FLOP count (default: data.seq_len).")
  flags.DEFINE_integer("context", None, "Context length of the cache size (default: seq_len).")
  flags.DEFINE_bool("memory", False, "Also compile the train step and report per-device bytes.")
  flags.DEFINE_integer("devices", 1, "Simulated CPU devices of the --memory report.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.memory:
    # Before anything initialises a backend: the report runs on simulated CPU devices.
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + MEMORY_XLA_FLAGS
    jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_num_cpu_devices", f.devices)
  config = config_lib.validate(f.config)
  seq_len = f.seq_len or config.data.seq_len
  s = summarize(config, seq_len=seq_len, context=f.context or seq_len)
  if f.memory:
    s["memory"] = memory_report(config, f.devices)
  if f.json:
    print(json.dumps(s))
  else:
    print(format_table(s) + ("\n\n" + format_memory(s["memory"]) if f.memory else ""))


if __name__ == "__main__":
  # Flags are defined only when run as a program, so importing this module
  # never claims global flag names such as --config.
  from nemotron_jax import cli
  cli.run(main, define_flags=define_flags)
