"""Shared fixtures: tiny configs, float32 matmuls, and 8 simulated CPU devices."""

import os

# Must precede the first jax import: sharding tests need several devices, and the
# tests are dominated by compiling many small programs, which LLVM's optimisation
# level 0 makes about three times faster (arithmetic is the same IEEE float32).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS
                           + " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from nemotron_jax import hostmem  # noqa: E402

# The processes the tests start (xdist workers, train.py runs, notebook kernels) run
# with malloc on huge pages, as train.py does.
hostmem.export_to_children()

from nemotron_jax import config as config_lib

jax.config.update("jax_default_matmul_precision", "highest")

# The files that take minutes, slowest first. xdist (--dist loadfile) hands whole files
# to workers in collection order; starting these first keeps one of them from being
# the last thing a worker runs while the other is idle.
SLOW_FILES = ("test_train.py", "test_notebooks.py", "test_precision.py", "test_export.py",
              "test_grad_accum.py", "test_sharding.py", "test_model.py")


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOW_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FILES)))


def tiny_config(pattern: str = "M*-E", overrides: dict | None = None):
  """A model small enough to compile in seconds, with every mixer width distinct."""
  c = config_lib.default_config()
  m = c.model
  m.pattern = pattern
  m.d_model = 32
  m.vocab_size = 64
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state = 4, 8, 16
  m.mamba.n_groups, m.mamba.chunk_size = 2, 8
  m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 8
  m.mlp.d_ff = 48
  m.moe.num_experts, m.moe.top_k, m.moe.d_ff, m.moe.shared_d_ff = 8, 2, 16, 24
  for key, value in (overrides or {}).items():
    node = m
    *path, leaf = key.split(".")
    for name in path:
      node = node[name]
    node[leaf] = value
  return c


@pytest.fixture
def make_config():
  return tiny_config
