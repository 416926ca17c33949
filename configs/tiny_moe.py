"""Tiny MoE ablation: the Nano layout (Mamba-2 / MoE with one attention layer) at CPU scale.

16 routed experts of width 256 with top-2 and a shared expert of width 256 on
the full width d = 128. Its LatentMoE twin is `tiny_latent_moe.py`, with the
same active FLOPs per token (`python -m nemotron_jax.summary`).
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "MEM*EME"
  m.d_model = 128
  m.vocab_size = 256
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 8, 32, 32, 2
  m.mamba.chunk_size = 64
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 32
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff, m.moe.shared_d_ff = 16, 2, 256, 256
  c.data.seq_len = 256
  return c
