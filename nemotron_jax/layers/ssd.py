"""State-space duality (SSD) scan of Mamba-2: chunked jnp path and sequential reference.

Recurrence per head (the definition every path here must match):
  h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T,   y_t = h_t C_t + D x_t
with h_{-1} the initial state. Heads share B and C within a group. With
segment ids, the state is reset (the decay is zero) wherever the id changes,
so packed documents never see each other; the initial state belongs to the
first token's segment.

Shapes: x [b l h p], dt [b l h] (after softplus and clamp), A [h] (negative),
B, C [b l g n], D [h], state [b h p n], segment_ids [b l]. All arithmetic is
float32; outputs are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange, repeat


def _f32(*xs):
  return [None if x is None else jnp.asarray(x, jnp.float32) for x in xs]


def run_ids(segment_ids: jax.Array) -> jax.Array:
  """Renumbers [b l] segment ids as contiguous run indices: a run starts where the id changes."""
  change = jnp.concatenate(
      [jnp.zeros_like(segment_ids[:, :1], dtype=jnp.int32),
       (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)], axis=1)
  return jnp.cumsum(change, axis=1)


def ssd_sequential(x, dt, A, B, C, D, *, initial_state=None, segment_ids=None):
  """Reference: the recurrence as a `lax.scan` over time. Returns (y [b l h p], state [b h p n])."""
  x, dt, A, B, C, D, initial_state = _f32(x, dt, A, B, C, D, initial_state)
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  Bh = repeat(B, "b l g n -> b l (g r) n", r=h // g)
  Ch = repeat(C, "b l g n -> b l (g r) n", r=h // g)
  if segment_ids is None:
    keep = jnp.ones((b, l), jnp.float32)
  else:
    keep = jnp.concatenate(
        [jnp.ones((b, 1), jnp.float32),
         (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(jnp.float32)], axis=1)
  state0 = jnp.zeros((b, h, p, n), jnp.float32) if initial_state is None else initial_state

  def step(state, inp):
    x_t, dt_t, B_t, C_t, keep_t = inp
    decay = jnp.exp(dt_t * A) * keep_t[:, None]
    state = state * decay[:, :, None, None] + jnp.einsum("bh,bhp,bhn->bhpn", dt_t, x_t, B_t)
    y_t = jnp.einsum("bhpn,bhn->bhp", state, C_t) + D[None, :, None] * x_t
    return state, y_t

  inputs = [jnp.moveaxis(t, 1, 0) for t in (x, dt, Bh, Ch, keep)]
  final, ys = jax.lax.scan(step, state0, inputs)
  return jnp.moveaxis(ys, 0, 1), final


def pad_to_chunks(x, dt, B, C, segment_ids, chunk_size):
  """Pads the length to a multiple of the chunk with dt = 0 (no decay, no input) and repeated ids."""
  l = x.shape[1]
  pad = (-l) % chunk_size
  if pad:
    widths = lambda t: [(0, 0), (0, pad)] + [(0, 0)] * (t.ndim - 2)
    x, dt, B, C = [jnp.pad(t, widths(t)) for t in (x, dt, B, C)]
    segment_ids = jnp.pad(segment_ids, [(0, 0), (0, pad)], mode="edge")
  return x, dt, B, C, segment_ids


def ssd_chunked(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None):
  """Chunked SSD: quadratic form inside each chunk, a scan over chunk states between them.

  Cost is linear in length. Returns (y [b l h p], final state [b h p n]).
  Internally heads are split as (groups g, heads per group r) and every
  contraction is batched over (b, chunk, g[, r]) with the contracted axis
  last or second to last, so XLA needs few layout changes. The cumulative
  sum inside a chunk is a product with a triangular matrix (a plain cumsum
  lowers to a slow reduce-window on CPU); the decay between positions i >= j
  of a chunk is exp(a_cum_i - a_cum_j), exact enough since a chunk's sums are
  short, and masked before the exp so no infinity ever forms.
  """
  x, dt, A, B, C, D, initial_state = _f32(x, dt, A, B, C, D, initial_state)
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  r = h // g
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  xp, dtp, Bp, Cp, seg = pad_to_chunks(x, dt, B, C, seg, chunk_size)
  q = chunk_size

  xdt = rearrange(xp * dtp[..., None], "b (c q) (g r) p -> b c g r q p", q=q, g=g)
  Bc = rearrange(Bp, "b (c q) g n -> b c g q n", q=q)
  Cc = rearrange(Cp, "b (c q) g n -> b c g q n", q=q)
  a = rearrange(dtp * A, "b (c q) (g r) -> b c g r q", q=q, g=g)
  tril = jnp.tril(jnp.ones((q, q), jnp.float32))
  # Inclusive sums within each chunk; full float32 even where default dots round (TF32).
  a_cum = jnp.einsum("bcgrj,ij->bcgri", a, tril, precision=jax.lax.Precision.HIGHEST)
  seg = rearrange(seg, "b (c q) -> b c q", q=q)
  last = seg[..., -1]
  prev_last = jnp.concatenate([seg[:, :1, 0], last[:, :-1]], axis=1)  # [b c]
  per_head = lambda mask: mask[:, :, None, None].astype(jnp.float32)  # [b c ...] -> [b c 1 1 ...]

  # 1. Within each chunk: y_i = sum_j (C_i . B_j) exp(a_cum_i - a_cum_j) xdt_j, j <= i, same segment.
  causal = (seg[..., :, None] == seg[..., None, :]) & (tril > 0)  # [b c i j]
  keep = causal[:, :, None, None]
  diff = jnp.where(keep, a_cum[..., :, None] - a_cum[..., None, :], 0.0)
  decay = jnp.where(keep, jnp.exp(diff), 0.0)  # [b c g r i j]
  scores = jnp.einsum("bcgin,bcgjn->bcgij", Cc, Bc)
  y_diag = jnp.einsum("bcgrij,bcgrjp->bcgrip", scores[:, :, :, None] * decay, xdt)

  # 2. Each chunk's own contribution to the state at its end.
  to_end = jnp.exp(a_cum[..., -1:] - a_cum) * per_head(seg == last[..., None])
  chunk_states = jnp.einsum("bcgrjp,bcgjn->bcgrpn", xdt * to_end[..., None], Bc)

  # 3. Pass states across chunks; the old state survives a chunk only if no segment starts in it.
  survive = jnp.exp(a_cum[..., -1]) * per_head(last == prev_last)  # [b c g r]
  state0 = (jnp.zeros((b, g, r, p, n), jnp.float32) if initial_state is None
            else rearrange(initial_state, "b (g r) p n -> b g r p n", g=g))

  def step(state, inp):
    surv, new = inp
    return state * surv[..., None, None] + new, state

  final, starts = jax.lax.scan(
      step, state0, (jnp.moveaxis(survive, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  starts = jnp.moveaxis(starts, 0, 1)  # [b c g r p n]: the state entering each chunk.

  # 4. The entering state's contribution to each position of the chunk.
  from_start = jnp.exp(a_cum) * per_head(seg == prev_last[..., None])  # [b c g r q]
  y_off = jnp.einsum("bcgin,bcgrpn->bcgrip", Cc, starts) * from_start[..., None]

  y = rearrange(y_diag + y_off, "b c g r q p -> b (c q) (g r) p")[:, :l]
  y = y + D[None, None, :, None] * x
  return y, rearrange(final, "b g r p n -> b (g r) p n")


def ssd_decode_step(state, x, dt, A, B, C, D):
  """One token of the recurrence: x [b h p], dt [b h], B, C [b g n]. Returns (y [b h p], state)."""
  state, x, dt, A, B, C, D = _f32(state, x, dt, A, B, C, D)
  h, g = x.shape[1], B.shape[1]
  Bh = repeat(B, "b g n -> b (g r) n", r=h // g)
  Ch = repeat(C, "b g n -> b (g r) n", r=h // g)
  state = state * jnp.exp(dt * A)[..., None, None] + jnp.einsum("bh,bhp,bhn->bhpn", dt, x, Bh)
  y = jnp.einsum("bhpn,bhn->bhp", state, Ch) + D[None, :, None] * x
  return y, state


def ssd(x, dt, A, B, C, D, *, impl: str, chunk_size: int, initial_state=None, segment_ids=None,
        kernel=None):
  """The SSD scan chosen by `mamba.ssd_impl`: "xla" (chunked jnp), "pallas" or "sequential".

  kernel: the `mamba.kernel` settings (keyword arguments of `ssd_pallas`), used by "pallas".
  """
  if impl == "xla":
    return ssd_chunked(x, dt, A, B, C, D, chunk_size=chunk_size,
                       initial_state=initial_state, segment_ids=segment_ids)
  if impl == "sequential":
    return ssd_sequential(x, dt, A, B, C, D, initial_state=initial_state, segment_ids=segment_ids)
  if impl == "pallas":
    from nemotron_jax.kernels import ssd as ssd_kernels
    return ssd_kernels.ssd_pallas(x, dt, A, B, C, D, chunk_size=chunk_size,
                                  initial_state=initial_state, segment_ids=segment_ids,
                                  **dict(kernel or {}))
  raise ValueError(f"mamba.ssd_impl = {impl!r} is invalid: expected one of 'xla', 'pallas', 'sequential'")
