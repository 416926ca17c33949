"""Nemotron 3 Nano 30B-A3B: 23 Mamba-2, 23 MoE and 6 attention layers.

31.6B parameters in total; 3.2B active per token without the input embedding
(3.6B with it). Dimensions from NVIDIA's published config (Megatron-Bridge
`Nemotron3NanoProvider`): d 2688, attention 32 query / 2 KV heads of 128,
Mamba-2 64 heads x 64 with d_state 128 in 8 groups, 128 routed experts of
width 1856 with top-6, one shared expert of width 3712, routed scaling 2.5,
no group-limited routing (n_group = topk_group = 1), vocabulary 131072.

Train section: the published pretraining recipe (AdamW 0.9/0.95, weight decay
0.1, WSD with a flat peak of 1e-3 for 80% of the steps, decay to 1e-5,
8192 x 3072 tokens per batch, init std ~0.017). The warmup length, the decay
shape and the number of steps are not published in our notes: placeholders.

Launch setting: 64 devices of 80 GB (8 nodes of 8 GPUs), mesh expert 8 x
tensor 8 (16 experts per expert shard, tensor parallel inside a node), the
3072-row batch as 384 microbatches of one row per batch shard: 39.7 GB peak
per device. `python benchmarks/memory_fit.py --models nano --preset`
measures it: see the README's "Memory at scale".
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = "MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME"
  m.d_model = 2688
  m.vocab_size = 131072
  m.init_std = 0.017
  m.compute_dtype = "bfloat16"
  m.remat = True
  m.mamba.num_heads, m.mamba.head_dim = 64, 64
  m.mamba.d_state, m.mamba.n_groups = 128, 8
  m.mamba.conv_kernel, m.mamba.chunk_size = 4, 128
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 32, 2, 128
  m.moe.num_experts, m.moe.top_k = 128, 6
  m.moe.d_ff, m.moe.shared_d_ff = 1856, 3712
  m.moe.routed_scaling = 2.5
  m.moe.n_group, m.moe.topk_group = 1, 1
  c.data.seq_len = 8192
  c.train.batch_size = 3072
  c.train.grad_accum_steps = 384
  c.mesh.data, c.mesh.expert, c.mesh.tensor = 1, 8, 8
  c.train.lr = 1e-3
  c.train.schedule, c.train.decay_shape = "wsd", "linear"
  c.train.decay_fraction = 0.2
  c.train.min_lr_ratio = 1e-2
  c.train.weight_decay = 0.1
  return c
