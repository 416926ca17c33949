"""Hybrid Mamba-2 / attention / MoE language models (Nemotron-H, Nemotron 3) in JAX."""

from nemotron_jax.config import ConfigError, default_config, load_config, validate
from nemotron_jax.model import NemotronH, build_model, init_variables

__all__ = ["ConfigError", "NemotronH", "build_model", "default_config", "init_variables",
           "load_config", "validate"]
