"""Quantised matmuls: each of a linear layer's three GEMMs sees quantised operands.

For y = x w with x [m, k] and w [k, n]:
  forward  y  = x  w     contraction k
  dgrad    dx = dy w^T   contraction n
  wgrad    dw = x^T dy   contraction m (tokens)
Operands are quantised and dequantised to float32 (exact up to one f32
rounding of the scale product), then multiplied with float32 accumulation:
an emulation of the low-precision tensor cores, not a fast path. Block
formats block along each GEMM's contraction axis, except 2-D weight blocks,
which serve forward and dgrad alike. `jnp.dot` / `jax.lax.ragged_dot` of the
unquantised operands is the reference ("bf16" recipe).
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from nemotron_jax.quant.formats import FORMATS, quantize_dequantize
from nemotron_jax.quant.hadamard import RHT_SIZE, random_hadamard_transform


@dataclasses.dataclass(frozen=True)
class Recipe:
  """Formats of the GEMM operands; None means plain bf16."""
  act: str | None  # x, in forward and wgrad
  weight: str | None  # w, in forward and dgrad
  weight_2d: bool  # square weight blocks, identical in forward and dgrad
  grad: str | None  # dy, in dgrad and wgrad
  stochastic_rounding: bool  # of dy's elements, when a key is given
  rht: bool  # 16x16 RHT on x and dy along the tokens, in wgrad only
  forward_sr: bool = False  # of x's and w's elements in the forward GEMM, when a key is given


RECIPES = {
  "bf16": Recipe(None, None, False, None, False, False),
  "fp8_tensorwise": Recipe("fp8_e4m3", "fp8_e4m3", False, "fp8_e4m3", False, False),
  "fp8_blockwise": Recipe("fp8_block", "fp8_block", True, "fp8_block", False, False),
  "mxfp8": Recipe("mxfp8", "mxfp8", False, "mxfp8", False, False),
  "nvfp4": Recipe("nvfp4", "nvfp4", True, "nvfp4", True, True),
}
_GRAD_FMTS = {"e4m3": "fp8_e4m3", "e5m2": "fp8_e5m2"}


def get_recipe(recipe: str, *, grad_fmt=None, stochastic_rounding=None, rht=None,
               forward_sr=None) -> Recipe:
  """The named Recipe with the qdot options applied (None keeps the recipe's default)."""
  if recipe not in RECIPES:
    raise ValueError(f"recipe={recipe!r} is not a recipe; valid: {sorted(RECIPES)}")
  r = RECIPES[recipe]
  if grad_fmt is not None:
    if recipe != "fp8_tensorwise":
      raise ValueError(
        f"grad_fmt={grad_fmt!r} applies only to recipe 'fp8_tensorwise', not {recipe!r}")
    if grad_fmt not in _GRAD_FMTS:
      raise ValueError(f"grad_fmt={grad_fmt!r} is not valid; valid: {sorted(_GRAD_FMTS)}")
    r = dataclasses.replace(r, grad=_GRAD_FMTS[grad_fmt])
  if recipe == "bf16" and (stochastic_rounding or rht or forward_sr):
    raise ValueError("recipe 'bf16' does not quantise: stochastic_rounding, forward_sr and rht "
                     "must be off")
  if stochastic_rounding is not None:
    r = dataclasses.replace(r, stochastic_rounding=stochastic_rounding)
  if rht is not None:
    r = dataclasses.replace(r, rht=rht)
  if forward_sr is not None:
    r = dataclasses.replace(r, forward_sr=forward_sr)
  return r


def _operand(x, fmt, key=None, **kw):
  """A GEMM input: bf16 when unquantised, else dequantised float32."""
  if fmt is None:
    return x.astype(jnp.bfloat16)
  return quantize_dequantize(x.astype(jnp.float32), fmt, key=key, **kw)


def _dot(a, b):
  """a [m, k] @ b [k, n] with float32 accumulation; exact f32 products."""
  return jnp.dot(a, b, precision="highest", preferred_element_type=jnp.float32)


def _grad_keys(r, key):
  """Independent keys for dy in dgrad and wgrad, or Nones for round-to-nearest-even."""
  if key is None or not r.stochastic_rounding:
    return None, None
  return jax.random.split(key)


def _forward_keys(r, key):
  """Keys for x and w in the forward GEMM (a stream apart from dy's), or Nones."""
  if key is None or not r.forward_sr:
    return None, None
  return jax.random.split(jax.random.fold_in(key, 2))


def _resolve(recipe, key, grad_fmt, stochastic_rounding, rht, forward_sr=None):
  if (stochastic_rounding or forward_sr) and key is None:
    raise ValueError("stochastic rounding needs a PRNG key: pass key=")
  return get_recipe(recipe, grad_fmt=grad_fmt, stochastic_rounding=stochastic_rounding, rht=rht,
                    forward_sr=forward_sr)


def qdot(x, w, recipe: str = "bf16", *, key=None, grad_fmt=None, stochastic_rounding=None,
         rht=None, forward_sr=None):
  """x [..., k] @ w [k, n] -> [..., n] in x's dtype, each GEMM quantised per `recipe`.

  recipe: "bf16", "fp8_tensorwise", "fp8_blockwise", "mxfp8" or "nvfp4"
    (see RECIPES). Gradients come back in x's and w's dtypes.
  key: PRNG key for stochastic rounding of dy; without one dy rounds to
    nearest even. Fold in the layer and step so no two GEMMs share noise.
  grad_fmt: dy's FP8 format in "fp8_tensorwise": "e4m3" (default) or
    "e5m2" (Transformer Engine's HYBRID).
  stochastic_rounding: round dy stochastically when `key` is given; default
    on for "nvfp4" only.
  rht: 16x16 Random Hadamard Transform of x and dy in the wgrad GEMM;
    default on for "nvfp4" only.
  forward_sr: round x and w stochastically in the forward GEMM too, when
    `key` is given (an ablation: NVIDIA's NVFP4 recipe rounds them to nearest);
    default off. dgrad reuses that rounded weight where the forward's is reused.
  """
  r = _resolve(recipe, key, grad_fmt, stochastic_rounding, rht, forward_sr)
  return _qdot(r, x, w, key)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _qdot(r, x, w, key):
  return _qdot_fwd(r, x, w, key)[0]


def _weight_reused(r) -> bool:
  """Whether dgrad's quantised weight is the forward's: square blocks, or one scale for the
  whole tensor, do not depend on the GEMM's contraction axis."""
  return r.weight is not None and (r.weight_2d or FORMATS[r.weight].block is None)


def _qdot_fwd(r, x, w, key):
  k_x, k_w = _forward_keys(r, key)
  xq = _operand(x, r.act, key=k_x, axis=-1)
  wq = _operand(w, r.weight, key=k_w, axis=0, two_d=r.weight_2d)
  y = jnp.einsum("...k,kn->...n", xq, wq, precision="highest", preferred_element_type=jnp.float32)
  return y.astype(x.dtype), (x, w, wq if _weight_reused(r) else None, key)


def _qdot_bwd(r, res, dy):
  x, w, wq, key = res
  k_dgrad, k_wgrad = _grad_keys(r, key)
  x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
  dyq = _operand(dy2, r.grad, axis=-1, key=k_dgrad)
  if wq is None:
    wq = _operand(w, r.weight, axis=-1, two_d=r.weight_2d)
  dx = _dot(dyq, wq.T).reshape(x.shape)
  if r.rht:
    x2, dy2 = random_hadamard_transform(x2, 0), random_hadamard_transform(dy2, 0)
  xq = _operand(x2, r.act, axis=0)
  dyq = _operand(dy2, r.grad, axis=0, key=k_wgrad)
  dw = _dot(xq.T, dyq)
  return dx.astype(x.dtype), dw.astype(w.dtype), None


_qdot.defvjp(_qdot_fwd, _qdot_bwd)


def qragged_dot(x, w, group_sizes, recipe: str = "bf16", *, key=None, grad_fmt=None,
                stochastic_rounding=None, rht=None, forward_sr=None, impl: str = "ragged"):
  """x [m, k], w [g, k, n], group_sizes [g] -> [m, n], as jax.lax.ragged_dot.

  Rows of group i multiply w[i]; rows past sum(group_sizes) give zeros.
  Quantised as a loop of `qdot` over the groups would be: each group of
  rows and each expert's weight is its own tensor (own tensor scale), and
  wgrad blocks along the tokens start afresh at each group. Options as in
  `qdot`. impl: how the three grouped products of the quantised operands run
  (`moe.impl` resolved): "ragged" with jax.lax.ragged_dot(_general), "blocked"
  as batched matmuls over blocks of rows (`moe.blocked_dot`; XLA:CPU's
  ragged_dot multiplies every row by every group's weight).
  """
  if impl not in ("ragged", "blocked"):
    raise ValueError(f"impl = {impl!r} is invalid: expected 'ragged' or 'blocked'")
  r = _resolve(recipe, key, grad_fmt, stochastic_rounding, rht, forward_sr)
  return _qragged_dot(r, impl, x, w, group_sizes, key)


def _row_groups(group_sizes, m):
  """[m] group of each row; len(group_sizes) for rows past the last group."""
  return jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side="right")


def _group_amax(x, gid, g):
  """x [m, k] -> [m, 1] max|x| over the rows of each row's group."""
  row = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=1)
  return jax.ops.segment_max(row, gid, num_segments=g + 1)[gid][:, None]


def _ragged_operand(x, fmt, gid, g, key=None, **kw):
  """x [m, ...]: each group of rows is its own tensor."""
  amax = None if fmt is None else _group_amax(x, gid, g)
  return _operand(x, fmt, key=key, amax=amax, **kw)


def _expert_operand(w, fmt, **kw):
  """w [g, k, n]: each expert's weight is its own tensor."""
  amax = None
  if fmt is not None:
    amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=(1, 2), keepdims=True)
  return _operand(w, fmt, amax=amax, **kw)


def _align_groups(group_sizes, m, b):
  """Scatter plan that starts every group at a multiple of b rows.

  Returns (dest [m] row indices into the aligned layout, rows past the last
  group sent out of range, aligned group sizes [g], aligned row count).
  """
  g = group_sizes.shape[0]
  aligned = -(-group_sizes // b) * b
  start = jnp.cumsum(group_sizes) - group_sizes
  start_aligned = jnp.cumsum(aligned) - aligned
  m_aligned = -(-(m + g * (b - 1)) // b) * b
  gid = _row_groups(group_sizes, m)
  valid = gid < g
  gid = jnp.minimum(gid, g - 1)
  dest = jnp.where(valid, jnp.arange(m) - start[gid] + start_aligned[gid], m_aligned)
  return dest, aligned, m_aligned


def _block(fmt):
  """Values per block of fmt along an axis; 1 for per-tensor and unquantised."""
  return 1 if fmt is None or FORMATS[fmt].block is None else FORMATS[fmt].block


def _grouped(impl, x, w, group_sizes):
  """x [m, k] times w [g, k, n] by row group, in float32."""
  if impl == "blocked":
    from nemotron_jax.layers.moe import blocked_dot
    return blocked_dot(x, w, group_sizes, precision=jax.lax.Precision.HIGHEST,
                       preferred_element_type=jnp.float32)
  return jax.lax.ragged_dot(x, w, group_sizes, precision="highest",
                            preferred_element_type=jnp.float32)


# Rows per block of the blocked weight gradient's batched products (at least b).
WGRAD_ROWS = 128


def _grouped_wgrad(impl, x, dy, aligned, b):
  """[g, k, n]: x [m, k]^T dy [m, n] over each group's rows, with every group starting at a
  multiple of b rows (`_align_groups`, rows past the groups zero)."""
  g, (m, k), n = aligned.shape[0], x.shape, dy.shape[1]
  if impl == "ragged":
    dims = jax.lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(([0], [0]), ([], [])), lhs_ragged_dimensions=[0],
      rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(x, dy, aligned, dims, precision="highest",
                                      preferred_element_type=jnp.float32)
  # Rows move to groups that start on a grid of WGRAD_ROWS (a multiple of b), so that blocks
  # of that many rows lie in one group each; their products are summed by group (rows
  # past the groups are block group g, dropped), a chunk of blocks at a time.
  from nemotron_jax.layers.moe import GATHER_BYTES
  rows = b * -(-WGRAD_ROWS // b)
  if rows != b:
    dest, aligned, m = _align_groups(aligned, m, rows)
    move = lambda v: jnp.zeros((m, v.shape[1]), v.dtype).at[dest].set(v, mode="drop")
    x, dy, b = move(x), move(dy), rows
  blocks = m // b
  group = jnp.searchsorted(jnp.cumsum(aligned), jnp.arange(blocks) * b, side="right")
  chunk = max(1, min(blocks, GATHER_BYTES // (k * n * 4)))
  steps = -(-blocks // chunk)
  pad = steps * chunk - blocks
  xs = jnp.pad(x.reshape(blocks, b, k), ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, b, k)
  dys = jnp.pad(dy.reshape(blocks, b, n), ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, b, n)
  gs = jnp.pad(group, (0, pad), constant_values=g).reshape(steps, chunk)

  def step(acc, inputs):
    xc, dyc, gc = inputs
    per_block = jnp.einsum("cbk,cbn->ckn", xc, dyc, precision=jax.lax.Precision.HIGHEST,
                           preferred_element_type=jnp.float32)
    return acc + jax.ops.segment_sum(per_block, gc, num_segments=g + 1), None

  return jax.lax.scan(step, jnp.zeros((g + 1, k, n), jnp.float32), (xs, dys, gs))[0][:g]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _qragged_dot(r, impl, x, w, group_sizes, key):
  return _qragged_dot_fwd(r, impl, x, w, group_sizes, key)[0]


def _qragged_dot_fwd(r, impl, x, w, group_sizes, key):
  g, m = w.shape[0], x.shape[0]
  gid = _row_groups(group_sizes, m)
  k_x, k_w = _forward_keys(r, key)
  xq = _ragged_operand(x, r.act, gid, g, key=k_x, axis=-1)
  wq = _expert_operand(w, r.weight, key=k_w, axis=1, two_d=r.weight_2d)
  y = _grouped(impl, xq, wq, group_sizes)
  return y.astype(x.dtype), (x, w, wq if _weight_reused(r) else None, group_sizes, key)


def _qragged_dot_bwd(r, impl, res, dy):
  x, w, wq, group_sizes, key = res
  g, m = w.shape[0], x.shape[0]
  k_dgrad, k_wgrad = _grad_keys(r, key)
  gid = _row_groups(group_sizes, m)
  dyq = _ragged_operand(dy, r.grad, gid, g, key=k_dgrad, axis=-1)
  if wq is None:
    wq = _expert_operand(w, r.weight, axis=2, two_d=r.weight_2d)
  dx = _grouped(impl, dyq, jnp.swapaxes(wq, 1, 2), group_sizes)
  # wgrad blocks run along the tokens, so each group starts a fresh block,
  # zero-padded at its end like a lone qdot's.
  b = math.lcm(_block(r.act), _block(r.grad), RHT_SIZE if r.rht else 1)
  dest, aligned, m_aligned = _align_groups(group_sizes, m, b)
  scatter = lambda v: jnp.zeros((m_aligned, v.shape[1]), v.dtype).at[dest].set(v, mode="drop")
  xa, dya = scatter(x), scatter(dy)
  if r.rht:
    xa, dya = random_hadamard_transform(xa, 0), random_hadamard_transform(dya, 0)
  gid_a = _row_groups(aligned, m_aligned)
  xq = _ragged_operand(xa, r.act, gid_a, g, axis=0)
  dyq = _ragged_operand(dya, r.grad, gid_a, g, key=k_wgrad, axis=0)
  dw = _grouped_wgrad(impl, xq, dyq, aligned, b)
  return dx.astype(x.dtype), dw.astype(w.dtype), None, None


_qragged_dot.defvjp(_qragged_dot_fwd, _qragged_dot_bwd)
