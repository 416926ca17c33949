"""Nemotron 3 Super 120B-A12B: 40 Mamba-2, 40 LatentMoE and 8 attention layers.

120.6B parameters in total without MTP; 12.7B active per token counting both
embedding matrices. d 4096, attention 32 query / 2 KV heads of 128, Mamba-2
128 heads x 64 with d_state 128 in 8 groups, LatentMoE with latent size 1024,
512 routed experts of width 2688 with top-22, one shared expert of width 5376
(on the full width), routed scaling 5.0, vocabulary 131072.

MTP: one physical "*E" block (eh_proj 2d -> d, an attention and a LatentMoE
layer) applied at two depths with shared weights; outside both counts above.

Unverified here: whether routing is group-limited (n_group / topk_group are
not in our notes; set to 1, which changes no parameter count).

Train section: the published peak learning rate 4.5e-4 with a minus-sqrt
decay and init std 0.014; warmup, decay length and steps are placeholders,
and so is the batch: Nano's published 3072 x 8192 tokens.

Launch setting: 256 devices of 80 GB (32 nodes of 8 GPUs), mesh expert 32 x
tensor 8 with the routed experts split over both (moe.tensor_split =
"experts": 2 whole experts per device, each device routing and exchanging an
eighth of its tensor group's tokens), the 3072-row batch as 96 microbatches
of one row per batch shard: 6.0 GB state, 52.2 GB temp, 58.3 GB peak per
device by the memory report (92.1 GB with the expert width split over tensor
instead). `python benchmarks/memory_fit.py --models super --preset`
measures it: see the README's "Memory at scale".
"""

from nemotron_jax.config import default_config


def get_config():
  c = default_config()
  m = c.model
  m.pattern = ("MEMEMEM*EMEMEMEM*EMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*EMEMEMEMEM*"
               "EMEMEMEM*EMEMEMEME")
  m.d_model = 4096
  m.vocab_size = 131072
  m.init_std = 0.014
  m.compute_dtype = "bfloat16"
  m.remat = True
  m.mamba.num_heads, m.mamba.head_dim = 128, 64
  m.mamba.d_state, m.mamba.n_groups = 128, 8
  m.mamba.conv_kernel, m.mamba.chunk_size = 4, 128
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 32, 2, 128
  m.moe.latent_size = 1024
  m.moe.num_experts, m.moe.top_k = 512, 22
  m.moe.d_ff, m.moe.shared_d_ff = 2688, 5376
  m.moe.routed_scaling = 5.0
  m.moe.n_group, m.moe.topk_group = 1, 1
  m.moe.tensor_split = "experts"
  m.mtp.num_depths, m.mtp.pattern, m.mtp.share_weights = 2, "*E", True
  c.data.seq_len = 8192
  c.train.batch_size = 3072
  c.train.grad_accum_steps = 96
  c.mesh.data, c.mesh.expert, c.mesh.tensor = 1, 32, 8
  c.train.lr = 4.5e-4
  c.train.schedule, c.train.decay_shape = "wsd", "minus_sqrt"
  return c
