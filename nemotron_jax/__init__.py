"""Hybrid Mamba-2 / attention / MoE language models (Nemotron-H, Nemotron 3) in JAX."""
