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

import functools

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


# The most chunks one batched quadratic step covers: their float32 [k h q q] decay is at
# most this many bytes per sequence. Longer inputs run in blocks of that many chunks that
# the backward recomputes (`ssd_chunked`); shorter ones keep the single batched pass.
BLOCK_BYTES = 32 * 2**20


def _chunks(x, dt, A, B, C, D, seg, state0, q):
  """The chunked algorithm on a length that is a multiple of q; seg are run ids, state0 [b h p n].

  The state0 belongs to the first token's segment. Returns (y [b l h p], final state).
  """
  x, dt, A, B, C, D, state0 = _f32(x, dt, A, B, C, D, state0)
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  r = h // g
  xdt = rearrange(x * dt[..., None], "b (c q) (g r) p -> b c g r q p", q=q, g=g)
  Bc = rearrange(B, "b (c q) g n -> b c g q n", q=q)
  Cc = rearrange(C, "b (c q) g n -> b c g q n", q=q)
  a = rearrange(dt * A, "b (c q) (g r) -> b c g r q", q=q, g=g)
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
  state0 = rearrange(state0, "b (g r) p n -> b g r p n", g=g)

  def step(state, inp):
    surv, new = inp
    return state * surv[..., None, None] + new, state

  final, starts = jax.lax.scan(
      step, state0, (jnp.moveaxis(survive, 1, 0), jnp.moveaxis(chunk_states, 1, 0)))
  starts = jnp.moveaxis(starts, 0, 1)  # [b c g r p n]: the state entering each chunk.

  # 4. The entering state's contribution to each position of the chunk.
  from_start = jnp.exp(a_cum) * per_head(seg == prev_last[..., None])  # [b c g r q]
  y_off = jnp.einsum("bcgin,bcgrpn->bcgrip", Cc, starts) * from_start[..., None]

  y = rearrange(y_diag + y_off, "b c g r q p -> b (c q) (g r) p")
  y = y + D[None, None, :, None] * x
  return y, rearrange(final, "b g r p n -> b (g r) p n")


def _to_bits(t):
  """16-bit floats as uint16 bits, for scanning (see `_block_scan_fwd`); others unchanged."""
  return jax.lax.bitcast_convert_type(t, jnp.uint16) if t.dtype.itemsize == 2 else t


def _from_bits(t, dtype):
  return t if t.dtype == dtype else jax.lax.bitcast_convert_type(t, dtype)


def _scan_blocks(q, state0, keep, x, dt, A, B, C, D, seg, *, save):
  """`_chunks` over blocks [k b w ...] from state0, the entering state masked by keep [k b 1 1 1].

  Returns (ys [k b w h p], final state) and, with save, the state entering each block.
  """
  dtypes = [t.dtype for t in (x, dt, B, C)]

  def step(state, block):
    keep_k, *inputs, seg_k = block
    x, dt, B, C = [_from_bits(t, d) for t, d in zip(inputs, dtypes)]
    y, new = _chunks(x, dt, A, B, C, D, seg_k, state * keep_k, q)
    return new, ((y, state) if save else y)

  return jax.lax.scan(step, state0, [keep] + [_to_bits(t) for t in (x, dt, B, C)] + [seg])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _block_scan(q, state0, keep, x, dt, A, B, C, D, seg):
  """The SSD over blocks of chunks whose backward recomputes one block at a time.

  Inputs are blocked [k b w ...] (w a multiple of q), keep [k b 1 1 1] is 1
  where the state entering a block survives. Returns (ys [k b w h p], final).
  """
  final, ys = _scan_blocks(q, state0, keep, x, dt, A, B, C, D, seg, save=False)
  return ys, final


def _block_scan_fwd(q, state0, keep, x, dt, A, B, C, D, seg):
  # Residuals: the inputs in their own dtype and one state per block. 16-bit inputs are
  # scanned as raw bits: XLA otherwise moves their float32 conversion out of the loops
  # and keeps a float32 copy of the whole input alive from the forward to the backward.
  final, (ys, entering) = _scan_blocks(q, state0, keep, x, dt, A, B, C, D, seg, save=True)
  return (ys, final), (entering, keep, x, dt, A, B, C, D, seg)


def _block_scan_bwd(q, res, cts):
  entering, keep, x, dt, A, B, C, D, seg = res
  dys, dfinal = cts
  dtypes = [t.dtype for t in (x, dt, B, C)]

  def step(carry, block):
    dstate, dA, dD = carry
    state, keep_k, *inputs, seg_k, dy = block
    x, dt, B, C = [_from_bits(t, d) for t, d in zip(inputs, dtypes)]
    run = lambda state, x, dt, A, B, C, D: _chunks(x, dt, A, B, C, D, seg_k, state * keep_k, q)
    _, vjp = jax.vjp(run, state, x, dt, A, B, C, D)
    dstate, dx, ddt, dA_k, dB, dC, dD_k = vjp((dy, dstate))
    return (dstate, dA + dA_k, dD + dD_k), (dx, ddt, dB, dC)

  (dstate0, dA, dD), (dx, ddt, dB, dC) = jax.lax.scan(
      step, (dfinal, jnp.zeros_like(A), jnp.zeros_like(D)),
      [entering, keep] + [_to_bits(t) for t in (x, dt, B, C)] + [seg, dys], reverse=True)
  return dstate0, None, dx, ddt, dA, dB, dC, dD, None


_block_scan.defvjp(_block_scan_fwd, _block_scan_bwd)


def ssd_chunked(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None,
                block_chunks: int | None = None):
  """Chunked SSD: quadratic form inside each chunk, a scan over chunk states between them.

  Cost is linear in length. Returns (y [b l h p], final state [b h p n]).
  Internally heads are split as (groups g, heads per group r) and every
  contraction is batched over (b, chunk, g[, r]) with the contracted axis
  last or second to last, so XLA needs few layout changes. The cumulative
  sum inside a chunk is a product with a triangular matrix (a plain cumsum
  lowers to a slow reduce-window on CPU); the decay between positions i >= j
  of a chunk is exp(a_cum_i - a_cum_j), exact enough since a chunk's sums are
  short, and masked before the exp so no infinity ever forms.

  Memory: an input of at most `block_chunks` chunks (default: as many as keep
  one float32 [k h q q] tensor within BLOCK_BYTES per sequence) runs as one
  batched pass whose backward saves its [b c g r q q] decay and score
  products. A longer input runs as a scan over blocks of `block_chunks`
  chunks (the last block may be shorter) with a custom VJP: the backward
  saves only the inputs, in their own dtype, and the state entering each
  block, and recomputes one block at a time. No [b c g r q q] tensor is then
  saved, the quadratic working set is one block's, and the price is a second
  forward pass of the SSD.
  """
  b, l, h, p = x.shape
  q = chunk_size
  if block_chunks is None:
    block_chunks = max(1, BLOCK_BYTES // (h * q * q * 4))
  if not isinstance(block_chunks, int) or block_chunks < 1:
    raise ValueError(f"block_chunks = {block_chunks!r} is invalid: expected a positive int or None")
  A, D = _f32(A, D)
  state0 = (jnp.zeros((b, h, p, B.shape[3]), jnp.float32) if initial_state is None
            else jnp.asarray(initial_state, jnp.float32))
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  x, dt, B, C, seg = pad_to_chunks(x, dt, B, C, seg, q)
  lp = x.shape[1]
  width = block_chunks * q  # tokens per block
  if lp <= width:
    y, final = _chunks(x, dt, A, B, C, D, seg, state0, q)
    return y[:, :l], final

  whole = lp - lp % width  # tokens in whole blocks; the rest is one shorter block
  # The state entering a block survives only if the block starts in the run that ended
  # the previous one: [b blocks] (one more for the rest).
  keep = (seg[:, width::width] == seg[:, width - 1:-1:width]).astype(jnp.float32)
  keep = jnp.concatenate([jnp.ones((b, 1), jnp.float32), keep], axis=1)[:, :, None, None, None]
  blocks = lambda t: jnp.moveaxis(t[:, :whole].reshape(b, whole // width, width, *t.shape[2:]), 1, 0)
  ys, final = _block_scan(q, state0, jnp.moveaxis(keep[:, :whole // width], 1, 0),
                          *[blocks(t) for t in (x, dt)], A, *[blocks(t) for t in (B, C)], D, blocks(seg))
  y = jnp.moveaxis(ys, 0, 1).reshape(b, whole, h, p)
  if whole < lp:
    rest = [t[None, :, whole:] for t in (x, dt, B, C, seg)]
    y_rest, final = _block_scan(q, final, keep[None, :, -1], *rest[:2], A, *rest[2:4], D, rest[4])
    y = jnp.concatenate([y, y_rest[0]], axis=1)
  return y[:, :l], final


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
