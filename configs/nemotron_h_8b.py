"""Nemotron-H 8B: 52 layers of Mamba-2, squared-ReLU MLP and 4 attention layers (~8.1B parameters).

Dimensions from NVIDIA's published config (Megatron-Bridge
`NemotronHModelProvider8B`): d 4096, attention 32 query / 8 KV heads of 128,
Mamba-2 128 heads x 64 with d_state 128 in 8 groups, FFN 21504, vocabulary
131072. The data and train sections are placeholders: the pretraining recipe
is not part of this preset.
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M*-M-M-M-M-M-"
  m.d_model = 4096
  m.vocab_size = 131072
  m.compute_dtype = "bfloat16"
  m.remat = True
  m.mamba.num_heads, m.mamba.head_dim = 128, 64
  m.mamba.d_state, m.mamba.n_groups = 128, 8
  m.mamba.conv_kernel, m.mamba.chunk_size = 4, 128
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 32, 8, 128
  m.mlp.d_ff = 21504
  c.data.seq_len = 8192
  return c
