"""The default hybrid's layer stack four times wider (d_model 512), where matrix products dominate.

Same pattern as `tiny.py` (Mamba-2, MoE, attention, MLP), byte vocabulary;
16 routed experts of width 512 with top-2 and a shared expert of width 1024.
At batch 8 x 256 on CPU its train step is mostly matrix products, so
`benchmarks/bench_train.py --config=configs/small.py` measures the
implementations where the tiny preset measures per-op overheads.
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "MEM*EM-"
  m.d_model = 512
  m.vocab_size = 256
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 16, 64, 64, 2
  m.mamba.chunk_size = 64
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 8, 2, 64
  m.mlp.d_ff = 2048
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff, m.moe.shared_d_ff = 16, 2, 512, 1024
  c.data.seq_len = 256
  return c
