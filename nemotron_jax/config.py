"""The one config schema: names, defaults and validation for every preset.

A preset in `configs/` is a Python file whose `get_config()` starts from
`default_config()`, overrides fields, and returns the `ConfigDict`. Only the
fields defined here exist; `validate` checks values and combinations and raises
`ConfigError` naming the field, the value and what would be valid.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os

import ml_collections
from ml_collections import config_dict

MIXER_CHARS = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}
DTYPES = ("float32", "bfloat16", "float16")
SSD_IMPLS = ("xla", "pallas", "sequential")
SSD_KERNEL_PRECISIONS = ("float32", "tf32", "bf16")
MOE_IMPLS = ("auto", "ragged", "blocked", "dense")
MOE_TENSOR_SPLITS = ("width", "experts")
POS_EMBS = ("none", "rope")
ATTENTION_IMPLS = ("auto", "xla", "flash", "cudnn")
RECIPES = ("none", "bf16", "fp8_tensorwise", "fp8_blockwise", "mxfp8", "nvfp4")


class ConfigError(ValueError):
  """An invalid config value or combination of values."""


def model_config() -> ml_collections.ConfigDict:
  """Defaults of the model schema: a small hybrid with every mixer type."""
  c = ml_collections.ConfigDict()
  c.pattern = "M*M-ME"
  c.d_model = 128
  c.vocab_size = 256
  c.norm_eps = 1e-5
  c.init_std = 0.02
  c.param_dtype = "float32"
  c.compute_dtype = "float32"
  c.remat = False  # rematerialise each block in the backward pass

  c.mamba = ml_collections.ConfigDict()
  c.mamba.num_heads = 8
  c.mamba.head_dim = 32
  c.mamba.d_state = 32
  c.mamba.n_groups = 2
  c.mamba.conv_kernel = 4
  c.mamba.chunk_size = 64
  c.mamba.dt_min = 1e-3
  c.mamba.dt_max = 0.1
  c.mamba.dt_init_floor = 1e-4
  # Bounds applied to dt after the softplus: NVIDIA's `time_step_limit`, default no
  # clamp (transformers' nemotron_h clamps at (time_step_min, inf) instead, see hf.py).
  c.mamba.dt_limit = (0.0, float("inf"))
  c.mamba.A_init_range = (1.0, 16.0)
  c.mamba.ssd_impl = "xla"
  # Settings of the Pallas SSD kernels (ssd_impl="pallas"; kernels/ssd.py explains the tiles).
  c.mamba.kernel = ml_collections.ConfigDict()
  c.mamba.kernel.block_t = 64  # token tile cap of the forward kernels: a power of two >= 16
  c.mamba.kernel.block_t_bwd = 32  # token tile cap of the backward kernels: a power of two >= 16
  c.mamba.kernel.block_p = 32  # head_dim tile cap: a power of two >= 16
  c.mamba.kernel.num_warps = 4  # Triton warps per program: 1, 2, 4, 8, 16 or 32
  c.mamba.kernel.num_stages = 2  # Triton software-pipelining stages
  # In-kernel dots, accumulating in float32: float32 (IEEE) | tf32 (tensor cores) | bf16 (bf16 operands)
  c.mamba.kernel.precision = "float32"
  # True: run the Pallas interpreter (slow; for CPU tests). False: Triton on CUDA, and an
  # error naming the platform anywhere else.
  c.mamba.kernel.interpret = False

  c.attention = ml_collections.ConfigDict()
  c.attention.num_heads = 4
  c.attention.num_kv_heads = 2
  c.attention.head_dim = 32
  c.attention.pos_emb = "none"
  c.attention.rope_theta = 10000.0
  c.attention.sliding_window = 0  # 0: global attention.
  # Uncached (training / prefill) attention: xla (jax.nn.dot_product_attention, float32
  # [b, heads, T, T] scores) | flash (blockwise, memory linear in T, any backend) |
  # cudnn (cuDNN fused attention; CUDA GPUs, bf16/fp16) | auto (cudnn where it applies,
  # but not for packed rows from 2048 tokens; else flash from 2048 tokens and xla below). Cached decoding has its own path.
  c.attention.impl = "auto"
  c.attention.flash_block_q = 256  # flash: query tokens per block (capped at the length)
  c.attention.flash_block_kv = 256  # flash: key tokens per block (capped at the length)

  c.mlp = ml_collections.ConfigDict()
  c.mlp.d_ff = 512

  c.moe = ml_collections.ConfigDict()
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.d_ff = 128
  c.moe.shared_d_ff = 256
  c.moe.routed_scaling = 1.0
  c.moe.n_group = 1
  c.moe.topk_group = 1
  c.moe.norm_topk_prob = True
  c.moe.latent_size = config_dict.placeholder(int)  # None: standard MoE.
  c.moe.bias_update_rate = 1e-3
  c.moe.balance_loss_coef = 1e-4
  c.moe.impl = "auto"  # auto (blocked on CPU, ragged elsewhere) | ragged | blocked | dense
  # Expert parallelism (mesh.expert > 1): each shard sends each destination shard at
  # most ceil(ep_capacity_factor * its token copies / expert) rows; copies past that
  # are dropped (routed output zero, the shared expert still applies) and counted
  # in the `moe_dropped_fraction` metric. 2.0 leaves room for a destination to get
  # twice its even share, which the aux-loss-free bias keeps rare after the first
  # steps, at 2 / expert the buffer of the worst case. None: worst-case buffers
  # (ep times the copies), never dropping.
  c.moe.ep_capacity_factor = config_dict.FieldReference(2.0, field_type=float)
  # What mesh.tensor splits of the routed experts. "width": each expert's d_ff, so a
  # tensor group holds the same experts and every device of it routes, sends and
  # receives all of its tokens' copies. "experts": the experts themselves, over
  # expert x tensor (each whole), with the tokens split over tensor for the exchange,
  # so a device handles 1/tensor of the copies (Megatron-LM's expert tensor
  # parallel size 1).
  c.moe.tensor_split = "width"

  # Multi-token prediction: depth k predicts the token k + 1 ahead from the
  # previous depth's output and the embedding of token t + k (NEMOTRON.md section 2).
  c.mtp = ml_collections.ConfigDict()
  c.mtp.num_depths = 0  # 0: no MTP head
  c.mtp.pattern = "*E"  # the layers of one MTP block, as in `pattern`
  c.mtp.share_weights = True  # one physical block applied at every depth
  c.mtp.loss_scale = 0.3  # weight of the summed MTP losses, divided by num_depths

  # Inference caches (generate.py): KV cache and Mamba conv state in `cache_dtype`,
  # the SSM state in `ssm_state_dtype`.
  c.generation = ml_collections.ConfigDict()
  c.generation.cache_dtype = config_dict.placeholder(str)  # None: model.compute_dtype
  c.generation.ssm_state_dtype = "float32"

  # Low-precision training emulation (nemotron_jax/quant/policy.py).
  c.precision = ml_collections.ConfigDict()
  c.precision.recipe = "none"  # none | bf16 | fp8_tensorwise | fp8_blockwise | mxfp8 | nvfp4
  c.precision.bf16_first_layers = 0
  c.precision.bf16_last_layers = 0
  c.precision.bf16_attention = True  # QKV and output projections
  c.precision.bf16_latent = True  # LatentMoE latent projections
  c.precision.bf16_mtp = True
  c.precision.mamba_out_proj = ""  # "": the block's recipe; or a recipe such as "mxfp8"
  c.precision.quantize_experts = True  # MoE expert GEMMs
  c.precision.grad_fmt = "e4m3"  # fp8_tensorwise gradients: e4m3 | e5m2
  c.precision.stochastic_rounding = True  # nvfp4 gradients
  c.precision.stochastic_rounding_forward = False  # nvfp4 forward operands too (an ablation)
  c.precision.hadamard = True  # nvfp4: 16x16 RHT on the weight-gradient GEMM inputs
  c.precision.bf16_from_step = 0  # > 0: drop quantisation from this step on
  return c


def data_config() -> ml_collections.ConfigDict:
  """Defaults of the data schema: the embedded standard-library corpus, bytes."""
  d = ml_collections.ConfigDict()
  d.source = "stdlib"  # stdlib | text | tokens | mqar
  d.path = config_dict.placeholder(str)  # file or folder for "text", token file for "tokens"
  d.tokenizer = "bytes"  # "bytes" or the path of a tokenizer.json
  d.token_dtype = "uint16"  # element type of a "tokens" file: uint16 | uint32
  d.eos_id = config_dict.placeholder(int)  # "tokens": a document ends after this id
  d.seq_len = 256
  d.heldout_fraction = 0.05  # share of files held out for evaluation
  d.pack = True  # pack documents into rows with segment ids
  # Text files are cut at line breaks into documents of about this many bytes,
  # so one shuffled epoch mixes many files instead of streaming whole files.
  d.chunk_bytes = 16384
  # Retired: packed text rows were shuffled within windows of this many rows. Each
  # row of a batch now has its own packer and documents, which mixes a batch
  # without it; setting it is an error, and saved configs that hold it load without it.
  d.shuffle_window = config_dict.placeholder(int)
  d.mqar = ml_collections.ConfigDict()
  d.mqar.num_kv_pairs = 8
  d.mqar.min_kv_pairs = 0  # > 0: each example has from this many to num_kv_pairs pairs
  d.mqar.num_examples = 100_000
  return d


def train_config() -> ml_collections.ConfigDict:
  """Defaults of the optimiser, schedule and loop."""
  t = ml_collections.ConfigDict()
  t.steps = 200
  t.batch_size = 16  # global, in rows of data.seq_len tokens
  # The step's batch runs as this many microbatches in one jitted step (a scan), their
  # gradients summed: activation memory is that of batch_size / grad_accum_steps rows.
  t.grad_accum_steps = 1
  # The LM head and cross-entropy run over chunks of this many positions of each row,
  # each chunk's logits recomputed in the backward, so float32 logits [rows, chunk, vocab]
  # exist instead of [rows, seq_len, vocab]. 0, or a chunk >= seq_len: the whole row at once.
  t.loss_chunk = 512
  t.lr = 3e-3
  t.schedule = "wsd"  # wsd | cosine | constant
  t.warmup_steps = 20
  t.decay_fraction = 0.2  # wsd: share of steps spent decaying
  t.decay_shape = "linear"  # wsd decay: linear | minus_sqrt | cosine
  t.min_lr_ratio = 0.01  # final lr / peak lr
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.weight_decay = 0.1  # on matrices only: never on norms, biases or SSM vectors
  t.grad_clip = 1.0  # global norm; 0 turns clipping off
  t.log_every = 10
  t.eval_every = 0  # 0: evaluate only at the end
  t.eval_batches = 8
  t.sample_tokens = 200  # length of the sample printed at the end; 0: none
  return t


def mesh_config() -> ml_collections.ConfigDict:
  """Device mesh sizes; -1 takes the devices the other axes leave."""
  d = ml_collections.ConfigDict()
  d.data = -1
  d.fsdp = 1
  d.tensor = 1
  d.expert = 1
  return d


def checkpoint_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.every = 100  # steps between saves; 0: only at the end
  c.keep = 3  # how many recent checkpoints to keep
  c.async_save = True
  return c


def init_config() -> ml_collections.ConfigDict:
  """Where a fresh run's weights come from (a workdir with a checkpoint resumes from it)."""
  c = ml_collections.ConfigDict()
  # A Hugging Face checkpoint folder: the model section comes from its config.json (fields
  # that change numerics only keep the run's values) and training starts from its weights
  # with a fresh optimiser. None: random initialisation.
  c.hf_checkpoint = config_dict.placeholder(str)
  c.dt_limit = "checkpoint"  # checkpoint (its time_step_limit) | transformers (see hf.py)
  return c


def default_config() -> ml_collections.ConfigDict:
  """The full schema: model plus the sections the training tools read."""
  c = ml_collections.ConfigDict()
  c.model = model_config()
  c.data = data_config()
  c.train = train_config()
  c.mesh = mesh_config()
  c.checkpoint = checkpoint_config()
  c.init = init_config()
  c.seed = 0
  return c


def _fail(field: str, value, valid: str):
  raise ConfigError(f"config field '{field}' = {value!r} is invalid: {valid}")


def _positive_int(cfg, prefix: str, *names: str):
  for name in names:
    value = cfg[name]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
      _fail(f"{prefix}{name}", value, "expected a positive integer")


def _choice(cfg, prefix: str, name: str, choices):
  if cfg[name] not in choices:
    _fail(f"{prefix}{name}", cfg[name], f"expected one of {list(choices)}")


def _range(field: str, value, lo_min: float = -math.inf):
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(v, (int, float)) for v in value)
      or not lo_min <= value[0] <= value[1]):
    _fail(field, value, f"expected a pair (low, high) with {lo_min} <= low <= high")


def validate_model(m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for any invalid model value or combination."""
  p = "model."
  pattern = m.pattern
  if not isinstance(pattern, str) or not pattern:
    _fail(p + "pattern", pattern, f"expected a non-empty string of {sorted(MIXER_CHARS)}")
  bad = sorted({ch for ch in pattern if ch not in MIXER_CHARS})
  if bad:
    _fail(p + "pattern", pattern,
          f"unknown layer character(s) {bad}; valid characters are "
          + ", ".join(f"'{k}' ({v})" for k, v in MIXER_CHARS.items()))
  _positive_int(m, p, "d_model", "vocab_size")
  for name in ("norm_eps", "init_std"):
    if not isinstance(m[name], (int, float)) or m[name] <= 0:
      _fail(p + name, m[name], "expected a positive number")
  _choice(m, p, "param_dtype", DTYPES)
  _choice(m, p, "compute_dtype", DTYPES)
  if not isinstance(m.remat, bool):
    _fail(p + "remat", m.remat, "expected True or False")

  if "M" in pattern:
    a = m.mamba
    q = p + "mamba."
    _positive_int(a, q, "num_heads", "head_dim", "d_state", "n_groups", "conv_kernel", "chunk_size")
    if a.num_heads % a.n_groups:
      _fail(q + "n_groups", a.n_groups,
            f"mamba.num_heads ({a.num_heads}) must be divisible by n_groups")
    if not 0 < a.dt_min <= a.dt_max:
      _fail(q + "dt_min", a.dt_min, f"expected 0 < dt_min <= dt_max ({a.dt_max})")
    if a.dt_init_floor < 0:
      _fail(q + "dt_init_floor", a.dt_init_floor, "expected a non-negative number")
    _range(q + "dt_limit", a.dt_limit, lo_min=0.0)
    _range(q + "A_init_range", a.A_init_range, lo_min=0.0)
    if a.A_init_range[0] <= 0:
      _fail(q + "A_init_range", a.A_init_range, "expected a low bound > 0 (A = -exp(A_log))")
    _choice(a, q, "ssd_impl", SSD_IMPLS)
    _validate_ssd_kernel(a.kernel, q + "kernel.")

  if "*" in pattern:
    a = m.attention
    q = p + "attention."
    _positive_int(a, q, "num_heads", "num_kv_heads", "head_dim", "flash_block_q", "flash_block_kv")
    _choice(a, q, "impl", ATTENTION_IMPLS)
    if a.num_heads % a.num_kv_heads:
      _fail(q + "num_kv_heads", a.num_kv_heads,
            f"attention.num_heads ({a.num_heads}) must be divisible by num_kv_heads")
    _choice(a, q, "pos_emb", POS_EMBS)
    if a.pos_emb == "rope":
      if a.head_dim % 2:
        _fail(q + "head_dim", a.head_dim, "RoPE needs an even head_dim")
      if a.rope_theta <= 0:
        _fail(q + "rope_theta", a.rope_theta, "expected a positive number")
    if not isinstance(a.sliding_window, int) or a.sliding_window < 0:
      _fail(q + "sliding_window", a.sliding_window, "expected 0 (global) or a positive window")

  if "-" in pattern:
    _positive_int(m.mlp, p + "mlp.", "d_ff")

  q = p + "precision."
  r = m.precision
  _choice(r, q, "recipe", RECIPES)
  if r.mamba_out_proj:
    _choice(r, q, "mamba_out_proj", RECIPES[1:])
  _choice(r, q, "grad_fmt", ("e4m3", "e5m2"))
  for name in ("bf16_first_layers", "bf16_last_layers", "bf16_from_step"):
    if not isinstance(r[name], int) or r[name] < 0:
      _fail(q + name, r[name], "expected a non-negative integer")
  for name in ("bf16_attention", "bf16_latent", "bf16_mtp", "quantize_experts",
               "stochastic_rounding", "stochastic_rounding_forward", "hadamard"):
    if not isinstance(r[name], bool):
      _fail(q + name, r[name], "expected True or False")

  if "E" in pattern:
    e = m.moe
    q = p + "moe."
    _positive_int(e, q, "num_experts", "top_k", "d_ff", "n_group", "topk_group")
    if not isinstance(e.shared_d_ff, int) or e.shared_d_ff < 0:
      _fail(q + "shared_d_ff", e.shared_d_ff, "expected 0 (no shared expert) or a positive width")
    if e.top_k > e.num_experts:
      _fail(q + "top_k", e.top_k, f"top_k must be <= moe.num_experts ({e.num_experts})")
    if e.num_experts % e.n_group:
      _fail(q + "n_group", e.n_group,
            f"moe.num_experts ({e.num_experts}) must be divisible by n_group")
    if e.topk_group > e.n_group:
      _fail(q + "topk_group", e.topk_group, f"topk_group must be <= moe.n_group ({e.n_group})")
    if e.n_group > 1:
      per_group = e.num_experts // e.n_group
      if per_group < 2:
        _fail(q + "n_group", e.n_group,
              "group-limited routing scores a group by its best 2 experts, so each group needs "
              f">= 2 experts (num_experts={e.num_experts})")
      if e.top_k > e.topk_group * per_group:
        _fail(q + "top_k", e.top_k,
              f"top_k must be <= topk_group * experts per group ({e.topk_group * per_group})")
    if e.latent_size is not None:
      _positive_int(e, q, "latent_size")
    if e.routed_scaling <= 0:
      _fail(q + "routed_scaling", e.routed_scaling, "expected a positive number")
    for name in ("bias_update_rate", "balance_loss_coef"):
      if e[name] < 0:
        _fail(q + name, e[name], "expected a non-negative number")
    _choice(e, q, "impl", MOE_IMPLS)
    _choice(e, q, "tensor_split", MOE_TENSOR_SPLITS)
    cf = e.ep_capacity_factor
    if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or cf <= 0):
      _fail(q + "ep_capacity_factor", cf,
            "expected a positive number (rows per destination over the even share) or None "
            "(worst-case buffers, never dropping)")

  _validate_mtp(m)
  _validate_generation(m)


def _validate_ssd_kernel(k: ml_collections.ConfigDict, q: str) -> None:
  for name in ("block_t", "block_t_bwd", "block_p"):
    v = k[name]
    if not isinstance(v, int) or isinstance(v, bool) or v < 16 or v & (v - 1):
      _fail(q + name, v, "expected a power of two >= 16 (Triton's smallest dot tile)")
  w = k.num_warps
  if not isinstance(w, int) or isinstance(w, bool) or w not in (1, 2, 4, 8, 16, 32):
    _fail(q + "num_warps", w, "expected 1, 2, 4, 8, 16 or 32")
  _positive_int(k, q, "num_stages")
  _choice(k, q, "precision", SSD_KERNEL_PRECISIONS)
  if not isinstance(k.interpret, bool):
    _fail(q + "interpret", k.interpret, "expected True or False")


def _validate_mtp(m: ml_collections.ConfigDict) -> None:
  q = "model.mtp."
  t = m.mtp
  if not isinstance(t.num_depths, int) or isinstance(t.num_depths, bool) or t.num_depths < 0:
    _fail(q + "num_depths", t.num_depths, "expected 0 (no MTP head) or a positive number of depths")
  if not isinstance(t.share_weights, bool):
    _fail(q + "share_weights", t.share_weights, "expected True or False")
  if (isinstance(t.loss_scale, bool) or not isinstance(t.loss_scale, (int, float))
      or t.loss_scale < 0):
    _fail(q + "loss_scale", t.loss_scale, "expected a non-negative number")
  if not t.num_depths:
    return
  if not isinstance(t.pattern, str) or not t.pattern or any(ch not in MIXER_CHARS for ch in t.pattern):
    _fail(q + "pattern", t.pattern,
          "expected a non-empty string of layer characters "
          + ", ".join(f"'{k}' ({v})" for k, v in MIXER_CHARS.items()))
  # The MTP layers read the same mixer sections as the main layers: check those they use.
  block = ml_collections.ConfigDict(m.to_dict())
  block.pattern = t.pattern
  block.mtp.num_depths = 0
  validate_model(block)


def _validate_generation(m: ml_collections.ConfigDict) -> None:
  g = m.generation
  if g.cache_dtype is not None:
    _choice(g, "model.generation.", "cache_dtype", DTYPES)
  _choice(g, "model.generation.", "ssm_state_dtype", DTYPES)


def validate_data(d: ml_collections.ConfigDict, m: ml_collections.ConfigDict) -> None:
  """Raises ConfigError for any invalid data value."""
  q = "data."
  _choice(d, q, "source", ("stdlib", "text", "tokens", "mqar"))
  _positive_int(d, q, "seq_len", "chunk_bytes")
  if d.shuffle_window is not None:
    _fail(q + "shuffle_window", d.shuffle_window,
          "the field is retired: each row of a batch is packed from its own documents, which "
          "mixes a batch without a row shuffle; remove the setting")
  if d.source in ("text", "tokens") and not d.path:
    _fail(q + "path", d.path, f"data.source={d.source!r} needs a file or folder path")
  if not isinstance(d.tokenizer, str) or not d.tokenizer:
    _fail(q + "tokenizer", d.tokenizer, "expected 'bytes' or the path of a tokenizer.json")
  _choice(d, q, "token_dtype", ("uint16", "uint32"))
  if d.eos_id is not None and (not isinstance(d.eos_id, int) or isinstance(d.eos_id, bool)
                               or not 0 <= d.eos_id < m.vocab_size):
    _fail(q + "eos_id", d.eos_id, f"expected None or a token id in [0, model.vocab_size={m.vocab_size})")
  fraction = d.heldout_fraction
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction < 1.0:
    _fail(q + "heldout_fraction", fraction, "expected 0 <= fraction < 1")
  if not isinstance(d.pack, bool):
    _fail(q + "pack", d.pack, "expected True or False")
  if d.chunk_bytes < 64:
    _fail(q + "chunk_bytes", d.chunk_bytes, "expected at least 64 bytes per document")
  _positive_int(d.mqar, q + "mqar.", "num_kv_pairs", "num_examples")
  low = d.mqar.min_kv_pairs
  if not isinstance(low, int) or isinstance(low, bool) or not 0 <= low <= d.mqar.num_kv_pairs:
    _fail(q + "mqar.min_kv_pairs", low,
          f"expected 0 (a fixed count) or an integer from 1 to mqar.num_kv_pairs = "
          f"{d.mqar.num_kv_pairs}")
  if d.source == "mqar":
    pairs = d.mqar.num_kv_pairs
    # A row of seq_len + 1 tokens holds the pairs, then each query as key and value.
    if pairs > (d.seq_len + 1) // 4:
      _fail(q + "mqar.num_kv_pairs", pairs,
            f"2 tokens per pair plus 2 per query must fit data.seq_len + 1 = {d.seq_len + 1}: "
            f"at most {(d.seq_len + 1) // 4}")
    # Keys and values are distinct ids from the two halves of the vocabulary above 0.
    if pairs > (m.vocab_size - 1) // 2:
      _fail(q + "mqar.num_kv_pairs", pairs,
            f"keys and values are distinct ids from halves of model.vocab_size={m.vocab_size}: "
            f"at most {(m.vocab_size - 1) // 2}")
  if d.tokenizer == "bytes" and d.source in ("stdlib", "text") and m.vocab_size < 256:
    _fail("model.vocab_size", m.vocab_size, "the byte tokenizer needs vocab_size >= 256")


def validate_train(t: ml_collections.ConfigDict) -> None:
  q = "train."
  _positive_int(t, q, "steps", "batch_size", "grad_accum_steps", "log_every", "eval_batches")
  for name in ("warmup_steps", "eval_every", "sample_tokens", "loss_chunk"):
    if not isinstance(t[name], int) or t[name] < 0:
      _fail(q + name, t[name], "expected a non-negative integer")
  _choice(t, q, "schedule", ("wsd", "cosine", "constant"))
  _choice(t, q, "decay_shape", ("linear", "minus_sqrt", "cosine"))
  if not t.lr > 0:
    _fail(q + "lr", t.lr, "expected a positive learning rate")
  for name in ("decay_fraction", "min_lr_ratio"):
    if not 0.0 <= t[name] <= 1.0:
      _fail(q + name, t[name], "expected a number in [0, 1]")
  for name in ("b1", "b2"):
    if not 0.0 <= t[name] < 1.0:
      _fail(q + name, t[name], "expected a number in [0, 1)")
  for name in ("weight_decay", "grad_clip", "eps"):
    if t[name] < 0:
      _fail(q + name, t[name], "expected a non-negative number")


def validate_mesh(d: ml_collections.ConfigDict) -> None:
  sizes = {name: d[name] for name in ("data", "fsdp", "tensor", "expert")}
  for name, size in sizes.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      _fail(f"mesh.{name}", size, "expected a positive size or -1 (the remaining devices)")
  if sum(size == -1 for size in sizes.values()) > 1:
    _fail("mesh", sizes, "at most one axis may be -1")


def validate_checkpoint(c: ml_collections.ConfigDict) -> None:
  if not isinstance(c.every, int) or c.every < 0:
    _fail("checkpoint.every", c.every, "expected 0 (only at the end) or a positive step count")
  _positive_int(c, "checkpoint.", "keep")


def validate_init(c: ml_collections.ConfigDict) -> None:
  path = c.hf_checkpoint
  if path is not None and (not isinstance(path, str)
                           or not os.path.isfile(os.path.join(path, "config.json"))):
    _fail("init.hf_checkpoint", path, "expected None or a Hugging Face checkpoint folder "
          "(with config.json and safetensors)")
  _choice(c, "init.", "dt_limit", ("checkpoint", "transformers"))


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Validates a full config (with a `model` section) and returns it."""
  if not isinstance(config, ml_collections.ConfigDict):
    try:  # ml_collections' stand-in for a preset that failed to load raises on any access.
      getattr(config, "model")
    except IOError as err:
      cause = err.__cause__ or err
      raise ConfigError(f"the --config preset could not be loaded: {type(cause).__name__}: "
                        f"{cause}; expected a Python file defining get_config()") from err
    raise ConfigError(f"expected an ml_collections.ConfigDict, got {type(config).__name__}")
  if "model" not in config:
    raise ConfigError("config has no 'model' section; start presets from "
                      "nemotron_jax.config.default_config()")
  validate_model(config.model)
  if "data" in config:
    validate_data(config.data, config.model)
  if "train" in config:
    validate_train(config.train)
  if "mesh" in config:
    validate_mesh(config.mesh)
  if "checkpoint" in config:
    validate_checkpoint(config.checkpoint)
  if "init" in config:
    validate_init(config.init)
  return config


def read_json(path: str) -> dict:
  """The JSON object in `path` (a config.json); ConfigError naming the file and what is wrong."""
  try:
    with open(path) as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as err:
    raise ConfigError(f"{path} is not valid JSON ({err}); expected the config.json that train.py "
                      "or save_pretrained wrote") from err
  if not isinstance(saved, dict):
    raise ConfigError(f"{path} holds a JSON {type(saved).__name__}; expected an object of "
                      "config fields")
  return saved


def from_dict(saved: dict) -> ml_collections.ConfigDict:
  """A validated full config from a dict (a workdir's config.json): the schema's defaults,
  overridden field by field; fields the schema lacks are ignored with a warning."""
  import logging

  def merge(node, values, prefix):
    for key, value in values.items():
      if key not in node:
        logging.warning("config.json field %s%s is not in the schema; ignored", prefix, key)
      elif isinstance(value, dict):
        merge(node[key], value, f"{prefix}{key}.")
      else:
        default = node[key]
        as_tuple = isinstance(default, tuple) and isinstance(value, list)
        node[key] = tuple(value) if as_tuple else value

  config = default_config()
  data = saved.get("data")
  if isinstance(data, dict) and "shuffle_window" in data:  # retired; earlier runs recorded it
    saved = {**saved, "data": {k: v for k, v in data.items() if k != "shuffle_window"}}
  merge(config, saved, "")
  return validate(config)


def model_section(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The model section of a full config, or the argument if it is one already."""
  return config.model if "model" in config else config


def load_config(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a preset file and validates it."""
  if not os.path.isfile(path):
    presets = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    names = sorted(f for f in os.listdir(presets) if f.endswith(".py")) if os.path.isdir(presets) else []
    raise ConfigError(f"config file {path!r} does not exist; presets: {names}")
  spec = importlib.util.spec_from_file_location("_nemotron_preset", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} defines no get_config()")
  return validate(module.get_config())


def num_layers(m: ml_collections.ConfigDict) -> int:
  return len(m.pattern)
