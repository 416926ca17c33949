"""Pallas (Triton) kernels for the chunked SSD scan of Mamba-2, forward and backward.

Same contract as `nemotron_jax.layers.ssd.ssd_chunked` (its module docstring
states the recurrence). Per batch row and head, with a = dt A, acum the
inclusive cumulative sum of a within a chunk, total its sum over the chunk, and
"run" a stretch of equal segment ids:
  y_i     = sum_{j <= i, same run} CB_ij exp(acum_i - acum_j) dt_j x_j
            + enter_i C_i start_c^T + D x_i,    CB_ij = C_i . B_j,
            enter_i = exp(acum_i) if i is in the run the entering state belongs
            to, else 0
  cs_c    = sum_j wend_j x_j^T B_j,             wend_j = dt_j exp(total - acum_j)
            if j is in the chunk's last run, else 0
  start_{c+1} = surv_c start_c + cs_c,          surv_c = exp(total) if the
            chunk's last token is still in the entering run, else 0
with start_0 the initial state and start_{chunks} the final state.

Split of the work. XLA computes everything of size [b l h] or smaller (acum,
enter, wend, surv, the D x term) and C.B^T per chunk and group (a batched
matmul, [b chunks g Q Q]); autodiff carries their gradients. The kernels do
everything of size [Q Q] per head or [head_dim d_state] per chunk:
  _state_kernel     [b, chunk, head, p-tile]   cs_c (and in the backward, in the
                    same launch, u_c = sum_i enter_i dy_i^T C_i, the outputs'
                    gradient to start_c)
  _pass_kernel      [b, head, p-tile]          start_c and the final state,
                    sequential over chunks
  _scan_kernel      [b, chunk x q-block, head, p-tile]  y of one query block:
                    entering-state term, then a loop over the key blocks <= it
  _pass_bwd_kernel  [b, head, p-tile]          dL/dcs_c, dL/dsurv_c and
                    dL/dinitial, reverse over chunks
  _pair_kernel      [b, chunk, group, q-block x k-block]  dL/dCB of one
                    (query, key) block pair summed over the group's heads, and
                    that pair's row and column sums of dL/dacum through the decay
  _token_kernel     [b, chunk x k-block, head, p-tile]  dx, and the per-token
                    terms of ddt, dwend and denter, for one key block: a loop
                    over the query blocks >= it
  _group_kernel     [b, chunk x block, group]  dB through cs and dC through the
                    entering state (one launch), summed over the group's heads
Triton has no cumsum and no in-kernel slicing of values: every access is a
whole block or a `pl.ds` window of a ref, and every loaded tile is a power of
two on each axis.

Shapes of any size. Tiles are powers of two of at least 16 (Triton's dot
minimum): the token tile is the largest power of two <= block_t (block_t_bwd in
the backward) dividing the chunk, the head_dim tile the largest <= block_p
dividing head_dim. A chunk or head_dim that is not a multiple of 16 is padded to
one (no-op tokens with dt = 0 and x = B = C = 0 at the end of every chunk; zero
head_dim columns), d_state is padded with zero columns to a power of two; the
padding changes no result and is cut from the outputs.

Register and shared-memory budget per program (float32 values; T the token
tile, P the head_dim tile, N d_state; Nano 3, Nano v2 and Nemotron-H 8B all
have N = 128 and chunk 128; defaults T = 64 forward, 32 backward, P = 32 at
head_dim 64, 16 at head_dim 80). A program of 4 warps has 128 threads of at
most 255 registers, ~127 KiB; the tiles below stay under half of that, and
the dot operands stage through shared memory, well under the 163 KiB (A100) /
227 KiB (H100, H200) a block may use:
  _scan_kernel   in the loop: acc [T P], the C.B^T and decay tiles [T T], the
                 x tile [T P]: 2K + 4K + 4K + 2K floats = 48 KiB (~96 registers
                 a thread); its dot operands, [T T] + [T P], x 2 stages = 48 KiB
                 of shared memory. Before the loop, C_i start^T reads [T N] + [P N]
                 = 48 KiB once.
  _token_kernel  (T = 32) acc [T P], the transposed score [T T], the dy tile
                 [T P], then B_t dcs^T and C_t start^T from [T N] + [P N]:
                 at most 1K + 1K + 1K + 4K + 4K floats = 44 KiB.
  _pair_kernel   (T = 32) the dCB accumulator, dy.x^T, decay and C.B^T, each
                 [T T], and two [T P] operand tiles: 6K floats = 24 KiB.
  _state_kernel  forward (T = 64): acc [P N] and operands [T P] + [T N], 4K + 2K
                 + 8K floats = 56 KiB; backward (T = 32, cs and u together): two
                 accumulators and one dot's operands, 8K + 1K + 4K = 52 KiB.
  _group_kernel  (T = 32, dB and dC together) two accumulators [T N] and one
                 dot's operands [T P] + [P N]: 8K + 1K + 4K floats = 52 KiB.
  pass kernels   the carried state [P N] and one chunk's [P N]: 32 KiB.
No program holds a [Q Q] or [Q N] tile, so the budget does not grow with the
chunk: a chunk of 256 only lengthens the loops.

Offsets. Pallas's Triton lowering computes element offsets in 64 bits for every
operand over 4 GiB and in 32 bits below that (where they cannot overflow), so a
long sequence (the [b chunks h p n] states pass 4 GiB at 256K tokens for Nano 3
shapes) needs no limit; every index along one axis stays below 2^31.

Saved as residuals for the backward: the kernel inputs (x, dt, B, C as given,
bf16 stays bf16, padded as above; float32 acum, enter, wend [b l h], surv [b
chunks h]; the initial state; int32 run ids relative to each chunk's entering
run). Neither y nor C.B^T nor anything of size [b chunks h p n] is saved.
Recomputed in the backward: C.B^T, the per-chunk states cs_c and the entering
states start_c (by rerunning the state and pass kernels).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.custom_batching
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton
from jax.extend import core as jex_core
from jax.interpreters import mlir

from nemotron_jax.layers.ssd import pad_to_chunks, run_ids

f32 = jnp.float32
PRECISIONS = ("float32", "tf32", "bf16")


class UnsupportedPlatformError(ValueError):
  """ssd_pallas lowered for a platform that has no compiled kernel."""


def _no_kernel_error(platforms) -> UnsupportedPlatformError:
  return UnsupportedPlatformError(
      f"ssd_impl='pallas' has compiled (Triton) kernels only for CUDA, not for platform(s) "
      f"{list(platforms)}: use ssd_impl='xla' there, or set model.mamba.kernel.interpret=True "
      "(ssd_pallas(interpret=True)) to run the Pallas interpreter, which is orders of magnitude slower")


# Stands in for the kernels on platforms without a Triton lowering: it lowers to an error.
_no_kernel_p = jex_core.Primitive("ssd_pallas_no_kernel")
_no_kernel_p.multiple_results = True
_no_kernel_p.def_abstract_eval(lambda *args, out_avals: out_avals)


def _no_kernel_impl(*args, out_avals):
  raise _no_kernel_error([jax.default_backend()])


def _no_kernel_lowering(ctx, *args, out_avals):
  raise _no_kernel_error(ctx.module_context.platforms)


_no_kernel_p.def_impl(_no_kernel_impl)
mlir.register_lowering(_no_kernel_p, _no_kernel_lowering)


def _no_kernel(out_avals):
  """A function of the kernel inputs with outputs shaped out_avals that lowers to the error.

  vmap traces every platform's branch, so the stand-in batches like the kernels: each vmap
  level prepends its axis to every output.
  """
  @jax.custom_batching.custom_vmap
  def stand_in(*args):
    return tuple(_no_kernel_p.bind(*args, out_avals=out_avals))

  @stand_in.def_vmap
  def _(axis_size, in_batched, *args):
    batched = tuple(jax.core.ShapedArray((axis_size, *a.shape), a.dtype) for a in out_avals)
    return _no_kernel(batched)(*args), (True,) * len(out_avals)

  return stand_in


@dataclasses.dataclass(frozen=True)
class _Config:
  """Static (hashable) launch settings shared by all kernels of one call."""
  chunk: int  # the chunk as the kernels see it: chunk_size padded to a multiple of 16
  block_t: int  # token tile of the forward kernels
  block_t_bwd: int  # token tile of the backward kernels
  block_p: int  # head_dim tile
  num_warps: int
  num_stages: int
  precision: str  # one of PRECISIONS
  interpret: bool


def _launch(cfg: _Config, kernel, *, name, grid, in_specs, out_specs, out_shape):
  """A pallas_call: the Triton kernel on CUDA, an error elsewhere; the interpreter if cfg.interpret."""
  def run(interpret, *args):
    return pl.pallas_call(
        kernel, grid=grid, in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        compiler_params=pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=interpret, name=name)(*args)

  if cfg.interpret:
    return functools.partial(run, True)

  def unsupported(*args):
    shapes = out_shape if isinstance(out_shape, (list, tuple)) else [out_shape]
    outs = _no_kernel(tuple(jax.core.ShapedArray(s.shape, s.dtype) for s in shapes))(*args)
    return tuple(outs) if shapes is out_shape else outs[0]

  # Decided when the platform is known, so a CUDA export carries the Triton kernels.
  return lambda *args: lax.platform_dependent(
      *args, cuda=functools.partial(run, False), default=unsupported)


def _dot(cfg, a, b, *, ta=False, tb=False):
  """(a^T if ta) @ (b^T if tb) with float32 accumulation, operands as cfg.precision says."""
  if cfg.precision == "bf16":
    a, b = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
  else:
    a, b = a.astype(f32), b.astype(f32)
  precision = lax.Precision.HIGHEST if cfg.precision == "float32" else lax.Precision.DEFAULT
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=f32)


def _decay(acum_i, acum_j, rel_i, rel_j, i0, j0):
  """[Ti Tj] exp(acum_i - acum_j) where position i0 + i >= j0 + j in the same run, else 0."""
  pos_i = i0 + jnp.arange(acum_i.shape[0])
  pos_j = j0 + jnp.arange(acum_j.shape[0])
  keep = (pos_i[:, None] >= pos_j[None, :]) & (rel_i[:, None] == rel_j[None, :])
  # Masking the exponent (not the result) keeps exp from overflowing above the diagonal.
  return jnp.exp(jnp.where(keep, acum_i[:, None] - acum_j[None, :], -jnp.inf))


# ---------------------------------------------------------------------------------------------
# Kernels

def _state_kernel(*refs, cfg, tile):
  """One (batch, chunk, head, p-tile): for each (v, w, m) input triple, out [P N] = sum_t (w_t v_t)^T m_t
  over the chunk's tokens."""
  n_out = len(refs) // 4
  ins, outs = refs[:3 * n_out], refs[3 * n_out:]

  def body(t, accs):
    window = pl.ds(t * tile, tile)
    return tuple(
        acc + _dot(cfg, v_ref[window, :].astype(f32) * w_ref[window][:, None], m_ref[window, :], ta=True)
        for acc, (v_ref, w_ref, m_ref) in zip(accs, zip(ins[0::3], ins[1::3], ins[2::3])))

  accs = lax.fori_loop(0, cfg.chunk // tile, body, tuple(jnp.zeros(o.shape, f32) for o in outs))
  for out_ref, acc in zip(outs, accs):
    out_ref[...] = acc


def _pass_kernel(cs_ref, surv_ref, init_ref, starts_ref, final_ref):
  """One (batch, head, p-tile): start_c = the state entering chunk c, for all c, and the final state."""
  def body(c, state):
    starts_ref[c] = state
    return surv_ref[c] * state + cs_ref[c]

  final_ref[...] = lax.fori_loop(0, cs_ref.shape[0], body, init_ref[...])


def _pass_bwd_kernel(u_ref, surv_ref, starts_ref, dfinal_ref, dcs_ref, dsurv_ref, dinit_ref):
  """One (batch, head, p-tile): dL/dcs_c = dL/dstart_{c+1}, dL/dsurv_c (this p-tile's part), dL/dstart_0."""
  chunks = u_ref.shape[0]

  def body(t, dstate):
    c = chunks - 1 - t
    dcs_ref[c] = dstate
    dsurv_ref[c] = jnp.sum(dstate * starts_ref[c])
    return surv_ref[c] * dstate + u_ref[c]

  dinit_ref[...] = lax.fori_loop(0, chunks, body, dfinal_ref[...])


def _scan_kernel(x_ref, dt_ref, acum_ref, rel_ref, cb_ref, c_ref, enter_ref, start_ref, y_ref, *, cfg):
  """One (batch, chunk x query block, head, p-tile): y [T P] without the D x term."""
  tile = cfg.block_t
  i = pl.program_id(1) % (cfg.chunk // tile)
  w_i = pl.ds(i * tile, tile)
  acum_i, rel_i = acum_ref[w_i], rel_ref[w_i]
  acc = enter_ref[...][:, None] * _dot(cfg, c_ref[...], start_ref[...], tb=True)

  def body(j, acc):
    w_j = pl.ds(j * tile, tile)
    s = cb_ref[:, w_j] * _decay(acum_i, acum_ref[w_j], rel_i, rel_ref[w_j], i * tile, j * tile)
    xdt = x_ref[w_j, :].astype(f32) * dt_ref[w_j][:, None]
    return acc + _dot(cfg, s, xdt)

  y_ref[...] = lax.fori_loop(0, i + 1, body, acc)


def _pair_kernel(x_ref, dt_ref, acum_ref, rel_ref, dy_ref, cb_ref, dcb_ref, drow_ref, dcol_ref, *, cfg):
  """One (batch, chunk, group, query block i x key block j): dL/dCB_ij and the decay's dL/dacum sums."""
  tile, bp = cfg.block_t_bwd, cfg.block_p
  blocks = cfg.chunk // tile
  i, j = pl.program_id(3) // blocks, pl.program_id(3) % blocks
  heads, p_tiles = x_ref.shape[1], x_ref.shape[2] // bp
  w_i, w_j = pl.ds(i * tile, tile), pl.ds(j * tile, tile)

  @pl.when(j <= i)
  def _():
    cb = cb_ref[...]
    rel_i, rel_j = rel_ref[w_i], rel_ref[w_j]

    def head(k, dcb):
      dt_j = dt_ref[w_j, k].astype(f32)

      def p_tile(t, g):
        w_p = pl.ds(t * bp, bp)
        xdt = x_ref[w_j, k, w_p].astype(f32) * dt_j[:, None]
        return g + _dot(cfg, dy_ref[w_i, k, w_p], xdt, tb=True)

      g = lax.fori_loop(0, p_tiles, p_tile, jnp.zeros((tile, tile), f32))
      g = g * _decay(acum_ref[w_i, k], acum_ref[w_j, k], rel_i, rel_j, i * tile, j * tile)
      dd = g * cb
      drow_ref[:, k] = jnp.sum(dd, axis=1)
      dcol_ref[:, k] = jnp.sum(dd, axis=0)
      return dcb + g

    dcb_ref[...] = lax.fori_loop(0, heads, head, jnp.zeros((tile, tile), f32))

  @pl.when(j > i)
  def _():
    dcb_ref[...] = jnp.zeros((tile, tile), f32)

    def head(k, carry):
      drow_ref[:, k] = jnp.zeros((tile,), f32)
      dcol_ref[:, k] = jnp.zeros((tile,), f32)
      return carry

    lax.fori_loop(0, heads, head, 0)


def _token_kernel(x_ref, dt_ref, wend_ref, acum_ref, rel_ref, cb_ref, dy_ref, b_ref, c_ref, dcs_ref,
                  start_ref, dx_ref, ddt_ref, dwend_ref, denter_ref, *, cfg):
  """One (batch, chunk x key block t, head, p-tile): dx [T P] and this p-tile's part of ddt, dwend, denter [T]."""
  tile = cfg.block_t_bwd
  blocks = cfg.chunk // tile
  t = pl.program_id(1) % blocks
  w_t = pl.ds(t * tile, tile)
  acum_t, rel_t = acum_ref[w_t], rel_ref[w_t]

  def body(i, acc):
    w_i = pl.ds(i * tile, tile)
    s = cb_ref[w_i, :] * _decay(acum_ref[w_i], acum_t, rel_ref[w_i], rel_t, i * tile, t * tile)
    return acc + _dot(cfg, s, dy_ref[w_i, :], ta=True)

  dxdt = lax.fori_loop(t, blocks, body, jnp.zeros(x_ref.shape, f32))
  x, dt, wend = x_ref[...].astype(f32), dt_ref[...].astype(f32), wend_ref[...]
  bd = _dot(cfg, b_ref[...], dcs_ref[...], tb=True)
  ce = _dot(cfg, c_ref[...], start_ref[...], tb=True)
  dx_ref[...] = (dxdt * dt[:, None] + wend[:, None] * bd).astype(dx_ref.dtype)
  ddt_ref[...] = jnp.sum(x * dxdt, axis=1)
  dwend_ref[...] = jnp.sum(x * bd, axis=1)
  denter_ref[...] = jnp.sum(dy_ref[w_t, :] * ce, axis=1)


def _group_kernel(*refs, cfg):
  """One (batch, chunk x token block, group): for each (v, w, m) input triple, out [T N] =
  sum over the group's heads and head_dim of (w v) m."""
  bp, n_out = cfg.block_p, len(refs) // 4
  ins, outs = refs[:3 * n_out], refs[3 * n_out:]
  heads, p_tiles = ins[0].shape[1], ins[0].shape[2] // bp

  def head(k, accs):
    def p_tile(t, accs):
      w_p = pl.ds(t * bp, bp)
      return tuple(
          acc + _dot(cfg, v_ref[:, k, w_p].astype(f32) * w_ref[:, k][:, None], m_ref[k, w_p, :])
          for acc, (v_ref, w_ref, m_ref) in zip(accs, zip(ins[0::3], ins[1::3], ins[2::3])))

    return lax.fori_loop(0, p_tiles, p_tile, accs)

  accs = lax.fori_loop(0, heads, head, tuple(jnp.zeros(o.shape, f32) for o in outs))
  for out_ref, acc in zip(outs, accs):
    out_ref[...] = acc


# ---------------------------------------------------------------------------------------------
# Launchers. Shapes: x, dy [b L h P], dt, acum, enter, wend [b L h], B, C [b L g N],
# CB [b chunks g Q Q], states [b chunks h P N], surv [b chunks h], rel [b L].

def _chunk_states(cfg, *triples):
  """[b chunks h P N] sum over each chunk of (w v)^T m for each (v, w, m) triple, in one launch:
  cs from (x, wend, B), u from (dy, enter, C)."""
  b, L, h, p = triples[0][0].shape
  g, n = triples[0][2].shape[2:]
  q, bp, r = cfg.chunk, cfg.block_p, h // g
  specs = [pl.BlockSpec((None, q, None, bp), lambda i, c, j, t: (i, c, j, t)),
           pl.BlockSpec((None, q, None), lambda i, c, j, t: (i, c, j)),
           pl.BlockSpec((None, q, None, n), lambda i, c, j, t: (i, c, j // r, 0))]
  out = pl.BlockSpec((None, None, None, bp, n), lambda i, c, j, t: (i, c, j, t, 0))
  # The backward's launch carries two accumulators: it takes the backward's smaller tile.
  tile = cfg.block_t if len(triples) == 1 else cfg.block_t_bwd
  return _launch(
      cfg, functools.partial(_state_kernel, cfg=cfg, tile=tile),
      name="ssd_chunk_state", grid=(b, L // q, h, p // bp), in_specs=specs * len(triples),
      out_specs=[out] * len(triples),
      out_shape=[jax.ShapeDtypeStruct((b, L // q, h, p, n), f32)] * len(triples),
  )(*[t for triple in triples for t in triple])


def _state_specs(cfg, states):
  b, nc, h, p, n = states.shape
  bp = cfg.block_p
  per_chunk = pl.BlockSpec((None, nc, None, bp, n), lambda i, j, t: (i, 0, j, t, 0))
  carry = pl.BlockSpec((None, None, bp, n), lambda i, j, t: (i, j, t, 0))
  surv = pl.BlockSpec((None, nc, None), lambda i, j, t: (i, 0, j))
  return (b, h, p // bp), per_chunk, carry, surv


def _pass_states(cfg, cs, surv, init):
  """(start_c for every chunk [b chunks h P N], final state [b h P N])."""
  grid, per_chunk, carry, surv_spec = _state_specs(cfg, cs)
  return _launch(
      cfg, _pass_kernel, name="ssd_state_pass", grid=grid,
      in_specs=[per_chunk, surv_spec, carry], out_specs=[per_chunk, carry],
      out_shape=[jax.ShapeDtypeStruct(cs.shape, f32), jax.ShapeDtypeStruct(init.shape, f32)],
  )(cs, surv, init)


def _pass_states_bwd(cfg, u, surv, starts, dfinal):
  """(dL/dcs [b chunks h P N], dL/dsurv [b chunks h], dL/dinitial [b h P N])."""
  grid, per_chunk, carry, surv_spec = _state_specs(cfg, u)
  b, nc, h = surv.shape
  p_tiles = grid[2]
  dcs, dsurv, dinit = _launch(
      cfg, _pass_bwd_kernel, name="ssd_state_pass_bwd", grid=grid,
      in_specs=[per_chunk, surv_spec, per_chunk, carry],
      out_specs=[per_chunk, pl.BlockSpec((None, nc, None, None), lambda i, j, t: (i, 0, j, t)), carry],
      out_shape=[jax.ShapeDtypeStruct(u.shape, f32), jax.ShapeDtypeStruct((b, nc, h, p_tiles), f32),
                 jax.ShapeDtypeStruct(dfinal.shape, f32)],
  )(u, surv, starts, dfinal)
  return dcs, dsurv.sum(-1), dinit


def _chunk_scan(cfg, x, dt, acum, rel, cb, C, enter, starts):
  b, L, h, p = x.shape
  g, n = C.shape[2:]
  q, tile, bp, r = cfg.chunk, cfg.block_t, cfg.block_p, h // g
  nq = q // tile
  return _launch(
      cfg, functools.partial(_scan_kernel, cfg=cfg), name="ssd_chunk_scan",
      grid=(b, L // tile, h, p // bp),
      in_specs=[pl.BlockSpec((None, q, None, bp), lambda i, s, j, t: (i, s // nq, j, t)),
                pl.BlockSpec((None, q, None), lambda i, s, j, t: (i, s // nq, j)),
                pl.BlockSpec((None, q, None), lambda i, s, j, t: (i, s // nq, j)),
                pl.BlockSpec((None, q), lambda i, s, j, t: (i, s // nq)),
                pl.BlockSpec((None, None, None, tile, q), lambda i, s, j, t: (i, s // nq, j // r, s % nq, 0)),
                pl.BlockSpec((None, tile, None, n), lambda i, s, j, t: (i, s, j // r, 0)),
                pl.BlockSpec((None, tile, None), lambda i, s, j, t: (i, s, j)),
                pl.BlockSpec((None, None, None, bp, n), lambda i, s, j, t: (i, s // nq, j, t, 0))],
      out_specs=pl.BlockSpec((None, tile, None, bp), lambda i, s, j, t: (i, s, j, t)),
      out_shape=jax.ShapeDtypeStruct((b, L, h, p), f32),
  )(x, dt, acum, rel, cb, C, enter, starts)


def _pair_grads(cfg, x, dt, acum, rel, dy, cb):
  """(dL/dCB [b chunks g Q Q], dL/dacum through the decay [b L h])."""
  b, L, h, p = x.shape
  g = cb.shape[2]
  q, tile, r = cfg.chunk, cfg.block_t_bwd, h // g
  nq = q // tile
  grp = pl.BlockSpec((None, q, r, p), lambda i, c, k, s: (i, c, k, 0))
  grp_h = pl.BlockSpec((None, q, r), lambda i, c, k, s: (i, c, k))
  pair = pl.BlockSpec((None, None, None, tile, tile), lambda i, c, k, s: (i, c, k, s // nq, s % nq))
  sums = jax.ShapeDtypeStruct((b, nq, L, h), f32)
  dcb, drow, dcol = _launch(
      cfg, functools.partial(_pair_kernel, cfg=cfg), name="ssd_chunk_pair_bwd",
      grid=(b, L // q, g, nq * nq),
      in_specs=[grp, grp_h, grp_h, pl.BlockSpec((None, q), lambda i, c, k, s: (i, c)), grp, pair],
      out_specs=[pair,
                 pl.BlockSpec((None, None, tile, r), lambda i, c, k, s: (i, s % nq, c * nq + s // nq, k)),
                 pl.BlockSpec((None, None, tile, r), lambda i, c, k, s: (i, s // nq, c * nq + s % nq, k))],
      out_shape=[jax.ShapeDtypeStruct(cb.shape, f32), sums, sums],
  )(x, dt, acum, rel, dy, cb)
  return dcb, drow.sum(1) - dcol.sum(1)


def _token_grads(cfg, x, dt, wend, acum, rel, cb, dy, B, C, dcs, starts):
  """(dx [b L h P], and [b L h] ddt through x dt, dL/dwend, dL/denter)."""
  b, L, h, p = x.shape
  g, n = B.shape[2:]
  q, tile, bp, r = cfg.chunk, cfg.block_t_bwd, cfg.block_p, h // g
  nq, p_tiles = q // tile, p // bp
  tok = pl.BlockSpec((None, tile, None, bp), lambda i, s, j, t: (i, s, j, t))
  tok_h = pl.BlockSpec((None, tile, None), lambda i, s, j, t: (i, s, j))
  chunk_h = pl.BlockSpec((None, q, None), lambda i, s, j, t: (i, s // nq, j))
  grp = pl.BlockSpec((None, tile, None, n), lambda i, s, j, t: (i, s, j // r, 0))
  state = pl.BlockSpec((None, None, None, bp, n), lambda i, s, j, t: (i, s // nq, j, t, 0))
  part = pl.BlockSpec((None, tile, None, None), lambda i, s, j, t: (i, s, j, t))
  parts = jax.ShapeDtypeStruct((b, L, h, p_tiles), f32)
  dx, ddt, dwend, denter = _launch(
      cfg, functools.partial(_token_kernel, cfg=cfg), name="ssd_chunk_token_bwd",
      grid=(b, L // tile, h, p_tiles),
      in_specs=[tok, tok_h, tok_h, chunk_h, pl.BlockSpec((None, q), lambda i, s, j, t: (i, s // nq)),
                pl.BlockSpec((None, None, None, q, tile), lambda i, s, j, t: (i, s // nq, j // r, 0, s % nq)),
                pl.BlockSpec((None, q, None, bp), lambda i, s, j, t: (i, s // nq, j, t)),
                grp, grp, state, state],
      out_specs=[tok, part, part, part],
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype), parts, parts, parts],
  )(x, dt, wend, acum, rel, cb, dy, B, C, dcs, starts)
  return dx, ddt.sum(-1), dwend.sum(-1), denter.sum(-1)


def _group_sums(cfg, groups, *triples):
  """[b L g N] sum over each group's heads of (w_t v_t) m_c for each (v, w, m) triple, in one
  launch: dB from (x, wend, dcs), dC from (dy, enter, start)."""
  b, L, h, p = triples[0][0].shape
  n = triples[0][2].shape[-1]
  q, tile, r = cfg.chunk, cfg.block_t_bwd, h // groups
  nq = q // tile
  specs = [pl.BlockSpec((None, tile, r, p), lambda i, s, k: (i, s, k, 0)),
           pl.BlockSpec((None, tile, r), lambda i, s, k: (i, s, k)),
           pl.BlockSpec((None, None, r, p, n), lambda i, s, k: (i, s // nq, k, 0, 0))]
  return _launch(
      cfg, functools.partial(_group_kernel, cfg=cfg), name="ssd_group_bwd", grid=(b, L // tile, groups),
      in_specs=specs * len(triples),
      out_specs=[pl.BlockSpec((None, tile, None, n), lambda i, s, k: (i, s, k, 0))] * len(triples),
      out_shape=[jax.ShapeDtypeStruct((b, L, groups, n), f32)] * len(triples),
  )(*[t for triple in triples for t in triple])


def _xla_dot_args(cfg, *operands):
  """Operands and precision for the XLA einsums, matching the kernels' dot setting."""
  dtype = jnp.bfloat16 if cfg.precision == "bf16" else f32
  precision = lax.Precision.HIGHEST if cfg.precision == "float32" else lax.Precision.DEFAULT
  return [t.astype(dtype) for t in operands], precision


def _by_chunk(cfg, t):
  """[b L g n] -> [b chunks Q g n]."""
  return t.reshape(t.shape[0], t.shape[1] // cfg.chunk, cfg.chunk, *t.shape[2:])


def _chunk_cb(cfg, B, C):
  """[b chunks g Q Q] C_i . B_j within each chunk, float32 (a batched matmul XLA runs well)."""
  (Bc, Cc), precision = _xla_dot_args(cfg, _by_chunk(cfg, B), _by_chunk(cfg, C))
  return jnp.einsum("bcign,bcjgn->bcgij", Cc, Bc, precision=precision, preferred_element_type=f32)


def _chunk_cb_grads(cfg, dcb, B, C):
  """(dB, dC) [b L g N] from dL/dCB."""
  (dcb, Bc, Cc), precision = _xla_dot_args(cfg, dcb, _by_chunk(cfg, B), _by_chunk(cfg, C))
  dC = jnp.einsum("bcgij,bcjgn->bcign", dcb, Bc, precision=precision, preferred_element_type=f32)
  dB = jnp.einsum("bcgij,bcign->bcjgn", dcb, Cc, precision=precision, preferred_element_type=f32)
  return dB.reshape(B.shape), dC.reshape(C.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ssd(cfg, x, dt, B, C, acum, enter, wend, surv, init, rel):
  """SSD on whole (padded) chunks without the D x term. Returns (y [b l h p], final state), float32."""
  return _ssd_fwd(cfg, x, dt, B, C, acum, enter, wend, surv, init, rel)[0]


def _ssd_fwd(cfg, x, dt, B, C, acum, enter, wend, surv, init, rel):
  (cs,) = _chunk_states(cfg, (x, wend, B))
  starts, final = _pass_states(cfg, cs, surv, init)
  y = _chunk_scan(cfg, x, dt, acum, rel, _chunk_cb(cfg, B, C), C, enter, starts)
  return (y, final), (x, dt, B, C, acum, enter, wend, surv, init, rel)


def _ssd_bwd(cfg, res, cotangents):
  x, dt, B, C, acum, enter, wend, surv, init, rel = res
  dy, dfinal = cotangents
  groups = B.shape[2]
  cb = _chunk_cb(cfg, B, C)
  cs, u = _chunk_states(cfg, (x, wend, B), (dy, enter, C))
  starts, _ = _pass_states(cfg, cs, surv, init)
  dcs, dsurv, dinit = _pass_states_bwd(cfg, u, surv, starts, dfinal)
  dcb, dacum = _pair_grads(cfg, x, dt, acum, rel, dy, cb)
  dx, ddt, dwend, denter = _token_grads(cfg, x, dt, wend, acum, rel, cb, dy, B, C, dcs, starts)
  dB_cb, dC_cb = _chunk_cb_grads(cfg, dcb, B, C)
  dB, dC = _group_sums(cfg, groups, (x, wend, dcs), (dy, enter, starts))
  dB, dC = dB + dB_cb, dC + dC_cb
  return (dx, ddt.astype(dt.dtype), dB.astype(B.dtype), dC.astype(C.dtype), dacum, denter, dwend,
          dsurv, dinit, None)


_ssd.defvjp(_ssd_fwd, _ssd_bwd)


def _relative_runs(seg, q):
  """[b l] run ids (l a multiple of q) minus the id of the run entering each chunk, so 0 marks that run."""
  b, L = seg.shape
  chunks = seg.reshape(b, L // q, q)
  entering = jnp.concatenate([chunks[:, :1, 0], chunks[:, :-1, -1]], axis=1)
  return (chunks - entering[..., None]).reshape(b, L)


def _round_up(n, m):
  return -(-n // m) * m


def _tile(size, cap):
  """The largest power of two <= cap dividing size (a multiple of 16; cap a power of two >= 16)."""
  while size % cap:
    cap //= 2
  return cap


def _widen_chunks(t, chunk, q, mode="constant"):
  """[b L ...] with L a multiple of chunk -> [b L/chunk*q ...]: each chunk padded at its end to q tokens."""
  b, L = t.shape[:2]
  t = t.reshape(b, L // chunk, chunk, *t.shape[2:])
  t = jnp.pad(t, [(0, 0), (0, 0), (0, q - chunk)] + [(0, 0)] * (t.ndim - 3), mode=mode)
  return t.reshape(b, L // chunk * q, *t.shape[3:])


def _check_settings(chunk_size, interpret, block_t, block_t_bwd, block_p, num_warps, num_stages,
                    precision):
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)

  if not is_int(chunk_size) or chunk_size < 1:
    raise ValueError(f"chunk_size = {chunk_size!r} is invalid: expected a positive int")
  for name, v in (("block_t", block_t), ("block_t_bwd", block_t_bwd), ("block_p", block_p)):
    if not is_int(v) or v < 16 or v & (v - 1):
      raise ValueError(f"{name} = {v!r} is invalid: expected a power of two >= 16 (Triton's smallest dot tile)")
  if not is_int(num_warps) or not 1 <= num_warps <= 32 or num_warps & (num_warps - 1):
    raise ValueError(f"num_warps = {num_warps!r} is invalid: expected 1, 2, 4, 8, 16 or 32")
  if not is_int(num_stages) or num_stages < 1:
    raise ValueError(f"num_stages = {num_stages!r} is invalid: expected a positive int")
  if precision not in PRECISIONS:
    raise ValueError(f"precision = {precision!r} is invalid: expected one of {list(PRECISIONS)}")
  if not isinstance(interpret, bool):
    raise ValueError(f"interpret = {interpret!r} is invalid: expected True or False")


def ssd_pallas(x, dt, A, B, C, D, *, chunk_size: int, initial_state=None, segment_ids=None,
               interpret: bool = False, block_t: int = 64, block_t_bwd: int = 32, block_p: int = 32,
               num_warps: int = 4, num_stages: int = 2, precision: str = "float32"):
  """Chunked SSD as Pallas kernels; same arguments and results as `ssd_chunked`.

  x [b l h p], dt [b l h], A [h], B, C [b l g n], D [h], initial_state
  [b h p n] or None, segment_ids [b l] or None; any head_dim, d_state and
  chunk_size. Returns (y [b l h p], final state [b h p n]), float32;
  differentiable in everything but segment_ids.
  interpret: False runs the Triton kernels on CUDA and raises
  UnsupportedPlatformError when lowered for any other platform; True runs the
  Pallas interpreter everywhere (tests, debugging).
  block_t / block_t_bwd: caps of the token tile of the forward / backward
  kernels; block_p: cap of the head_dim tile (module docstring: how tiles are
  chosen and what a program holds). num_warps, num_stages: Triton launch
  settings of every kernel. precision of the dots, all accumulating in
  float32: "float32" (IEEE, no tensor cores), "tf32" (float32 operands rounded
  to TF32 on tensor cores), "bf16" (operands cast to bfloat16).
  """
  _check_settings(chunk_size, interpret, block_t, block_t_bwd, block_p, num_warps, num_stages,
                  precision)
  b, l, h, p = x.shape
  g, n = B.shape[2], B.shape[3]
  if h % g:
    raise ValueError(f"n_groups = {g} (B.shape[2]) must divide the number of heads {h} (x.shape[2])")
  expected = {"dt": (b, l, h), "A": (h,), "B": (b, l, g, n), "C": (b, l, g, n), "D": (h,)}
  for name, arr in zip(expected, (dt, A, B, C, D)):
    if arr.shape != expected[name]:
      raise ValueError(f"{name}.shape = {arr.shape} is invalid: expected {expected[name]} from x {x.shape}, B {B.shape}")
  if initial_state is not None and initial_state.shape != (b, h, p, n):
    raise ValueError(f"initial_state.shape = {initial_state.shape} is invalid: expected {(b, h, p, n)}")

  q, p_pad, n_pad = _round_up(chunk_size, 16), _round_up(p, 16), max(16, 1 << (n - 1).bit_length())
  cfg = _Config(q, _tile(q, block_t), _tile(q, block_t_bwd), _tile(p_pad, block_p), num_warps,
                num_stages, precision, interpret)
  seg = jnp.zeros((b, l), jnp.int32) if segment_ids is None else run_ids(segment_ids)
  xp, dtp, Bp, Cp, seg = pad_to_chunks(x, dt, B, C, seg, chunk_size)
  if q != chunk_size:
    xp, dtp, Bp, Cp = (_widen_chunks(t, chunk_size, q) for t in (xp, dtp, Bp, Cp))
    seg = _widen_chunks(seg, chunk_size, q, mode="edge")
  xp = jnp.pad(xp, [(0, 0)] * 3 + [(0, p_pad - p)])
  Bp, Cp = (jnp.pad(t, [(0, 0)] * 3 + [(0, n_pad - n)]) for t in (Bp, Cp))
  init = jnp.zeros((b, h, p, n), f32) if initial_state is None else jnp.asarray(initial_state, f32)
  init = jnp.pad(init, [(0, 0), (0, 0), (0, p_pad - p), (0, n_pad - n)])

  # The [b L h] decay weights (module docstring); autodiff carries their gradients to dt and A.
  nc = xp.shape[1] // q
  rel = _relative_runs(seg, q)
  rel_c = rel.reshape(b, nc, q, 1)
  dt_c = dtp.astype(f32).reshape(b, nc, q, h)
  acum = jnp.cumsum(dt_c * jnp.asarray(A, f32), axis=2)
  total, last = acum[:, :, -1], rel_c[:, :, -1]
  enter = jnp.where(rel_c == 0, jnp.exp(acum), 0.0).reshape(b, nc * q, h)
  wend = (jnp.where(rel_c == last[:, :, None], jnp.exp(total[:, :, None] - acum), 0.0) * dt_c)
  surv = jnp.where(last == 0, jnp.exp(total), 0.0)
  y, final = _ssd(cfg, xp, dtp, Bp, Cp, acum.reshape(b, nc * q, h), enter,
                  wend.reshape(b, nc * q, h), surv, init, rel)
  y = y.reshape(b, nc, q, h, p_pad)[:, :, :chunk_size, :, :p].reshape(b, nc * chunk_size, h, p)[:, :l]
  return y + jnp.asarray(D, f32)[:, None] * x.astype(f32), final[:, :, :p, :n]
