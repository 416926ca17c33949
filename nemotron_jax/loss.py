"""Token cross-entropy from hidden states, in sequence chunks of the LM head.

The plain loss materialises float32 logits [b, l, vocab], their log-softmax
and the gradient of both: at vocabulary 131072 and 8192 positions that is
4 GiB per row and buffer. `head_loss` instead runs the LM head over chunks
of `chunk` positions in a scan whose body is rematerialised, so only one
chunk's logits (and, in the backward, their gradient) exist at a time. The
result is the same sums the plain loss gives, up to float32 summation order.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nemotron_jax.layers import basic


class HeadLoss(NamedTuple):
  """Sums over the masked positions: negative log-likelihood (nats), tokens, argmax hits
  (zero when not asked for)."""
  nll: jax.Array
  count: jax.Array
  hits: jax.Array


def logits(h: jax.Array, kernel: jax.Array, dtype) -> jax.Array:
  """The LM head: hidden [.. d] -> logits [.. vocab] float32, rounded to `dtype` first as
  `NemotronH.head` does."""
  x = basic.matmul(h.astype(dtype), kernel.astype(dtype)).astype(dtype).astype(jnp.float32)
  if x.ndim == 3:
    x = nn.with_logical_constraint(x, ("batch", "length", "vocab"))
  return x


def logits_loss(x: jax.Array, targets: jax.Array, mask: jax.Array, hits: bool = False) -> HeadLoss:
  """HeadLoss of float32 logits x [b l V] against targets [b l] weighted by mask [b l]."""
  lse = jax.nn.logsumexp(x, axis=-1)
  target = jnp.take_along_axis(x, targets[..., None], axis=-1)[..., 0]
  hit = jnp.zeros((), jnp.float32)
  if hits:
    hit = jnp.sum((jnp.argmax(jax.lax.stop_gradient(x), -1) == targets) * mask)
  return HeadLoss(jnp.sum((lse - target) * mask), jnp.sum(mask), hit)


def head_loss(h: jax.Array, kernel: jax.Array, targets: jax.Array, mask: jax.Array, *,
              dtype, chunk: int, hits: bool = False) -> HeadLoss:
  """HeadLoss of hidden states h [b l d] through the LM head kernel [d V].

  hits: also count the positions whose argmax is the target.
  chunk: positions per chunk along the length; 0, or a chunk covering the
  whole length, computes the full logits at once (the fastest path for
  short rows). Otherwise the length is padded to a multiple of the chunk
  (padding is masked) and each chunk's logits are recomputed in the backward.
  """
  b, l, d = h.shape
  mask = mask.astype(jnp.float32)
  if not chunk or chunk >= l:
    return logits_loss(logits(h, kernel, dtype), targets, mask, hits)
  pad = (-l) % chunk
  if pad:
    h = jnp.pad(h, ((0, 0), (0, pad), (0, 0)))
    targets, mask = (jnp.pad(t, ((0, 0), (0, pad))) for t in (targets, mask))
  n = (l + pad) // chunk
  split = lambda t: jnp.moveaxis(t.reshape(b, n, chunk, *t.shape[2:]), 1, 0)

  @jax.checkpoint
  def body(kernel, xs):
    hc, tc, mc = xs
    hc = nn.with_logical_constraint(hc, ("batch", "length", "act_embed"))
    return logits_loss(logits(hc, kernel, dtype), tc, mc, hits)

  def step(carry, xs):
    return jax.tree.map(jnp.add, carry, body(kernel, xs)), None

  zero = HeadLoss(*(jnp.zeros((), jnp.float32) for _ in range(3)))
  out, _ = jax.lax.scan(step, zero, (split(h), split(targets), split(mask)))
  return out
