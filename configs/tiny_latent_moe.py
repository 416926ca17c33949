"""Tiny LatentMoE ablation: `tiny_moe.py` with its routed experts moved to a latent width.

The design rule of NEMOTRON.md §2: latent size l = d / 4 = 32, 4x the experts
(64) and about 4x the top-k at the same cost. The latent projections (d -> l
and back) and the 4x wider router cost about one expert, so top-7 rather
than top-8 keeps the active FLOPs per token those of `tiny_moe.py`. Router and
shared expert see the full width, as in Nemotron 3 Super.
"""

import os

from nemotron_jax.config import load_config


def get_config():
  c = load_config(os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny_moe.py"))
  m = c.model
  m.moe.latent_size = 32
  m.moe.num_experts, m.moe.top_k = 64, 7
  return c
