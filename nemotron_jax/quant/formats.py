"""Low-precision number formats, emulated exactly in float32.

A quantised tensor is `elements * block_scale * tensor_scale`: elements lie
on a small float grid (E4M3, E5M2 or E2M1), a block scale is shared by a
block of neighbouring values, and a per-tensor scale sits on top.

| fmt       | elements | blocks                        | block scale           | tensor scale     |
|-----------|----------|-------------------------------|-----------------------|------------------|
| fp8_e4m3  | E4M3     | -                             | -                     | amax / 448       |
| fp8_e5m2  | E5M2     | -                             | -                     | amax / 57344     |
| fp8_block | E4M3     | 1x128 along axis; 128x128 2-D | fp32 block amax / 448 | -                |
| mxfp8     | E4M3     | 1x32 along axis               | E8M0, OCP MX rule     | -                |
| nvfp4     | E2M1     | 1x16 along axis; 16x16 2-D    | E4M3                  | amax / (448 * 6) |

Missing scales are 1. Elements round to nearest even, or stochastically
when a PRNG key is given; scales always round to nearest even.
"""
import dataclasses
import itertools
import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Element:
  """A sign-magnitude element format; casts saturate at `max`."""
  dtype: type
  max: float
  mantissa_bits: int
  min_exp: int  # exponent of the smallest normal; subnormals share its ulp


E4M3 = Element(jnp.float8_e4m3fn, 448.0, 3, -6)
E5M2 = Element(jnp.float8_e5m2, 57344.0, 2, -14)
E2M1 = Element(jnp.float4_e2m1fn, 6.0, 1, 0)


@dataclasses.dataclass(frozen=True)
class Format:
  """An element format plus the blocking and scaling rule around it."""
  element: Element
  block: int | None  # values per block, or the square's edge with two_d; None: per tensor
  scale: str  # how block and tensor scales are chosen: "tensor", "fp32", "e8m0" or "nvfp4"
  two_d: bool  # whether square blocks over the last two dims are defined


FORMATS = {
  "fp8_e4m3": Format(E4M3, None, "tensor", False),
  "fp8_e5m2": Format(E5M2, None, "tensor", False),
  "fp8_block": Format(E4M3, 128, "fp32", True),
  "mxfp8": Format(E4M3, 32, "e8m0", False),
  "nvfp4": Format(E2M1, 16, "nvfp4", True),
}

# OCP MX: shared exponent = floor(log2(block amax)) - emax of the element,
# 8 for E4M3 (448 = 1.75 * 2^8).
_MX_EMAX = 8
# E8M0 reaches 2^-127, but that is an f32 subnormal and XLA flushes it to zero.
_MX_MIN_EXP = -126
_NVFP4_TENSOR_MAX = 448.0 * 6.0


class Quantized(NamedTuple):
  """x ~ elements * block_scale * tensor_scale, all float32 of x's shape."""
  elements: jax.Array  # on the element grid
  block_scale: jax.Array  # each block's scale, repeated over the block
  tensor_scale: jax.Array


def get_format(fmt: str, two_d: bool = False) -> Format:
  """The Format named `fmt`, checked to support `two_d`."""
  if fmt not in FORMATS:
    raise ValueError(f"fmt={fmt!r} is not a format; valid: {sorted(FORMATS)}")
  f = FORMATS[fmt]
  if two_d and not f.two_d:
    valid = sorted(k for k, v in FORMATS.items() if v.two_d)
    raise ValueError(f"two_d=True is not defined for fmt={fmt!r}; valid: {valid}")
  return f


def _mix32(x):
  """A 32-bit integer hash with full avalanche (C. Wellons' "lowbias32")."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7FEB352D)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846CA68B)
  return x ^ (x >> 16)


def uniform(key, shape):
  """float32 uniforms in [0, 1) from counter-based bits: each element's flat index hashed
  with every word of the PRNG key. Elementwise, so it fuses into the rounding around it;
  on CPU about 15x cheaper than `jax.random.uniform`'s threefry, which is most of what
  stochastic rounding costs there."""
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    key = jax.random.key_data(key)
  index = jnp.zeros(shape, jnp.uint32)
  for axis, stride in enumerate(reversed([1, *itertools.accumulate(reversed(shape[1:]),
                                                                  operator.mul)])):
    index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
  bits = index
  for word in key.astype(jnp.uint32).reshape(-1):
    # Words are hashed first (scalar work), so that no key leaves an index fixed.
    bits = _mix32(bits ^ _mix32(word + jnp.uint32(0x9E3779B9)))
  return (bits >> 8).astype(jnp.float32) * jnp.float32(2.0 ** -24)


def round_elements(y, element: Element, key=None):
  """Rounds float32 y onto the element grid, saturating at +-element.max.

  Round-to-nearest-even without `key`; with it, stochastic rounding to one
  of the two grid neighbours with probability linear in the distance, so
  E[result] = y for |y| <= max.
  """
  y = jnp.clip(y, -element.max, element.max)
  if key is None:
    return y.astype(element.dtype).astype(jnp.float32)
  a = jnp.abs(y)
  _, e = jnp.frexp(a)  # a = m * 2^e with m in [0.5, 1), so floor(log2 a) = e - 1
  ulp = jnp.ldexp(jnp.float32(1), jnp.maximum(e - 1, element.min_exp) - element.mantissa_bits)
  lo = jnp.floor(a / ulp) * ulp
  u = uniform(key, y.shape)
  # lo + ulp <= max whenever a > lo, because max lies on the grid.
  return jnp.sign(y) * jnp.where(u * ulp < a - lo, lo + ulp, lo)


def _div(a, b):
  """a / b correctly rounded.

  XLA rewrites division by a constant or a broadcast into multiplication by
  the reciprocal, off by an ulp, which moves ties and values at the grid's
  max; the barrier hides the broadcast divisor from that rewrite (the
  dividend still fuses with what computes it).
  """
  a, b = jnp.asarray(a), jnp.asarray(b)
  return a / jax.lax.optimization_barrier(jnp.broadcast_to(b, jnp.broadcast_shapes(a.shape,
                                                                                    b.shape)))


def _to_blocks(x, b, axis, two_d):
  """[..., n] -> [..., nb, b] along `axis` (moved last), or [..., r, c] -> [..., rb, b, cb, b]."""
  if two_d:
    pad = [(0, 0)] * (x.ndim - 2) + [(0, -x.shape[-2] % b), (0, -x.shape[-1] % b)]
    x = jnp.pad(x, pad)
    *lead, r, c = x.shape
    return x.reshape(*lead, r // b, b, c // b, b)
  x = jnp.moveaxis(x, axis, -1)
  x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, -x.shape[-1] % b)])
  return x.reshape(*x.shape[:-1], -1, b)


def _from_blocks(xb, shape, axis, two_d):
  """Inverse of _to_blocks: crops the padding, restores `shape`."""
  if two_d:
    *lead, rb, b, cb, _ = xb.shape
    return xb.reshape(*lead, rb * b, cb * b)[..., :shape[-2], :shape[-1]]
  x = xb.reshape(*xb.shape[:-2], -1)[..., :shape[axis]]
  return jnp.moveaxis(x, -1, axis)


def _encode(x, fmt, axis, two_d, amax):
  """Scaled values before element rounding, and the scales.

  Returns (x, y, block_scale, tensor_scale): x and y in block layout (see
  _to_blocks), or as given for per-tensor formats; x = y * block_scale *
  tensor_scale before rounding.
  """
  f = get_format(fmt, two_d)
  x = x.astype(jnp.float32)
  amax = jnp.max(jnp.abs(x)) if amax is None else jnp.asarray(amax, jnp.float32)
  one = jnp.ones((), jnp.float32)
  if f.block is None:
    ts = jnp.where(amax > 0, _div(amax, f.element.max), 1.0)
    return x, _div(x, ts), one, ts
  xb = _to_blocks(x, f.block, axis, two_d)
  red = (-3, -1) if two_d else (-1,)
  bamax = jnp.max(jnp.abs(xb), axis=red, keepdims=True)
  if f.scale == "fp32":
    bs = jnp.where(bamax > 0, _div(bamax, f.element.max), 1.0)
    return xb, _div(xb, bs), bs, one
  if f.scale == "e8m0":
    _, e = jnp.frexp(bamax)
    e = jnp.clip(e - 1 - _MX_EMAX, _MX_MIN_EXP, 127)
    e = jnp.where(bamax > 0, e, 0)
    # Dividing by the power of two 2^e is multiplying by 2^-e, exactly (2^-e is normal for
    # e <= 119, the largest a finite float32 block gives), so no barrier is needed.
    return xb, xb * jnp.ldexp(one, -e), jnp.ldexp(one, e), one
  # nvfp4: the tensor amax may vary between blocks (one "tensor" per expert or
  # group), so it is broadcast to x and blocked like x.
  tamax = jnp.max(_to_blocks(jnp.broadcast_to(amax, x.shape), f.block, axis, two_d),
                  axis=red, keepdims=True)
  ts = jnp.where(tamax > 0, _div(tamax, _NVFP4_TENSOR_MAX), 1.0)
  bs = jnp.minimum(_div(_div(bamax, f.element.max), ts), E4M3.max)
  bs = bs.astype(E4M3.dtype).astype(jnp.float32)
  s = bs * ts
  # A block scale that underflows E4M3 flushes its whole block to zero.
  y = jnp.where(s > 0, _div(xb, jnp.where(s > 0, s, 1.0)), 0.0)
  return xb, y, bs, ts


def quantize(x, fmt: str, *, axis: int = -1, two_d: bool = False, key=None, amax=None) -> Quantized:
  """Quantises x to `fmt` (see the module table); returns float32 parts of x's shape.

  axis: the blocked axis (the GEMM's contraction axis). two_d: square blocks
  over the last two dims instead. key: PRNG key for stochastic rounding of
  the elements. amax: the amax behind the tensor scale (fp8_e4m3, fp8_e5m2,
  nvfp4), default max|x|; an array broadcastable to x and constant within
  each block gives one tensor scale per slice (per expert, per token group).
  mxfp8 uses the OCP MX rule: scale 2^(floor(log2(block amax)) - 8), so the
  block's largest value lands in [256, 512); values above 448 saturate.
  All-zero blocks get scale 1 (nvfp4: 0, the E4M3 rounding of 0); finite
  inputs never give NaN.
  """
  _, y, bs, ts = _encode(x, fmt, axis, two_d, amax)
  q = round_elements(y, FORMATS[fmt].element, key)
  if FORMATS[fmt].block is None:
    return Quantized(q, jnp.broadcast_to(bs, x.shape), jnp.broadcast_to(ts, x.shape))
  unblock = lambda v: _from_blocks(jnp.broadcast_to(v, y.shape), x.shape, axis, two_d)
  return Quantized(unblock(q), unblock(bs), unblock(ts))


def quantize_dequantize(x, fmt: str, *, axis: int = -1, two_d: bool = False, key=None, amax=None):
  """x [...] -> x rounded through `fmt`, in x's dtype; arguments as in `quantize`."""
  # The same products as quantize's parts multiplied, formed in block layout so that the
  # scales are never broadcast to x's shape: elements * block_scale is exact; the tensor
  # scale rounds once.
  _, y, bs, ts = _encode(x, fmt, axis, two_d, amax)
  xq = round_elements(y, FORMATS[fmt].element, key) * bs * ts
  if FORMATS[fmt].block is not None:
    xq = _from_blocks(xq, x.shape, axis, two_d)
  return xq.astype(x.dtype)


def quant_stats(x, fmt: str, *, axis: int = -1, two_d: bool = False, amax=None) -> dict:
  """Fractions of x's nonzero values that round to zero ("underflow") or
  that scaling puts beyond the element max, so they clip ("saturation")."""
  xb, y, *_ = _encode(x, fmt, axis, two_d, amax)
  element = FORMATS[fmt].element
  # Block padding is zero, so it never counts.
  nonzero = xb != 0
  n = jnp.maximum(jnp.sum(nonzero), 1)
  under = nonzero & (round_elements(y, element) == 0)
  sat = nonzero & (jnp.abs(y) > element.max)
  return {"underflow": jnp.sum(under) / n, "saturation": jnp.sum(sat) / n}
