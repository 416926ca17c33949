"""The dense MLP: down(relu(up(x))**2), squared ReLU, not gated."""

from __future__ import annotations

from typing import Any

import jax
import flax.linen as nn

from nemotron_jax.layers import basic


def relu2(x):
  return jax.nn.relu(x) ** 2


class MLP(nn.Module):
  """x [.. d] -> [.. d] through a hidden width `d_ff`."""
  cfg: Any
  d_ff: int
  out_std: float
  linear: Any = basic.Linear

  @nn.compact
  def __call__(self, x):
    m = self.cfg
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    h = self.linear(self.d_ff, ("embed", "mlp"), m.init_std, dtype, pdtype, name="up_proj")(x)
    return self.linear(m.d_model, ("mlp", "embed"), self.out_std, dtype, pdtype,
                       name="down_proj")(relu2(h))
