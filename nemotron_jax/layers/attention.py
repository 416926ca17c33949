"""Grouped-query causal attention: no positional embedding by default (NoPE), RoPE optional.

Uncached attention has three implementations (`model.attention.impl`): `xla`,
the reference (`jax.nn.dot_product_attention`, which materialises float32
[b, heads, T, T] scores); `flash`, blockwise attention in plain JAX with a
recomputing custom VJP, memory linear in T; `cudnn`, cuDNN's fused attention
on CUDA GPUs. `auto` chooses among them per call (`select_impl`).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn

from nemotron_jax.config import ConfigError
from nemotron_jax.layers import basic

# `auto` (off cuDNN) runs flash from this many tokens per row, where the XLA path's
# float32 [b, heads, T, T] scores (16 MiB per head and row at 2048, 256 MiB at 8192)
# outgrow the layer's other activations. Shorter rows keep the XLA reference path:
# flash measures faster on CPU there too, but its sequential loop over block pairs is
# unmeasured against XLA's fused softmax on GPU.
AUTO_FLASH_MIN_LENGTH = 2048


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its own document: [b l] -> [b l]."""
  l = segment_ids.shape[1]
  idx = jnp.arange(l)[None, :]
  start = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  last_start = jax.lax.cummax(jnp.where(start, idx, 0), axis=1)
  return idx - last_start


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding (rotate-half convention). x [b l h d], positions [b l]."""
  d = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d)
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b l d/2]
  cos = jnp.concatenate([jnp.cos(angles)] * 2, axis=-1)[:, :, None]
  sin = jnp.concatenate([jnp.sin(angles)] * 2, axis=-1)[:, :, None]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x * cos + rotated * sin).astype(x.dtype)


def attention_mask(q_segments, k_segments, q_positions, k_positions, window: int):
  """Boolean [b 1 t s]: causal, same segment, and inside the sliding window if any."""
  mask = q_positions[:, :, None] >= k_positions[:, None, :]
  if q_segments is not None:
    mask &= q_segments[:, :, None] == k_segments[:, None, :]
  if window:
    mask &= q_positions[:, :, None] - k_positions[:, None, :] < window
  return mask[:, None]


def _cdiv(a: int, b: int) -> int:
  return -(-a // b)


def block_schedule(length: int, block_q: int, block_kv: int, window: int):
  """The (query block, key block) pairs that hold a visible entry, as two int32 arrays.

  A pair is kept when some key in the key block is at or before some query
  of the query block and, with a window, less than `window` tokens behind
  it. Blocks above the diagonal or wholly outside the window are never
  visited: for window << length the count is about (length / block_q) x
  (window / block_kv + 2), linear in length.
  """
  nq, nk = _cdiv(length, block_q), _cdiv(length, block_kv)
  i, j = np.meshgrid(np.arange(nq), np.arange(nk), indexing="ij")
  q_first, q_last = i * block_q, np.minimum((i + 1) * block_q, length) - 1
  k_first, k_last = j * block_kv, np.minimum((j + 1) * block_kv, length) - 1
  visible = k_first <= q_last
  if window:
    visible &= q_first - k_last < window
  qi, kj = np.nonzero(visible)
  return qi.astype(np.int32), kj.astype(np.int32)


def _blocks(x, n: int, size: int, fill=0):
  """[b T ...] -> [n b size ...], zero- (or `fill`-) padded to n * size tokens."""
  pad = n * size - x.shape[1]
  x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
  x = x.reshape(x.shape[0], n, size, *x.shape[2:])
  return jnp.moveaxis(x, 1, 0)


def _q_blocks(x, n, size, kv):
  """q-like [b T h d] -> [n b kv g size d] (heads grouped by the key head they share)."""
  x = _blocks(x, n, size)
  x = x.reshape(*x.shape[:3], kv, -1, x.shape[-1])
  return jnp.moveaxis(x, 2, 4)


def _kv_blocks(x, n, size):
  """k/v [b T kv d] -> [n b kv size d]."""
  return jnp.moveaxis(_blocks(x, n, size), 2, 3)


def _from_q_blocks(x, length):
  """[n b kv g size ...] -> [b T h ...]: the inverse of _q_blocks (trailing axes kept)."""
  x = jnp.moveaxis(x, 4, 2)  # [n b size kv g ...]
  x = jnp.moveaxis(x, 0, 1)  # [b n size kv g ...]
  x = x.reshape(x.shape[0], -1, x.shape[3] * x.shape[4], *x.shape[5:])
  return x[:, :length]


def _from_kv_blocks(x, length):
  x = jnp.moveaxis(jnp.moveaxis(x, 3, 2), 0, 1)  # [b n size kv d]
  return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :length]


def _block_mask(i, j, qseg, kseg, length, block_q, block_kv, window):
  """Visibility [b 1 1 bq bk] of key block j from query block i (absolute positions)."""
  q_pos = i * block_q + jnp.arange(block_q)
  k_pos = j * block_kv + jnp.arange(block_kv)
  mask = (q_pos[:, None] >= k_pos[None, :]) & (k_pos < length)[None, :]
  if window:
    mask &= q_pos[:, None] - k_pos[None, :] < window
  mask = mask[None] & (qseg[:, :, None] == kseg[:, None, :])
  return mask[:, None, None]


def _scores(q_blk, k_blk, mask, scale):
  """Scaled float32 scores [b kv g bq bk] of one block pair, -inf where masked."""
  s = jnp.einsum("bkgqd,bksd->bkgqs", q_blk, k_blk, preferred_element_type=jnp.float32)
  return jnp.where(mask, s * scale, -jnp.inf)


def _flash_forward(q, k, v, q_seg, kv_seg, scale, window, block_q, block_kv):
  """(out [b T h d], logsumexp [nq b kv g bq] float32; 0 for fully masked rows)."""
  b, length, h, d = q.shape
  kv = k.shape[2]
  nq, nk = _cdiv(length, block_q), _cdiv(length, block_kv)
  qb, kb, vb = _q_blocks(q, nq, block_q, kv), _kv_blocks(k, nk, block_kv), _kv_blocks(v, nk, block_kv)
  qs, ks = _blocks(q_seg, nq, block_q, -1), _blocks(kv_seg, nk, block_kv, -1)
  f32 = jnp.float32

  def step(carry, ij):
    acc, row_max, row_sum = carry
    i, j = ij
    mask = _block_mask(i, j, qs[i], ks[j], length, block_q, block_kv, window)
    s = _scores(qb[i], kb[j], mask, scale)
    old_max = row_max[i]
    new_max = jnp.maximum(old_max, s.max(-1))
    # A row with nothing visible yet keeps max -inf; shifting by 0 keeps exp() at 0, not NaN.
    shift = jnp.where(jnp.isfinite(new_max), new_max, 0.0)
    p = jnp.exp(s - shift[..., None])
    rescale = jnp.exp(old_max - shift)
    pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), vb[j], preferred_element_type=f32)
    acc = acc.at[i].set(acc[i] * rescale[..., None] + pv)
    row_sum = row_sum.at[i].set(row_sum[i] * rescale + p.sum(-1))
    return (acc, row_max.at[i].set(new_max), row_sum), None

  stats_shape = (nq, b, kv, h // kv, block_q)
  init = (jnp.zeros(stats_shape + (d,), f32), jnp.full(stats_shape, -jnp.inf, f32),
          jnp.zeros(stats_shape, f32))
  (acc, row_max, row_sum), _ = jax.lax.scan(
      step, init, [jnp.asarray(a) for a in block_schedule(length, block_q, block_kv, window)])
  seen = row_sum > 0
  out = jnp.where(seen[..., None], acc / jnp.where(seen, row_sum, 1.0)[..., None], 0.0)
  lse = jnp.where(seen, row_max + jnp.log(jnp.where(seen, row_sum, 1.0)), 0.0)
  return _from_q_blocks(out, length).astype(q.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, q_seg, kv_seg, scale, window, block_q, block_kv):
  return _flash_forward(q, k, v, q_seg, kv_seg, scale, window, block_q, block_kv)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, scale, window, block_q, block_kv):
  out, lse = _flash_forward(q, k, v, q_seg, kv_seg, scale, window, block_q, block_kv)
  return out, (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(scale, window, block_q, block_kv, res, d_out):
  q, k, v, q_seg, kv_seg, out, lse = res
  length, kv = q.shape[1], k.shape[2]
  nq, nk = _cdiv(length, block_q), _cdiv(length, block_kv)
  qb, kb, vb = _q_blocks(q, nq, block_q, kv), _kv_blocks(k, nk, block_kv), _kv_blocks(v, nk, block_kv)
  qs, ks = _blocks(q_seg, nq, block_q, -1), _blocks(kv_seg, nk, block_kv, -1)
  dob = _q_blocks(d_out, nq, block_q, kv)
  f32 = jnp.float32
  # delta = rowsum(dO * O) = sum_s P dP: the softmax backward's per-row term.
  delta = _q_blocks((d_out.astype(f32) * out.astype(f32)).sum(-1, keepdims=True), nq, block_q, kv)[..., 0]

  def step(carry, ij):
    dq, dk, dv = carry
    i, j = ij
    mask = _block_mask(i, j, qs[i], ks[j], length, block_q, block_kv, window)
    s = _scores(qb[i], kb[j], mask, scale)
    p = jnp.exp(s - lse[i][..., None])  # masked entries: exp(-inf) = 0
    dv = dv.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", p.astype(v.dtype), dob[i],
                                 preferred_element_type=f32))
    dp = jnp.einsum("bkgqd,bksd->bkgqs", dob[i], vb[j], preferred_element_type=f32)
    ds = (p * (dp - delta[i][..., None])).astype(q.dtype)
    dq = dq.at[i].add(jnp.einsum("bkgqs,bksd->bkgqd", ds, kb[j], preferred_element_type=f32))
    dk = dk.at[j].add(jnp.einsum("bkgqs,bkgqd->bksd", ds, qb[i], preferred_element_type=f32))
    return (dq, dk, dv), None

  init = (jnp.zeros(qb.shape, f32), jnp.zeros(kb.shape, f32), jnp.zeros(vb.shape, f32))
  (dq, dk, dv), _ = jax.lax.scan(
      step, init, [jnp.asarray(a) for a in block_schedule(length, block_q, block_kv, window)])
  return ((_from_q_blocks(dq, length) * scale).astype(q.dtype),
          (_from_kv_blocks(dk, length) * scale).astype(k.dtype),
          _from_kv_blocks(dv, length).astype(v.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, q_segment_ids=None, kv_segment_ids=None, *, scale: float,
                    window: int = 0, block_q: int = 256, block_kv: int = 256):
  """Blockwise causal GQA attention: q [b T h d], k, v [b T kv d] -> [b T h d].

  The mask is the reference's (`attention_mask` on absolute indices): key t'
  is visible from query t when t' <= t, their segment ids match (q_segment_ids,
  kv_segment_ids [b T], both or neither) and, with a window, t - t' < window. Scores are float32 under an
  online softmax over the key blocks of `block_schedule`; the query heads
  sharing a key head are one [kv, h / kv] group, so K and V are never
  repeated. Blocks are capped at T and the tail is padded and masked. A row
  that sees no key gives 0 (and zero gradients).

  Memory is linear in T: the custom VJP saves q, k, v, the output and the
  float32 logsumexp per row, and its backward recomputes each block's
  probabilities from them.
  """
  b, length = q.shape[:2]
  if q_segment_ids is None:
    q_segment_ids = kv_segment_ids = jnp.zeros((b, length), jnp.int32)
  return _flash(q, k, v, q_segment_ids, kv_segment_ids, float(scale), int(window),
                min(block_q, length), min(block_kv, length))


CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _cudnn_misfit(dtype, head_dim: int) -> str | None:
  """Why cuDNN's fused attention cannot run here, or None when it can."""
  if jax.default_backend() != "gpu":
    return f"it needs a CUDA GPU and this backend is {jax.default_backend()!r}"
  if dtype not in CUDNN_DTYPES:
    return f"it needs model.compute_dtype bfloat16 or float16, not {jnp.dtype(dtype).name}"
  if head_dim % 8 or head_dim > 128:
    return f"it needs model.attention.head_dim a multiple of 8 and <= 128, not {head_dim}"
  return None


def select_impl(impl: str, length: int, dtype, head_dim: int, segmented: bool = False) -> str:
  """The implementation `impl` runs as for rows of `length` tokens: xla, flash or cudnn.

  auto: cudnn on a GPU where it applies, except for packed documents (segmented)
  from AUTO_FLASH_MIN_LENGTH tokens, since cuDNN takes them as a [b 1 T T] mask,
  quadratic in T; else flash from AUTO_FLASH_MIN_LENGTH tokens, xla below.
  cudnn where it cannot run is a ConfigError.
  """
  misfit = _cudnn_misfit(dtype, head_dim) if impl in ("cudnn", "auto") else None
  if impl == "cudnn" and misfit:
    raise ConfigError(f"config field 'model.attention.impl' = 'cudnn' cannot run: {misfit}; "
                      "expected xla, flash or auto here")
  if impl == "auto":
    long = length >= AUTO_FLASH_MIN_LENGTH
    if not misfit and not (segmented and long):
      return "cudnn"
    return "flash" if long else "xla"
  return impl


class KVCache(NamedTuple):
  """Keys [b, kv_heads, slots, head_dim] and values [b, kv_heads, head_dim, slots] of one layer.

  Each layout puts the axis a decoding step contracts over last, so the dots
  read the cache without transposing it.
  """
  k: jax.Array
  v: jax.Array


def write_slots(cache: KVCache, k: jax.Array, v: jax.Array, index: jax.Array) -> KVCache:
  """The cache with new keys and values k, v [b T kv_heads d] at slots index[b] + [0, T)."""
  def write(ck, cv, uk, uv, i):
    uk, uv = jnp.swapaxes(uk, 0, 1).astype(ck.dtype), jnp.moveaxis(uv, 0, 2).astype(cv.dtype)
    return (jax.lax.dynamic_update_slice_in_dim(ck, uk, i, axis=1),
            jax.lax.dynamic_update_slice_in_dim(cv, uv, i, axis=2))
  return KVCache(*jax.vmap(write)(cache.k, cache.v, k, v, index))


def cached_attention(q, k, v, cache: KVCache, old_mask, new_mask, scale: float):
  """T new queries q [b T heads d] over the cache and the T new keys/values k, v [b T kv d].

  old_mask [b T S] picks the cache slots each query sees, new_mask [T T] the
  new tokens (causal). Both are scored under one float32 softmax, so writing
  the new tokens into the cache need not come before this read.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  q = q.reshape(b, t, kv, h // kv, d)
  f32 = jnp.float32
  old = jnp.einsum("btkgd,bksd->bkgts", q, cache.k.astype(q.dtype), preferred_element_type=f32)
  new = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=f32)
  old = jnp.where(old_mask[:, None, None], old * scale, -jnp.inf)
  new = jnp.where(new_mask, new * scale, -jnp.inf)
  probs = jax.nn.softmax(jnp.concatenate([old, new], -1), axis=-1)
  p_old, p_new = probs[..., :-t].astype(v.dtype), probs[..., -t:].astype(v.dtype)
  out = (jnp.einsum("bkgts,bkds->btkgd", p_old, cache.v.astype(v.dtype), preferred_element_type=f32)
         + jnp.einsum("bkgts,bskd->btkgd", p_new, v, preferred_element_type=f32))
  return out.reshape(b, t, h, d).astype(q.dtype)


class Attention(nn.Module):
  """GQA self-attention. __call__(x [b l d]) -> (y [b l d], KVCache).

  Without a cache: causal attention over x; the KVCache holds x's keys and
  values, l slots (what prefill stores). With a cache of S slots: x holds T
  new tokens per row, written at slots index[b] + [0, T); each attends to
  the slots from start[b] (earlier ones are left padding) up to its own.
  Returns the updated cache.
  """
  cfg: Any
  out_std: float
  linear: Any = basic.Linear

  @nn.compact
  def __call__(self, x, *, segment_ids=None, cache: KVCache | None = None, start=None, index=None):
    m, a = self.cfg, self.cfg.attention
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    b, l, _ = x.shape
    hd = a.head_dim

    def proj(name, heads, axis, act_axis):
      y = self.linear(heads * hd, ("embed", axis), m.init_std, dtype, pdtype, name=name)(x)
      return nn.with_logical_constraint(y.reshape(b, l, heads, hd),
                                        ("batch", "length", act_axis, "head_dim"))

    q = proj("q_proj", a.num_heads, "heads", "heads")
    k = proj("k_proj", a.num_kv_heads, "kv", "kv_heads")
    v = proj("v_proj", a.num_kv_heads, "kv", "kv_heads")
    if cache is None:
      positions = (jnp.broadcast_to(jnp.arange(l)[None], (b, l)) if segment_ids is None
                   else positions_from_segments(segment_ids))
      if a.pos_emb == "rope":
        q, k = apply_rope(q, positions, a.rope_theta), apply_rope(k, positions, a.rope_theta)
      impl = select_impl(a.impl, l, dtype, hd, segmented=segment_ids is not None)
      if impl == "flash":
        out = flash_attention(q, k, v, segment_ids, segment_ids, scale=hd ** -0.5,
                              window=a.sliding_window, block_q=a.flash_block_q,
                              block_kv=a.flash_block_kv)
      elif impl == "cudnn":
        # cuDNN masks causally and by window itself; documents come in as a [b 1 T T] mask.
        same_doc = (None if segment_ids is None
                    else (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None])
        window = (a.sliding_window - 1, 0) if a.sliding_window else None
        out = jax.nn.dot_product_attention(q, k, v, mask=same_doc, scale=hd ** -0.5,
                                           is_causal=True, local_window_size=window,
                                           implementation="cudnn")
      else:
        # Positions restart per document, so the causal test uses absolute indices.
        idx = jnp.broadcast_to(jnp.arange(l)[None], (b, l))
        mask = attention_mask(segment_ids, segment_ids, idx, idx, a.sliding_window)
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5)
      new_cache = KVCache(jnp.swapaxes(k, 1, 2), jnp.moveaxis(v, 1, 3))
    else:
      slots = cache.k.shape[2]
      q_slots = index[:, None] + jnp.arange(l)[None]
      k_slots = jnp.broadcast_to(jnp.arange(slots)[None], (b, slots))
      if a.pos_emb == "rope":
        positions = q_slots - start[:, None]
        q, k = apply_rope(q, positions, a.rope_theta), apply_rope(k, positions, a.rope_theta)
      # Cached slots in use: from the prompt's start up to (not including) the new tokens.
      in_use = ((k_slots >= start[:, None]) & (k_slots < index[:, None])).astype(jnp.int32)
      old_mask = attention_mask(jnp.ones_like(q_slots), in_use, q_slots, k_slots,
                                a.sliding_window)
      new_mask = attention_mask(None, None, q_slots[:1], q_slots[:1], a.sliding_window)
      out = cached_attention(q, k, v, cache, old_mask[:, 0], new_mask[0, 0], hd ** -0.5)
      new_cache = write_slots(cache, k, v, index)
    y = self.linear(m.d_model, ("heads", "embed"), self.out_std, dtype, pdtype,
                    name="o_proj")(out.reshape(b, l, a.num_heads * hd))
    return y, new_cache
