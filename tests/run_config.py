"""A preset small enough for end-to-end train.py runs inside the tests."""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "ME*"
  m.d_model = 32
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 4, 8, 16, 2
  m.mamba.chunk_size = 16
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 8
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff, m.moe.shared_d_ff = 4, 2, 32, 32
  c.data.seq_len = 64
  c.train.steps = 24
  c.train.batch_size = 8
  c.train.log_every = 1
  c.train.warmup_steps = 4
  c.train.eval_batches = 1
  c.train.sample_tokens = 0
  c.checkpoint.every = 8
  return c
