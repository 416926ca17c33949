"""Grouped-query causal attention: no positional embedding by default (NoPE), RoPE optional."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from nemotron_jax.layers import basic


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
