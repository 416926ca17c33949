"""The Mamba-2 mixer.

in_proj: d -> [z | x | B | C | dt] (kept as five kernels so tensor parallelism
can split the head-sized ones), a causal depthwise conv1d + SiLU over x, B, C,
the SSD scan, the gated grouped RMSNorm norm(y * silu(z)), and out_proj.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn

from nemotron_jax.layers import basic, ssd as ssd_lib


class MambaState(NamedTuple):
  """Recurrent state of one Mamba layer: constant size whatever the context."""
  conv: jax.Array  # [b, conv_kernel - 1, conv channels]: the last raw conv inputs
  ssm: jax.Array  # [b, heads, head_dim, d_state], float32


def causal_conv1d(x, weight, bias, *, initial_state=None, segment_ids=None):
  """Depthwise causal conv. x [b l c], weight [k c], bias [c], initial_state [b k-1 c].

  Returns (out [b l c], final_state [b k-1 c]). Inputs from another segment
  than the output position contribute nothing; the initial state belongs to
  the first token's segment, the final state to the last token's (inputs of
  earlier segments in it are zeroed, as at the start of a sequence).
  """
  k = weight.shape[0]
  b, l, c = x.shape
  if initial_state is None:
    initial_state = jnp.zeros((b, k - 1, c), x.dtype)
  xp = jnp.concatenate([initial_state.astype(x.dtype), x], axis=1)
  if segment_ids is not None:
    segp = jnp.concatenate([jnp.repeat(segment_ids[:, :1], k - 1, axis=1), segment_ids], axis=1)
  out = jnp.zeros((b, l, c), jnp.float32)
  for i in range(k):
    tap = xp[:, i:i + l].astype(jnp.float32) * weight[i].astype(jnp.float32)
    if segment_ids is not None:
      tap = tap * (segp[:, i:i + l] == segment_ids)[..., None]
    out = out + tap
  out = out + bias.astype(jnp.float32)
  final = xp[:, l:]
  if segment_ids is not None:
    final = final * (segp[:, l:] == segment_ids[:, -1:])[..., None].astype(final.dtype)
  return out.astype(x.dtype), final


def ssd_decode(x, dt, A, B, C, D, *, initial_state):
  """The recurrence one token at a time (`ssd_decode_step`), for a few new tokens.

  x [b T h p], dt [b T h], B, C [b T g n]. Returns (y [b T h p], the state
  after each token [b T h p n]), so a caller can keep any prefix.
  """
  def step(state, inp):
    x_t, dt_t, B_t, C_t = inp
    y, state = ssd_lib.ssd_decode_step(state, x_t, dt_t, A, B_t, C_t, D)
    return state, (y, state)

  inputs = [jnp.moveaxis(t, 1, 0) for t in (x, dt, B, C)]
  # Unrolled: T is one token, or a few when verifying drafts, and this runs inside the
  # generation loop, where a nested loop costs more than the few steps themselves.
  _, (y, states) = jax.lax.scan(step, initial_state.astype(jnp.float32), inputs, unroll=True)
  return jnp.moveaxis(y, 0, 1), jnp.moveaxis(states, 0, 1)


def dt_bias_init(dt_min: float, dt_max: float, floor: float):
  """dt_bias = softplus^-1(dt), dt log-uniform in [dt_min, dt_max] and at least `floor`."""
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, jnp.float32)
    dt = jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = jnp.maximum(dt, floor)
    return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)
  return init


def a_log_init(lo: float, hi: float):
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)).astype(dtype)
  return init


class Mamba2(nn.Module):
  """Mamba-2 mixer. __call__(x [b l d]) -> (y [b l d], MambaState).

  By default the chunked SSD runs over x from `state` (zeros if None) and the
  final state is returned. With decode=True, x holds a few new tokens that
  run one at a time from `state` through `ssd_decode_step`, and the returned
  MambaState holds the state after each token: conv [b l k-1 c], ssm [b l h p n].
  """
  cfg: Any  # the model section of the config
  out_std: float
  linear: Any = basic.Linear

  @nn.compact
  def __call__(self, x, *, segment_ids=None, state: MambaState | None = None, decode: bool = False):
    m, a = self.cfg, self.cfg.mamba
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    h, p, g, n = a.num_heads, a.head_dim, a.n_groups, a.d_state
    d_inner = h * p
    b, l, _ = x.shape

    def proj(name, features, axis):
      return self.linear(features, ("embed", axis), m.init_std, dtype, pdtype, name=name)(x)

    z = proj("in_proj_z", d_inner, "ssm_inner")
    xs = proj("in_proj_x", d_inner, "ssm_inner")
    Bs = proj("in_proj_B", g * n, "ssm_state")
    Cs = proj("in_proj_C", g * n, "ssm_state")
    dt = proj("in_proj_dt", h, "ssm_heads")

    k = a.conv_kernel
    conv_init = basic.uniform_init(1.0 / math.sqrt(k))

    def conv(name, u, axis, init_state):
      w = basic.param_with_axes(self, f"conv_{name}_weight", conv_init, (k, u.shape[-1]), pdtype,
                                ("conv", axis))
      bias = basic.param_with_axes(self, f"conv_{name}_bias", conv_init, (u.shape[-1],), pdtype,
                                   (axis,))
      out, final = causal_conv1d(u, w, bias, initial_state=init_state, segment_ids=segment_ids)
      return jax.nn.silu(out), final

    if decode and state is None:
      raise ValueError("Mamba2 decode=True needs the state left by the previous tokens")
    raw = jnp.concatenate([xs, Bs, Cs], axis=-1) if decode else None  # the conv inputs
    conv_in = None if state is None else jnp.split(
        state.conv, [d_inner, d_inner + g * n], axis=-1)
    xs, cx = conv("x", xs, "ssm_inner", None if conv_in is None else conv_in[0])
    Bs, cB = conv("B", Bs, "ssm_state", None if conv_in is None else conv_in[1])
    Cs, cC = conv("C", Cs, "ssm_state", None if conv_in is None else conv_in[2])

    dt_bias = basic.param_with_axes(self, "dt_bias", dt_bias_init(a.dt_min, a.dt_max, a.dt_init_floor),
                                    (h,), jnp.float32, ("ssm_heads",))
    A_log = basic.param_with_axes(self, "A_log", a_log_init(*a.A_init_range), (h,), jnp.float32,
                                  ("ssm_heads",))
    D = basic.param_with_axes(self, "D", nn.initializers.ones, (h,), jnp.float32, ("ssm_heads",))
    dt = jax.nn.softplus(dt.astype(jnp.float32) + dt_bias)
    dt = jnp.clip(dt, a.dt_limit[0], a.dt_limit[1])
    A = -jnp.exp(A_log.astype(jnp.float32))

    xs = nn.with_logical_constraint(xs.reshape(b, l, h, p), ("batch", "length", "ssm_heads", None))
    dt = nn.with_logical_constraint(dt, ("batch", "length", "ssm_heads"))
    heads = (xs, dt, A, Bs.reshape(b, l, g, n), Cs.reshape(b, l, g, n), D)
    if decode:
      y, ssm_state = ssd_decode(*heads, initial_state=state.ssm)
      # The conv state after token t: the last k - 1 raw inputs up to t.
      window = jnp.concatenate([state.conv.astype(raw.dtype), raw], axis=1)
      conv_state = jnp.stack([window[:, t + 1:t + k] for t in range(l)], axis=1)
    else:
      y, ssm_state = ssd_lib.ssd(*heads, impl=a.ssd_impl, chunk_size=a.chunk_size,
                                 initial_state=None if state is None else state.ssm,
                                 segment_ids=segment_ids, kernel=a.kernel.to_dict())
      conv_state = jnp.concatenate([cx, cB, cC], axis=-1)
    y = basic.GatedRMSNorm(d_inner // g, m.norm_eps, pdtype, name="norm")(
        y.reshape(b, l, d_inner), z.astype(jnp.float32))
    out = self.linear(m.d_model, ("ssm_inner", "embed"), self.out_std, dtype, pdtype,
                      name="out_proj")(y.astype(dtype))
    return out, MambaState(conv_state, ssm_state)
