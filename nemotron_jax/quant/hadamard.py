"""The 16x16 Random Hadamard Transform (RHT) of the NVFP4 recipe.

Applied to both inputs of the weight-gradient GEMM along its contraction
axis, it spreads an outlier over 16 values before 1x16 block quantisation;
being orthogonal it leaves the exact product unchanged: (Rx)^T (Ry) = x^T y.
"""
import math

import numpy as np

import jax.numpy as jnp

RHT_SIZE = 16
_SIGN_SEED = 0  # fixed, so every GEMM and every step uses the same transform


def hadamard(n: int = RHT_SIZE) -> np.ndarray:
  """[n, n] Sylvester Hadamard matrix scaled by 1/sqrt(n), so orthogonal; n a power of 2."""
  h = np.ones((1, 1))
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return h / np.sqrt(n)


def rht_matrix() -> np.ndarray:
  """[16, 16] float32 orthogonal matrix diag(signs) @ H, with fixed random signs."""
  signs = np.random.default_rng(_SIGN_SEED).choice([-1.0, 1.0], RHT_SIZE)
  return (signs[:, None] * hadamard(RHT_SIZE)).astype(np.float32)


def random_hadamard_transform(x, axis: int = 0):
  """x [..., n, ...] -> [..., ceil(n/16)*16, ...]: each 16-block along `axis` times rht_matrix().

  The axis is zero-padded to a multiple of 16 and kept padded: the padded
  rows carry energy after the transform, and dropping them would break
  orthogonality. Pad both GEMM operands alike and the product is exact.
  Computed as the signs, four butterfly stages (x1 + x2, x1 - x2 over halves,
  which is Sylvester's H16) and the 1/4 scale, in place along `axis`: no
  transposes, and elementwise, so XLA fuses it with its neighbours.
  """
  axis = axis % x.ndim
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -x.shape[axis] % RHT_SIZE)
  x = jnp.pad(x, pad)
  shape = x.shape
  lead, rest = math.prod(shape[:axis]), math.prod(shape[axis + 1:])
  xb = x.reshape(lead, shape[axis] // RHT_SIZE, RHT_SIZE, rest)
  signs = np.random.default_rng(_SIGN_SEED).choice([-1.0, 1.0], RHT_SIZE)
  xb = xb * jnp.asarray(signs, x.dtype)[:, None]
  half = RHT_SIZE // 2
  while half:
    pairs = xb.reshape(lead, -1, RHT_SIZE // (2 * half), 2, half, rest)
    a, b = pairs[:, :, :, 0], pairs[:, :, :, 1]
    xb = jnp.stack([a + b, a - b], axis=3).reshape(xb.shape)
    half //= 2
  return (xb * jnp.asarray(1 / np.sqrt(RHT_SIZE), x.dtype)).reshape(shape)
