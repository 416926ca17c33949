"""The hybrid model: embedding, one pre-norm residual block per pattern character,
final RMSNorm, untied LM head, and an optional multi-token prediction (MTP) head.

Pattern characters: M Mamba-2, * attention, - MLP, E MoE (LatentMoE when
moe.latent_size is set). Every block is x + mixer(RMSNorm(x)).

MTP (model.mtp, NEMOTRON.md section 2): depth k at position t reads the
previous depth's output h (depth 1: the decoder output after norm_f) and the
embedding of token t + k: eh_proj([enorm(embed); hnorm(h)]) -> the blocks of
`mtp.pattern` -> final_layernorm -> the shared LM head, predicting token
t + k + 1. One physical block serves every depth when `mtp.share_weights`.

Caches for generation: `forward` without caches runs the whole sequence and
returns each layer's cache (attention keys/values, the final Mamba state);
with caches it appends a few tokens per row at slots `index` (see
Attention and Mamba2 for the per-layer contracts).
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
  """x + mixer(RMSNorm(x)) for one pattern character; `layer` is its index (None: MTP).

  __call__(x [b l d], segment_ids, cache, start, index) -> (x, the mixer's
  cache: KVCache, MambaState, or None for MLP and MoE). `index` (the first
  slot of x per row) switches attention and Mamba to cached decoding.
  """
  cfg: Any
  kind: str
  layer: int | None = None

  @nn.compact
  def __call__(self, x, segment_ids=None, cache=None, start=None, index=None):
    m = self.cfg
    x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
    h = basic.RMSNorm(m.norm_eps, basic.dtype_of(m.param_dtype), name="norm")(x)
    out_std = output_std(m)
    linear = functools.partial(basic.Linear, dot=policy.linear_dot(m, self.layer, self.kind))
    if self.kind == "M":
      y, cache = Mamba2(m, out_std, linear, name="mixer")(h, segment_ids=segment_ids, state=cache,
                                                           decode=index is not None)
    elif self.kind == "*":
      y, cache = Attention(m, out_std, linear, name="mixer")(h, segment_ids=segment_ids,
                                                              cache=cache, start=start, index=index)
    elif self.kind == "-":
      y = MLP(m, m.mlp.d_ff, out_std, linear, name="mixer")(h)
    else:
      y = MoE(m, out_std, linear, policy.expert_gmm(m, self.layer), name="mixer")(h)
    return x + y.astype(x.dtype), cache


def run_blocks(layers, x, segment_ids, caches, start, index):
  """Applies blocks in order; returns (x, tuple of their caches)."""
  out = []
  for i, layer in enumerate(layers):
    x, cache = layer(x, segment_ids, None if caches is None else caches[i], start, index)
    out.append(cache)
  return x, tuple(out)


class MTPBlock(nn.Module):
  """One physical MTP block. (h [b l d], embedded next tokens [b l d]) -> (h [b l d], caches)."""
  cfg: Any

  def setup(self):
    m = self.cfg
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    self.enorm = basic.RMSNorm(m.norm_eps, pdtype)
    self.hnorm = basic.RMSNorm(m.norm_eps, pdtype)
    # Its input is [embedding; hidden], so only the output axis is the model width.
    self.eh_proj = basic.Linear(m.d_model, (None, "embed"), m.init_std, dtype, pdtype)
    block = nn.remat(Block) if m.remat else Block
    self.layers = [block(m, kind) for kind in m.mtp.pattern]
    self.final_layernorm = basic.RMSNorm(m.norm_eps, pdtype)

  def __call__(self, h, emb, segment_ids=None, caches=None, start=None, index=None):
    x = self.eh_proj(jnp.concatenate([self.enorm(emb), self.hnorm(h)], -1))
    x, caches = run_blocks(self.layers, x, segment_ids, caches, start, index)
    return self.final_layernorm(x), caches


class NemotronH(nn.Module):
  """tokens [b l] int32 (and optional segment ids [b l]) -> logits [b l vocab] float32."""
  cfg: Any  # FrozenConfigDict of the model section

  def setup(self):
    m = self.cfg
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    self.embedding = basic.param_with_axes(self, "embedding", nn.initializers.normal(m.init_std),
                                           (m.vocab_size, m.d_model), pdtype, ("vocab", "embed"))
    block = nn.remat(Block) if m.remat else Block
    self.layers = [block(m, kind, i) for i, kind in enumerate(m.pattern)]
    self.norm_f = basic.RMSNorm(m.norm_eps, pdtype)
    self.lm_head = basic.Linear(m.vocab_size, ("embed", "vocab"), m.init_std, dtype, pdtype)
    blocks = 1 if m.mtp.share_weights else m.mtp.num_depths
    self.mtp = [MTPBlock(m) for _ in range(blocks if m.mtp.num_depths else 0)]

  def __call__(self, tokens, segment_ids=None, *, mtp: bool = False):
    """With mtp=True: (logits, [MTP logits of depth 1, 2, ...]); see `mtp_hidden`."""
    # init runs only __call__, so it visits the MTP head even when not asked for.
    h, extra = self.hidden_states(tokens, segment_ids,
                                  mtp=mtp or bool(self.mtp and self.is_initializing()))
    logits = self.head(h)
    return (logits, [self.head(e) for e in extra]) if mtp else logits

  def hidden_states(self, tokens, segment_ids=None, *, mtp: bool = False):
    """(hidden [b l d] after norm_f, [each MTP depth's hidden after its final norm] if mtp):
    what `head` turns into logits. The training loss applies the head itself, in chunks."""
    h, _ = self.forward(tokens, segment_ids)
    return h, (self.mtp_hidden(h, tokens, segment_ids) if mtp else [])

  def embed(self, tokens):
    return jnp.take(self.embedding, tokens, axis=0).astype(basic.dtype_of(self.cfg.compute_dtype))

  def head(self, h):
    """Hidden states after a final norm [.. d] -> logits [.. vocab] float32."""
    logits = self.lm_head(h).astype(jnp.float32)
    if logits.ndim == 3:
      logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
    return logits

  def forward(self, tokens, segment_ids=None, caches=None, start=None, index=None):
    """-> (hidden after norm_f [b l d], per-layer caches). See the module docstring."""
    x, caches = run_blocks(self.layers, self.embed(tokens), segment_ids, caches, start, index)
    return self.norm_f(x), caches

  def mtp_depth(self, depth: int, h, next_tokens, segment_ids=None, caches=None, start=None,
                index=None):
    """MTP depth `depth` (from 1): h [b l d] (the previous depth's output) and next_tokens [b l]
    (token t + depth at position t) -> (hidden [b l d], caches); logits come from `head`."""
    block = self.mtp[0 if self.cfg.mtp.share_weights else depth - 1]
    return block(h, self.embed(next_tokens), segment_ids, caches, start, index)

  def mtp_hidden(self, h, tokens, segment_ids=None):
    """Training: the hidden states [b l d] of each depth k, whose logits predict token
    t + k + 1 at position t.

    Past the end of the row the next tokens are unknown (zeros); those
    positions, and those whose next tokens lie in another document, must be
    masked by the loss.
    """
    out = []
    for k in range(1, self.cfg.mtp.num_depths + 1):
      shifted = jnp.pad(tokens[:, k:], ((0, 0), (0, k)))
      h, _ = self.mtp_depth(k, h, shifted, segment_ids)
      out.append(h)
    return out


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
