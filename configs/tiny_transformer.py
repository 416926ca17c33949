"""Tiny Transformer ablation: alternating attention and squared-ReLU MLP layers, no Mamba.

NoPE GQA attention (4 query / 2 KV heads of 32) and MLPs of width 576 at
d = 128, byte vocabulary: the same forward FLOPs per token at seq_len 256 as
`tiny_moe.py`, `tiny_latent_moe.py` and `tiny_mamba.py` (within 2%; see
`python -m nemotron_jax.summary`).
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "*-*-*-*-*-"
  m.d_model = 128
  m.vocab_size = 256
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 32
  m.mlp.d_ff = 576
  c.data.seq_len = 256
  return c
