"""Building blocks shared by every mixer: the linear layer, RMSNorms, initialisers.

Every parameter carries logical axis names (MaxText style); `sharding.py`
maps them to mesh axes in one table. The names used here:
  embed, vocab, mlp, heads (query heads x head_dim), kv (kv heads x head_dim),
  ssm_inner (Mamba heads x head_dim), ssm_heads, ssm_state (groups x d_state),
  conv, exp (experts), latent, expert_mlp, norm; activations add batch, length,
  act_embed, kv_heads and head_dim.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

Dtype = Any


def dtype_of(name: str) -> Dtype:
  return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def param_with_axes(module: nn.Module, name: str, init: Callable, shape, dtype, axes):
  """A parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


def uniform_init(bound: float):
  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


@jax.custom_vjp
def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
  """x [..., k] @ w [k, n] accumulated in float32; the gradient keeps its operands materialised.

  The weight gradient contracts over all tokens, so XLA transposes one
  operand for it. Left to itself it fuses the operand's elementwise producers
  (gated-norm SiLU, conv-tap sums) into that transposing copy, where they run
  many times slower than on their own (seen in XLA:CPU profiles of the train
  step). An optimization barrier on the activation and the output gradient
  makes the backward pass read stored buffers instead.
  The backward products run in x's dtype, as the forward does: callers cast
  the output to that dtype, so its gradient is exact there.
  """
  return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _matmul_fwd(x, w):
  return matmul(x, w), (x, w)


def _matmul_bwd(res, g):
  x, w = res
  g, x = jax.lax.optimization_barrier((g.astype(x.dtype), x))
  dx = jnp.dot(g, w.T, preferred_element_type=jnp.float32).astype(x.dtype)
  dw = jnp.dot(x.reshape(-1, x.shape[-1]).T, g.reshape(-1, g.shape[-1]),
               preferred_element_type=jnp.float32)
  return dx, dw.astype(w.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
  """y = x @ kernel, kernel [in, out], no bias.

  `dot` computes the product; it is the one place where a low-precision recipe
  replaces the plain matmul.
  """
  features: int
  axes: tuple[str | None, str | None]
  init_std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  dot: Callable | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = param_with_axes(self, "kernel", nn.initializers.normal(self.init_std),
                             (x.shape[-1], self.features), self.param_dtype, self.axes)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    if self.dot is not None:
      return self.dot(self, x, kernel)
    return matmul(x, kernel).astype(self.dtype)


class RMSNorm(nn.Module):
  """RMSNorm computed in float32; the result is cast back to the input dtype."""
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = param_with_axes(self, "weight", nn.initializers.ones, (x.shape[-1],),
                             self.param_dtype, ("norm",))
    h = x.astype(jnp.float32)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (weight.astype(jnp.float32) * h).astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """norm(y * silu(z)) over groups of `group_size` channels (the gate comes before the norm)."""
  group_size: int
  eps: float = 1e-5
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, y: jax.Array, z: jax.Array) -> jax.Array:
    d = y.shape[-1]
    weight = param_with_axes(self, "weight", nn.initializers.ones, (d,), self.param_dtype,
                             ("ssm_inner",))
    h = y.astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    h = h.reshape(*h.shape[:-1], d // self.group_size, self.group_size)
    h = h * jax.lax.rsqrt(jnp.mean(h * h, axis=-1, keepdims=True) + self.eps)
    return (weight.astype(jnp.float32) * h.reshape(y.shape)).astype(y.dtype)
