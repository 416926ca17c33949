"""Low-precision number formats, emulated exactly in float32.

A quantised tensor is `elements * block_scale * tensor_scale`: elements lie
on a small float grid (E4M3, E5M2 or E2M1), block scales are shared by a
block of neighbouring values, and an optional per-tensor scale sits on top.

| fmt        | elements | block                       | block scale     | tensor scale     |
|------------|----------|-----------------------------|-----------------|------------------|
| fp8_e4m3   | E4M3     | -                           | -               | amax / 448       |
| fp8_e5m2   | E5M2     | -                           | -               | amax / 57344     |
| fp8_block  | E4M3     | 1x128 along axis, 128x128   | fp32 amax / 448 | -                |
| mxfp8      | E4M3     | 1x32 along axis             | E8M0 (OCP MX)   | -                |
| nvfp4      | E2M1     | 1x16 along axis, 16x16      | E4M3            | amax / (448 * 6) |
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Element:
  """A sign-magnitude float element format with saturating casts."""
  name: str
  dtype: type
  max: float
  mantissa_bits: int
  min_exp: int  # exponent of the smallest normal; subnormals share its ulp


E4M3 = Element("e4m3", jnp.float8_e4m3fn, 448.0, 3, -6)
E5M2 = Element("e5m2", jnp.float8_e5m2, 57344.0, 2, -14)
E2M1 = Element("e2m1", jnp.float4_e2m1fn, 6.0, 1, 0)


@dataclasses.dataclass(frozen=True)
class Format:
  element: Element
  block: int | None  # values per block (edge of the square with two_d); None = per tensor
  scale: str  # "tensor" | "fp32" | "e8m0" | "nvfp4"
  two_d: bool  # whether square blocks over the last two dims are defined


FORMATS = {
  "fp8_e4m3": Format(E4M3, None, "tensor", False),
  "fp8_e5m2": Format(E5M2, None, "tensor", False),
  "fp8_block": Format(E4M3, 128, "fp32", True),
  "mxfp8": Format(E4M3, 32, "e8m0", False),
  "nvfp4": Format(E2M1, 16, "nvfp4", True),
}

# The OCP MX shared exponent is floor(log2(block amax)) - emax of the element;
# 8 for E4M3, whose largest value is 1.75 * 2^8.
_MX_EMAX = 8
# E8M0 goes down to 2^-127, an f32 subnormal that XLA flushes to zero.
_MX_MIN_EXP = -126


class Quantized(dataclasses.dataclass(frozen=True)(type("_Q", (), {}))):
  pass
