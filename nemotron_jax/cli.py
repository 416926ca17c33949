"""The entry point every command-line tool wraps its main with: a user mistake is one line.

`run(main, define_flags=..., user_errors=...)` is `absl.app.run(main)`, except
that a bad flag, an unknown `--config.*` field, and any exception of the
user-error types (ConfigError and its subclasses by default) print
`error: MESSAGE` on stderr and exit with status 2, without a traceback. Pass
`--traceback` (or set NEMOTRON_TRACEBACK=1) to see the traceback when
debugging. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable

from absl import app, flags

from nemotron_jax import hostmem
from nemotron_jax.config import ConfigError

USAGE_EXIT = 2
_TRACEBACK_FLAG = "--traceback"


def _show_traceback(argv) -> bool:
  return _TRACEBACK_FLAG in argv or os.environ.get("NEMOTRON_TRACEBACK", "") not in ("", "0")


def fail(message: str):
  """Prints `error: message` (one line) on stderr and exits with status 2."""
  sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")
  sys.exit(USAGE_EXIT)


def _unknown_override(argv, err: Exception) -> str:
  """The message for a `--config.a.b=...` override whose field the config lacks."""
  message = err
  while isinstance(message, BaseException) and message.args:
    message = message.args[0]
  message = str(message)
  match = re.search(r"'([^']+)'", message)
  name = match.group(1) if match else str(err)
  offending = [a.split("=")[0] for a in argv if a.startswith("--config.")
               and re.search(rf"\.{re.escape(name)}(\.|=|$)", a.split("=")[0] + "=")]
  if not offending:
    return f"a --config.* override names a field the config lacks ({message})"
  field = offending[0][len("--config."):]
  hint = message.split("\n", 1)[-1]
  return (f"{offending[0]}: the config has no field {field!r}; expected a field of the schema "
          "in nemotron_jax/config.py" + (f" ({hint})" if "mean" in hint else ""))


def run(main: Callable, *, define_flags: Callable | None = None,
        user_errors: tuple[type[BaseException], ...] = ()) -> None:
  """Runs `main` under absl after `define_flags()`, turning user errors into one-line exits.

  On Linux with glibc the command first restarts itself once with malloc on huge
  pages (`hostmem.reexec_with_huge_pages`), which XLA:CPU steps need.
  """
  hostmem.reexec_with_huge_pages()
  argv = list(sys.argv)
  debug = _show_traceback(argv)
  if _TRACEBACK_FLAG in argv:
    argv.remove(_TRACEBACK_FLAG)
    sys.argv = argv
  errors = (ConfigError, *user_errors)
  overrides = any(a.startswith("--config.") for a in argv)

  def unknown_field(err):
    if debug or not overrides:
      raise err
    fail(_unknown_override(argv, err))

  # ml_collections applies `--config.*` overrides when the flag is defined (to the default
  # preset) or parsed (to a --config preset); a missing field is an AttributeError or KeyError.
  if define_flags is not None:
    try:
      define_flags()
    except (AttributeError, KeyError) as err:
      unknown_field(err)

  def parse(args):
    try:
      return flags.FLAGS(args)
    except flags.Error as err:
      if debug:
        raise
      fail(str(err))
    except (AttributeError, KeyError) as err:
      unknown_field(err)

  def guarded(args):
    try:
      return main(args)
    except errors as err:
      if debug:
        raise
      fail(str(err))

  app.run(guarded, argv=argv, flags_parser=parse)
