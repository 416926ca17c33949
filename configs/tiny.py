"""The default small hybrid: every mixer type (Mamba-2, attention, MLP, MoE) at CPU scale.

Byte-level vocabulary on the embedded standard-library corpus.
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "MEM*EM-"
  m.d_model = 128
  m.vocab_size = 256
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 8, 32, 32, 2
  m.mamba.chunk_size = 64
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 32
  m.mlp.d_ff = 512
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff, m.moe.shared_d_ff = 8, 2, 128, 256
  c.data.seq_len = 256
  return c
