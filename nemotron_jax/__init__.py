"""Hybrid Mamba-2 / attention / MoE language models (Nemotron-H, Nemotron 3) in JAX."""

import importlib

# The public names load on first use, so `nemotron_jax.hostmem` can run before JAX is imported.
_EXPORTS = {"ConfigError": "config", "default_config": "config", "load_config": "config",
            "validate": "config", "NemotronH": "model", "build_model": "model",
            "init_variables": "model"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(f"nemotron_jax.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
  raise AttributeError(f"module 'nemotron_jax' has no attribute {name!r}")
