"""Malloc on transparent huge pages for CPU runs (nemotron_jax/hostmem.py)."""

import os
import subprocess
import sys

import pytest

from nemotron_jax import hostmem

needs_thp = pytest.mark.skipif(not hostmem.supported(), reason="needs Linux, glibc and THP")

# The gradient of a two-layer product with 8 MiB and 16 MiB intermediates: the minor
# page faults of one call, after the first, with whatever malloc the process started with.
FAULTS = """
import resource
from nemotron_jax import hostmem
hostmem.reexec_with_huge_pages()
import jax, jax.numpy as jnp
x, w = jnp.ones((1024, 512)), jnp.full((512, 4096), 0.01)
f = jax.jit(jax.grad(lambda w, x: (jnp.tanh(jnp.tanh(x @ w) @ w.T) ** 2).sum()))
f(w, x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
  f(w, x).block_until_ready()
print(hostmem.active(), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _run(code, *args, **env):
  """The lines `python -c code args` prints, started without GLIBC_TUNABLES, with env."""
  clean = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", hostmem.OPT_OUT)}
  return subprocess.run([sys.executable, "-c", code, *args], env={**clean, **env}, check=True,
                        capture_output=True, text=True).stdout.splitlines()


def test_tunable_joins_the_others_once():
  env = hostmem.with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "A": "1"})
  assert env == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:" + hostmem.TUNABLE, "A": "1"}
  assert hostmem.with_huge_pages(env) == env
  assert hostmem.with_huge_pages({})["GLIBC_TUNABLES"] == hostmem.TUNABLE


@needs_thp
def test_reexec_restarts_once_with_the_tunable_and_keeps_the_arguments():
  code = ("import os, sys; from nemotron_jax import hostmem; print(os.getpid()); "
          "hostmem.reexec_with_huge_pages(); "
          "print(os.getpid(), os.environ.get('GLIBC_TUNABLES'), *sys.argv[1:])")
  # The command starts twice (its first line is printed twice), in the same process, and
  # the second time it runs with the tunable and the same arguments.
  first, again, (pid, tunables, *argv) = [line.split() for line in _run(code, "a", "--b")]
  assert first == again == [pid]
  assert (tunables, argv) == (hostmem.TUNABLE, ["a", "--b"])
  first, (pid, tunables) = [line.split() for line in _run(code, **{hostmem.OPT_OUT: "0"})]
  assert first == [pid] and tunables == "None"


@needs_thp
def test_huge_pages_cut_the_page_faults_of_each_call():
  on_active, on = _run(FAULTS)[0].split()
  off_active, off = _run(FAULTS, **{hostmem.OPT_OUT: "0"})[0].split()
  assert (on_active, off_active) == ("True", "False")
  # Measured on the 2-core machine: about 3,300 faults a call with huge pages, 11,400 without.
  assert float(on) < 0.5 * float(off), (on, off)
