"""Host memory for CPU runs: glibc's malloc on transparent huge pages.

XLA:CPU allocates an executable's buffers afresh on every call, and glibc
serves large requests with new mappings, so each step of a CPU training run
first-touches hundreds of MB of 4 KiB pages. On configs/tiny.py at batch
8 x 256 that was about 77,000 page faults and 0.28 s of kernel time per step
of 0.55 s (2 cores). glibc's tunable `glibc.malloc.hugetlb=1` makes malloc
ask for transparent huge pages (madvise), which cuts the faults per step to
about 500 and the step by a quarter to a third.

glibc reads tunables only when a process starts, so the entry points
(train.py, eval.py, the benchmarks) call `reexec_with_huge_pages()` first,
which restarts the same command once with the tunable added; child processes
inherit it. NEMOTRON_HUGE_PAGES=0 turns this off. Elsewhere than Linux with
glibc and transparent huge pages, nothing happens.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "NEMOTRON_HUGE_PAGES"
THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def supported() -> bool:
  """Linux with glibc, and transparent huge pages not switched off."""
  if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  try:
    with open(THP_MODE) as f:
      return "[never]" not in f.read()
  except OSError:
    return False


def with_huge_pages(environ) -> dict:
  """A copy of `environ` whose GLIBC_TUNABLES also holds TUNABLE (other tunables kept)."""
  env = dict(environ)
  current = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
  if not any(t.startswith("glibc.malloc.hugetlb=") for t in current):
    env["GLIBC_TUNABLES"] = ":".join(current + [TUNABLE])
  return env


def active() -> bool:
  """Whether this process was started with a glibc.malloc.hugetlb tunable."""
  return "glibc.malloc.hugetlb=" in os.environ.get("GLIBC_TUNABLES", "")


def reexec_with_huge_pages() -> None:
  """Restarts this command with TUNABLE set, unless it is set, opted out or unsupported.

  Call it first in a script's main, before JAX starts threads or allocates;
  the process keeps its pid, arguments and the rest of its environment.
  """
  if active() or os.environ.get(OPT_OUT) == "0" or not supported():
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], with_huge_pages(os.environ))


def export_to_children() -> None:
  """Sets TUNABLE in this process's environment, for the processes it starts from now on
  (a test runner's workers and subprocesses); this process itself is unchanged."""
  if os.environ.get(OPT_OUT) != "0" and supported():
    os.environ.update(with_huge_pages(os.environ))
