"""`tiny.py` four times wider (d_model 512), where matrix products dominate.

Same layer stack (Mamba-2, MoE, attention, MLP), byte vocabulary and
sequence length; 16 routed experts of width 512 with top-2 and a shared
expert of width 1024. At batch 8 x 256 on CPU its train step is mostly
matrix products, so `benchmarks/bench_train.py --config=configs/small.py`
measures the implementations where the tiny preset measures per-op overheads.
"""

import os

from nemotron_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.py"))
  m = c.model
  m.d_model = 512
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state = 16, 64, 64
  m.attention.num_heads, m.attention.head_dim = 8, 64
  m.mlp.d_ff = 2048
  m.moe.num_experts, m.moe.d_ff, m.moe.shared_d_ff = 16, 512, 1024
  return c
