"""Nemotron-H 8B: 52 layers of Mamba-2, squared-ReLU MLP and 4 attention layers (~8.1B parameters).

Dimensions from NVIDIA's published config (Megatron-Bridge
`NemotronHModelProvider8B`): d 4096, attention 32 query / 8 KV heads of 128,
Mamba-2 128 heads x 64 with d_state 128 in 8 groups, FFN 21504, vocabulary
131072. The train section is a placeholder (the pretraining recipe is not
part of this preset) except for the launch setting: Nano's 3072 x 8192-token
batch on 64 devices of 80 GB (8 nodes of 8 GPUs), mesh fsdp 8 x tensor 8, as
384 microbatches of one row per batch shard: 26.6 GB peak per device. `python benchmarks/memory_fit.py --models
nemotron_h_8b --preset` measures it: see the README's "Memory at scale".
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
  c.train.batch_size = 3072
  c.train.grad_accum_steps = 384
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 8, 8
  return c
