"""Grouped-query causal attention: no positional embedding by default (NoPE), RoPE optional."""

from __future__ import annotations

from typing import Any

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


class Attention(nn.Module):
  """GQA self-attention. __call__(x [b l d]) -> y [b l d]."""
  cfg: Any
  out_std: float
  linear: Any = basic.Linear

  @nn.compact
  def __call__(self, x, *, segment_ids=None):
    m, a = self.cfg, self.cfg.attention
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    b, l, _ = x.shape
    hd = a.head_dim

    def proj(name, heads, axis):
      y = self.linear(heads * hd, ("embed", axis), m.init_std, dtype, pdtype, name=name)(x)
      return y.reshape(b, l, heads, hd)

    q = proj("q_proj", a.num_heads, "heads")
    k = proj("k_proj", a.num_kv_heads, "kv")
    v = proj("v_proj", a.num_kv_heads, "kv")
    positions = (jnp.broadcast_to(jnp.arange(l)[None], (b, l)) if segment_ids is None
                 else positions_from_segments(segment_ids))
    if a.pos_emb == "rope":
      q, k = apply_rope(q, positions, a.rope_theta), apply_rope(k, positions, a.rope_theta)
    # Positions restart per document, so the causal test uses absolute indices.
    idx = jnp.broadcast_to(jnp.arange(l)[None], (b, l))
    mask = attention_mask(segment_ids, segment_ids, idx, idx, a.sliding_window)
    out = jax.nn.dot_product_attention(q, k, v, mask=mask, scale=hd ** -0.5)
    return self.linear(m.d_model, ("heads", "embed"), self.out_std, dtype, pdtype,
                       name="o_proj")(out.reshape(b, l, a.num_heads * hd))
