"""The hybrid model: embedding, one pre-norm residual block per pattern character,
final RMSNorm, untied LM head.

Pattern characters: M Mamba-2, * attention, - MLP, E MoE (LatentMoE when
moe.latent_size is set). Every block is x + mixer(RMSNorm(x)).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from nemotron_jax import config as config_lib
from nemotron_jax.layers import basic
from nemotron_jax.layers.attention import Attention
from nemotron_jax.layers.mamba import Mamba2
from nemotron_jax.layers.mlp import MLP
from nemotron_jax.layers.moe import MoE
from nemotron_jax.quant import policy


def output_std(cfg) -> float:
  """Init std of projections that write to the residual stream: std / sqrt(2 L).

  The scaled init of Megatron-LM (`scaled_init_method_normal`).
  """
  return cfg.init_std / math.sqrt(2 * len(cfg.pattern))


class Block(nn.Module):
  """x + mixer(RMSNorm(x)) for one pattern character; `layer` is its index (None: MTP)."""
  cfg: Any
  kind: str
  layer: int | None = None

  @nn.compact
  def __call__(self, x, segment_ids=None):
    m = self.cfg
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    h = basic.RMSNorm(m.norm_eps, basic.dtype_of(m.param_dtype), name="norm")(x)
    out_std = output_std(m)
    linear = functools.partial(basic.Linear, dot=policy.linear_dot(m, self.layer, self.kind))
    if self.kind == "M":
      y, _ = Mamba2(m, out_std, linear, name="mixer")(h, segment_ids=segment_ids)
    elif self.kind == "*":
      y = Attention(m, out_std, linear, name="mixer")(h, segment_ids=segment_ids)
    elif self.kind == "-":
      y = MLP(m, m.mlp.d_ff, out_std, linear, name="mixer")(h)
    else:
      y = MoE(m, out_std, linear, policy.expert_gmm(m, self.layer), name="mixer")(h)
    return x + y.astype(x.dtype)


class NemotronH(nn.Module):
  """tokens [b l] int32 (and optional segment ids [b l]) -> logits [b l vocab] float32."""
  cfg: Any  # FrozenConfigDict of the model section

  @nn.compact
  def __call__(self, tokens, segment_ids=None):
    m = self.cfg
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    embedding = basic.param_with_axes(self, "embedding", nn.initializers.normal(m.init_std),
                                      (m.vocab_size, m.d_model), pdtype, ("vocab", "embed"))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    block = nn.remat(Block) if m.remat else Block
    for i, kind in enumerate(m.pattern):
      x = block(m, kind, i, name=f"layers_{i}")(x, segment_ids)
    x = basic.RMSNorm(m.norm_eps, pdtype, name="norm_f")(x)
    logits = basic.Linear(m.vocab_size, ("embed", "vocab"), m.init_std, dtype, pdtype,
                          name="lm_head")(x)
    return logits.astype(jnp.float32)


def build_model(config: ml_collections.ConfigDict) -> NemotronH:
  """Validates the config (full or model section) and returns the Linen module."""
  m = config_lib.model_section(config)
  config_lib.validate_model(m)
  return NemotronH(ml_collections.FrozenConfigDict(m))


def init_variables(model: NemotronH, rng: jax.Array, batch: int = 1, length: int = 8):
  """Initial variables with logical-axis boxes removed: {"params", "moe_state"?}."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  variables = nn.meta.unbox(model.init(rng, tokens))
  return {k: v for k, v in variables.items() if k != "moe_stats"}
