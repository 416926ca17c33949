"""Pallas (Triton) kernels for the chunked SSD scan of Mamba-2, forward and backward.

Same contract as `nemotron_jax.layers.ssd.ssd_chunked` (its module docstring
states the recurrence). Per batch row and head, with a = dt A, acum the
inclusive cumulative sum of a within a chunk, total its sum over the chunk, and
"run" a stretch of equal segment ids:
  y_i     = sum_{j <= i, same run} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
            + enter_i start_c C_i + D x_i,      enter_i = exp(acum_i) if i is in
            the run the entering state belongs to, else 0
  cs_c    = sum_j end_j dt_j x_j B_j^T,         end_j = exp(total - acum_j) if j
            is in the chunk's last run, else 0
  start_{c+1} = surv_c start_c + cs_c,          surv_c = exp(total) if the
            chunk's last token is still in the entering run, else 0
with start_0 the initial state and start_{chunks} the final state.

Kernels, with their grids:
  _chunk_state_kernel    [b, chunk, head, p-tile]  cs_c (and, in the backward,
                         u_c = sum_i enter_i dy_i C_i^T, the gradient the
                         outputs send to the entering state)
  _state_pass_kernel     [b, head, p-tile]         start_c for every chunk and
                         the final state, sequential over chunks
  _chunk_scan_kernel     [b, chunk, group]         y; C.B^T once per group,
                         then a loop over the group's heads
  _state_pass_bwd_kernel [b, head, p-tile]         dL/dcs_c and dL/dinitial,
                         reverse over chunks
  _chunk_scan_bwd_kernel [b, chunk, group]         dx, ddt, dB, dC (summed over
                         the group's heads in the kernel) and per-token terms
                         of dA and dD, reduced outside
Triton has no cumsum and no in-kernel slicing: cumulative sums are sums of
a masked [Q Q] copy and every access is a whole block or a `pl.ds` window.

Saved as residuals for the backward: the kernel inputs only, i.e. x, dt, B, C
as given (bf16 stays bf16; padded to whole chunks when the length is not a
multiple of chunk_size), A and D [h], the initial state [b h p n] (zeros when
none is given) and int32 per-token run ids relative to each chunk's entering
run [b l]. Neither y nor anything of size [b chunks h p n] is saved.
Recomputed in the backward: every cumulative sum and decay, C.B^T, the
per-chunk states cs_c and the entering states start_c (by rerunning the
chunk-state and state-passing kernels), and the intra-chunk and entering-state
outputs needed by the chain rule.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from nemotron_jax.layers.ssd import pad_to_chunks, run_ids

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) launch settings shared by all kernels of one call."""
  chunk_size: int
  block_p: int
  num_warps: int
  num_stages: int
  precision: lax.Precision
  interpret: bool | None


def _launch(cfg: _Config, kernel, *, name, grid, in_specs, out_specs, out_shape):
  """A pallas_call that is the Triton kernel on CUDA and interpreted elsewhere, unless cfg.interpret forces it."""
  def run(interpret, *args):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name=name)(*args)

  if cfg.interpret is None:
    # Decided when the platform is known, so a CUDA export carries the Triton kernels.
    return lambda *args: lax.platform_dependent(
        *args, cuda=functools.partial(run, False), default=functools.partial(run, True))
  return functools.partial(run, cfg.interpret)


def _dot(precision, a, b, *, ta=False, tb=False):
  """(a^T if ta) @ (b^T if tb) with float32 accumulation."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


class _Weights(NamedTuple):
  acum: jax.Array   # [Q] inclusive cumsum of a
  enter: jax.Array  # [Q] weight of the entering state at each position
  end: jax.Array    # [Q] weight of each token in the chunk's end state
  surv: jax.Array   # [] weight of the entering state at the chunk's end


def _lower(q):
  """[Q Q] mask of j <= i (row i, column j)."""
  return jnp.arange(q)[None, :] <= jnp.arange(q)[:, None]


def _weights(a, rel) -> _Weights:
  """Decay weights of one chunk from a = dt A [Q] and run ids rel [Q] (0 = the entering run)."""
  acum = jnp.sum(jnp.where(_lower(a.shape[0]), a[None, :], 0.0), axis=1)
  total = jnp.sum(a)
  last = jnp.max(rel)
  return _Weights(
      acum=acum,
      enter=jnp.where(rel == 0, jnp.exp(acum), 0.0),
      end=jnp.where(rel == last, jnp.exp(total - acum), 0.0),
      surv=jnp.where(last == 0, jnp.exp(total), 0.0))


def _decay_matrix(acum, rel):
  """[Q Q] exp(acum_i - acum_j) for j <= i in the same run, else 0."""
  keep = _lower(acum.shape[0]) & (rel[:, None] == rel[None, :])
  # Masking the exponent (not the result) keeps exp from overflowing above the diagonal.
  return jnp.exp(jnp.where(keep, acum[:, None] - acum[None, :], -jnp.inf))


def _survival(dt_ref, rel_ref, c, q, A):
  """surv of chunk c, from whole-length dt [L] and rel [L] blocks."""
  window = pl.ds(c * q, q)
  total = jnp.sum(dt_ref[window].astype(f32) * A)
  return jnp.where(jnp.max(rel_ref[window]) == 0, jnp.exp(total), 0.0)


def _chunk_state_kernel(x_ref, dt_ref, a_ref, b_ref, rel_ref, *refs, dot):
  """One (batch, chunk, head, p-tile): cs [bp n]; given dy and C also u [bp n]."""
  head = pl.program_id(2)
  dt = dt_ref[...].astype(f32)
  w = _weights(dt * a_ref[head], rel_ref[...])
  xw = x_ref[...].astype(f32) * (dt * w.end)[:, None]
  if len(refs) == 1:
    (cs_ref,) = refs
  else:
    dy_ref, c_ref, cs_ref, u_ref = refs
    u_ref[...] = dot(dy_ref[...] * w.enter[:, None], c_ref[...].astype(f32), ta=True)
  cs_ref[...] = dot(xw, b_ref[...].astype(f32), ta=True)


def _state_pass_kernel(cs_ref, dt_ref, a_ref, rel_ref, init_ref, starts_ref, final_ref, *, q):
  """One (batch, head, p-tile): start_c = state entering chunk c, for all c, and the final state."""
  A = a_ref[pl.program_id(1)]

  def body(c, state):
    starts_ref[c] = state
    return _survival(dt_ref, rel_ref, c, q, A) * state + cs_ref[c]

  final_ref[...] = lax.fori_loop(0, cs_ref.shape[0], body, init_ref[...])


def _state_pass_bwd_kernel(u_ref, dt_ref, a_ref, rel_ref, dfinal_ref, dcs_ref, dinit_ref, *, q):
  """One (batch, head, p-tile): dL/dcs_c = dL/dstart_{c+1}, from the last chunk back to the initial state."""
  A = a_ref[pl.program_id(1)]
  chunks = u_ref.shape[0]

  def body(t, dstate):
    c = chunks - 1 - t
    dcs_ref[c] = dstate
    return _survival(dt_ref, rel_ref, c, q, A) * dstate + u_ref[c]

  dinit_ref[...] = lax.fori_loop(0, chunks, body, dfinal_ref[...])


def _chunk_scan_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, rel_ref, start_ref, y_ref, *, dot):
  """One (batch, chunk, group): y [Q r p] for the r heads sharing B and C."""
  Bm, Cm, rel = b_ref[...].astype(f32), c_ref[...].astype(f32), rel_ref[...]
  cb = dot(Cm, Bm, tb=True)

  def head(k, carry):
    dt, x = dt_ref[:, k].astype(f32), x_ref[:, k, :].astype(f32)
    w = _weights(dt * a_ref[k], rel)
    y = dot(cb * _decay_matrix(w.acum, rel), x * dt[:, None])
    y += w.enter[:, None] * dot(Cm, start_ref[k], tb=True)
    y_ref[:, k, :] = y + d_ref[k] * x
    return carry

  lax.fori_loop(0, x_ref.shape[1], head, 0)


def _chunk_scan_bwd_kernel(x_ref, dt_ref, a_ref, b_ref, c_ref, d_ref, rel_ref, start_ref, dy_ref,
                           dcs_ref, dx_ref, ddt_ref, db_ref, dc_ref, da_ref, dd_ref, *, dot):
  """One (batch, chunk, group): input gradients, given dL/dy and dL/dcs of this chunk."""
  Bm, Cm, rel = b_ref[...].astype(f32), c_ref[...].astype(f32), rel_ref[...]
  cb = dot(Cm, Bm, tb=True)
  q = rel.shape[0]

  def head(k, carry):
    db, dc = carry
    dt, x, dy = dt_ref[:, k].astype(f32), x_ref[:, k, :].astype(f32), dy_ref[:, k, :]
    start, dcs, A = start_ref[k], dcs_ref[k], a_ref[k]
    w = _weights(dt * A, rel)
    decay = _decay_matrix(w.acum, rel)
    xdt = x * dt[:, None]

    # Entering state: y_i += enter_i start C_i.
    dc += w.enter[:, None] * dot(dy, start)
    dacum = w.enter * jnp.sum(dy * dot(Cm, start, tb=True), axis=1)

    # Intra-chunk: y_i += sum_j (C_i . B_j) decay_ij xdt_j.
    dscore = dot(dy, xdt, tb=True) * decay
    dc += dot(dscore, Bm)
    db += dot(dscore, Cm, ta=True)
    ddecay = dscore * cb
    dacum += jnp.sum(ddecay, axis=1) - jnp.sum(ddecay, axis=0)
    dxdt = dot(cb * decay, dy, ta=True)

    # Chunk end state cs = sum_j end_j xdt_j B_j^T, and start_{c+1} = surv start + cs.
    bd = dot(Bm, dcs, tb=True)
    dxdt += w.end[:, None] * bd
    db += w.end[:, None] * dot(xdt, dcs)
    dend = jnp.sum(xdt * bd, axis=1) * w.end
    dacum -= dend
    dtotal = jnp.sum(dend) + jnp.sum(dcs * start) * w.surv

    # acum_i = sum_{k <= i} a_k and total = sum_k a_k, so da_k = sum_{i >= k} dacum_i + dtotal.
    da = jnp.sum(jnp.where(_lower(q), dacum[:, None], 0.0), axis=0) + dtotal
    ddt_ref[:, k] = (da * A + jnp.sum(dxdt * x, axis=1)).astype(ddt_ref.dtype)
    da_ref[:, k] = da * dt
    dx_ref[:, k, :] = (dxdt * dt[:, None] + d_ref[k] * dy).astype(dx_ref.dtype)
    dd_ref[:, k] = jnp.sum(dy * x, axis=1)
    return db, dc

  zeros = jnp.zeros(Bm.shape, f32)
  db, dc = lax.fori_loop(0, x_ref.shape[1], head, (zeros, zeros))
  db_ref[...] = db.astype(db_ref.dtype)
  dc_ref[...] = dc.astype(dc_ref.dtype)


def _chunk_states(cfg, x, dt, A, B, rel, dy=None, C=None):
  """cs [b c h p n] (and u, given dy and C) for every chunk."""
  b, L, h, p = x.shape
  g, n = B.shape[2:]
  q, bp, r = cfg.chunk_size, cfg.block_p, h // g
  nc = L // q
  tok = pl.BlockSpec((None, q, None, bp), lambda i, c, j, t: (i, c, j, t))
  grp = pl.BlockSpec((None, q, None, n), lambda i, c, j, t: (i, c, j // r, 0))
  in_specs = [tok,
              pl.BlockSpec((None, q, None), lambda i, c, j, t: (i, c, j)),
              pl.BlockSpec((h,), lambda i, c, j, t: (0,)),
              grp,
              pl.BlockSpec((None, q), lambda i, c, j, t: (i, c))]
  state = pl.BlockSpec((None, None, None, bp, n), lambda i, c, j, t: (i, c, j, t, 0))
  shape = jax.ShapeDtypeStruct((b, nc, h, p, n), f32)
  args, n_out = [x, dt, A, B, rel], 1
  if dy is not None:
    in_specs, args, n_out = in_specs + [tok, grp], args + [dy, C], 2
  return _launch(
      cfg, functools.partial(_chunk_state_kernel, dot=functools.partial(_dot, cfg.precision)),
      name="ssd_chunk_state", grid=(b, nc, h, p // bp), in_specs=in_specs,
      out_specs=[state] * n_out, out_shape=[shape] * n_out)(*args)


def _pass_states(cfg, states, dt, A, rel, init, kernel, name):
  """Runs a sequential-over-chunks kernel on [b c h p n] per-chunk states; returns it and the carry's end."""
  b, nc, h, p, n = states.shape
  L, bp = dt.shape[1], cfg.block_p
  per_chunk = pl.BlockSpec((None, nc, None, bp, n), lambda i, j, t: (i, 0, j, t, 0))
  carry = pl.BlockSpec((None, None, bp, n), lambda i, j, t: (i, j, t, 0))
  return _launch(
      cfg, functools.partial(kernel, q=cfg.chunk_size), name=name, grid=(b, h, p // bp),
      in_specs=[per_chunk,
                pl.BlockSpec((None, L, None), lambda i, j, t: (i, 0, j)),
                pl.BlockSpec((h,), lambda i, j, t: (0,)),
                pl.BlockSpec((None, L), lambda i, j, t: (i, 0)),
                carry],
      out_specs=[per_chunk, carry],
      out_shape=[jax.ShapeDtypeStruct(states.shape, f32), jax.ShapeDtypeStruct(init.shape, f32)],
  )(states, dt, A, rel, init)


def _group_specs(cfg, x, B):
  """BlockSpecs of the per-(batch, chunk, group) kernels.

  Returns the specs of their common inputs (x, dt, A, B, C, D, rel, start) and
  the token [Q r p], token-head [Q r], group [Q n] and state [r p n] specs.
  """
  h, p = x.shape[2:]
  g, n = B.shape[2:]
  q, r = cfg.chunk_size, h // g
  tok = pl.BlockSpec((None, q, r, p), lambda i, c, j: (i, c, j, 0))
  tok_h = pl.BlockSpec((None, q, r), lambda i, c, j: (i, c, j))
  per_head = pl.BlockSpec((r,), lambda i, c, j: (j,))
  grp = pl.BlockSpec((None, q, None, n), lambda i, c, j: (i, c, j, 0))
  state = pl.BlockSpec((None, None, r, p, n), lambda i, c, j: (i, c, j, 0, 0))
  ins = [tok, tok_h, per_head, grp, grp, per_head, pl.BlockSpec((None, q), lambda i, c, j: (i, c)), state]
  return ins, tok, tok_h, grp, state


def _chunk_scan(cfg, x, dt, A, B, C, D, rel, starts):
  b, L, h, p = x.shape
  in_specs, tok, _, _, _ = _group_specs(cfg, x, B)
  return _launch(
      cfg, functools.partial(_chunk_scan_kernel, dot=functools.partial(_dot, cfg.precision)),
      name="ssd_chunk_scan", grid=(b, L // cfg.chunk_size, B.shape[2]), in_specs=in_specs,
      out_specs=tok, out_shape=jax.ShapeDtypeStruct((b, L, h, p), f32),
  )(x, dt, A, B, C, D, rel, starts)


def _chunk_scan_bwd(cfg, x, dt, A, B, C, D, rel, starts, dy, dcs):
  b, L = x.shape[:2]
  in_specs, tok, tok_h, grp, state = _group_specs(cfg, x, B)
  like = lambda t, dtype=None: jax.ShapeDtypeStruct(t.shape, dtype or t.dtype)
  return _launch(
      cfg, functools.partial(_chunk_scan_bwd_kernel, dot=functools.partial(_dot, cfg.precision)),
      name="ssd_chunk_scan_bwd", grid=(b, L // cfg.chunk_size, B.shape[2]),
      in_specs=in_specs + [tok, state],
      out_specs=[tok, tok_h, grp, grp, tok_h, tok_h],
      out_shape=[like(x), like(dt), like(B), like(C), like(dt, f32), like(dt, f32)],
  )(x, dt, A, B, C, D, rel, starts, dy, dcs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(cfg, x, dt, A, B, C, D, init, rel):
  """SSD on whole chunks. Returns (y [b l h p], final state [b h p n]), both float32."""
  return _ssd_fwd(cfg, x, dt, A, B, C, D, init, rel)[0]


def _ssd_fwd(cfg, x, dt, A, B, C, D, init, rel):
  cs = _chunk_states(cfg, x, dt, A, B, rel)[0]
  starts, final = _pass_states(cfg, cs, dt, A, rel, init, _state_pass_kernel, "ssd_state_pass")
  y = _chunk_scan(cfg, x, dt, A, B, C, D, rel, starts)
  return (y, final), (x, dt, A, B, C, D, init, rel)


def _ssd_bwd(cfg, res, cotangents):
  x, dt, A, B, C, D, init, rel = res
  dy, dfinal = cotangents
  cs, u = _chunk_states(cfg, x, dt, A, B, rel, dy=dy, C=C)
  starts, _ = _pass_states(cfg, cs, dt, A, rel, init, _state_pass_kernel, "ssd_state_pass")
  dcs, dinit = _pass_states(cfg, u, dt, A, rel, dfinal, _state_pass_bwd_kernel, "ssd_state_pass_bwd")
  dx, ddt, dB, dC, da, dd = _chunk_scan_bwd(cfg, x, dt, A, B, C, D, rel, starts, dy, dcs)
  return dx, ddt, da.sum((0, 1)), dB, dC, dd.sum((0, 1)), dinit, None


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def _relative_runs(seg, q):
  """[b l] run ids (l a multiple of q) minus the id of the run entering each chunk, so 0 marks that run."""
  b, L = seg.shape
  chunks = seg.reshape(b, L // q, q)
  entering = jnp.concatenate([chunks[:, :1, 0], chunks[:, :-1, -1]], axis=1)
  return (chunks - entering[..., None]).reshape(b, L)


def ssd_pallas(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None,
               interpret: bool | None = None, block_p: int | None = None, num_warps: int = 4,
               num_stages: int = 2, precision: lax.Precision = lax.Precision.HIGHEST):
  """Chunked SSD as Pallas kernels; same arguments and results as `ssd_chunked`.

  x [b l h p], dt [b l h], A [h], B, C [b l g n], D [h], initial_state
  [b h p n] or None, segment_ids [b l] or None. Returns (y [b l h p], final
  state [b h p n]), float32; differentiable in everything but segment_ids.
  interpret: None runs the Triton kernels on CUDA and the Pallas interpreter
  elsewhere; True always interprets; False always compiles for Triton.
  block_p: head_dim tile of the chunk-state and state-passing kernels
  (default min(head_dim, 32)). precision: of the in-kernel dots; HIGHEST is
  IEEE float32 on Triton, DEFAULT lets it use TF32 tensor cores. On GPU, Triton
  wants power-of-two tiles: chunk_size, head_dim, d_state and block_p powers
  of two, and at least 16 for the dots.
  """
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size = {chunk_size!r} is invalid: expected a positive int")
  if h % g:
    raise ValueError(f"n_groups = {g} (B.shape[2]) must divide the number of heads {h} (x.shape[2])")
  expected = {"dt": (b, l, h), "A": (h,), "B": (b, l, g, n), "C": (b, l, g, n), "D": (h,)}
  for name, arr in zip(expected, (dt, A, B, C, D)):
    if arr.shape != expected[name]:
      raise ValueError(f"{name}.shape = {arr.shape} is invalid: expected {expected[name]} from x {x.shape}, B {B.shape}")
  if initial_state is not None and initial_state.shape != (b, h, p, n):
    raise ValueError(f"initial_state.shape = {initial_state.shape} is invalid: expected {(b, h, p, n)}")
  block_p = min(p, 32) if block_p is None else block_p
  if p % block_p:
    raise ValueError(f"block_p = {block_p} must divide head_dim = {p}")

  cfg = _Config(chunk_size, block_p, num_warps, num_stages, precision, interpret)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  xp, dtp, Bp, Cp, seg = pad_to_chunks(x, dt, B, C, seg, chunk_size)
  init = jnp.zeros((b, h, p, n), f32) if initial_state is None else jnp.asarray(initial_state, f32)
  y, final = _ssd(cfg, xp, dtp, jnp.asarray(A, f32), Bp, Cp, jnp.asarray(D, f32), init,
                  _relative_runs(seg, chunk_size))
  return y[:, :l], final
