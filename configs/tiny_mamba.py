"""Tiny pure Mamba-2 ablation: no attention, no MLP, no MoE.

Six Mamba-2 layers of 10 heads x 32 (d_inner = 2.5 d) with d_state 32 in 2
groups at d = 128, byte vocabulary: the same forward FLOPs per token at
seq_len 256 as `tiny_transformer.py`, `tiny_moe.py` and `tiny_latent_moe.py`
(within 2%; see `python -m nemotron_jax.summary`).
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "MMMMMM"
  m.d_model = 128
  m.vocab_size = 256
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 10, 32, 32, 2
  m.mamba.chunk_size = 64
  c.data.seq_len = 256
  return c
