"""Checkpoints with orbax: the train state plus the data-iterator state of the global stream.

Saves are asynchronous; orbax writes into a temporary folder and renames it
when complete, so a run killed mid-save resumes from the last complete step.

Layout of step N: `checkpoints/N/state` (the sharded train state, restored
into whatever shardings the current mesh gives it) and `checkpoints/N/data`
(one JSON iterator state, written by process 0). Every process iterates the
same global stream, so that one state restores on any number of processes.
Checkpoints of earlier versions hold `data/process_{i}-of-{n}.json` instead;
they restore from process 0's file, which is the same state.

A step whose files cannot be restored (damaged, half-copied) while an older
step can is moved to `checkpoints.unrestorable/N` (never deleted) and the run
continues from the older step. When no step restores, the config has most
likely changed (or every step is damaged): CheckpointMismatchError, and every
folder stays in place.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import sys

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from nemotron_jax.config import ConfigError


class CheckpointMismatchError(ConfigError):
  """No checkpoint in the workdir fits the current config."""


def _one_line(err: BaseException, keep: int = 160) -> str:
  """The error on one line; a long message keeps its start and its end, where the cause is."""
  text = " ".join(str(err).split())
  if len(text) > 2 * keep:
    text = text[:keep] + " ... " + text[-keep:]
  return f"{type(err).__name__}: {text}"


def _ignore_closed_loop_echoes() -> None:
  """Silences two known echoes of a failed restore. Tensorstore reads still in flight finish
  after orbax closed their event loop, each reporting RuntimeError('Event loop is closed')
  through sys.unraisablehook, possibly long after the restore returned; other unraisable
  exceptions go to the previous hook. And asyncio logs the reads' unretrieved exceptions."""
  previous = sys.unraisablehook
  if getattr(previous, "ignores_closed_loop", False):
    return

  def hook(unraisable):
    value = unraisable.exc_value
    if not (isinstance(value, RuntimeError) and str(value) == "Event loop is closed"):
      previous(unraisable)

  hook.ignores_closed_loop = True
  sys.unraisablehook = hook
  # The other echo: orbax's reads of the failed step are asyncio tasks whose exception
  # nobody retrieves; when they are collected, asyncio logs each with a traceback.
  logging.getLogger("asyncio").addFilter(_DroppedReadsFilter())


class _DroppedReadsFilter(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" records of orbax's array reads."""

  def filter(self, record):
    message = record.getMessage()
    return not (message.startswith("Task exception was never retrieved")
                and "async_deserialize" in message)


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self.aside = self.directory + ".unrestorable"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict) -> None:
    """Saves asynchronously; `data_state` is copied now, so later batches cannot leak into it."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(json.loads(json.dumps(data_state)))))

  def _restore_step(self, step: int, abstract_state):
    legacy = sorted(glob.glob(os.path.join(self.directory, str(step), "data", "process_0-of-*.json")))
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if not legacy:
      items["data"] = ocp.args.JsonRestore()
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    if legacy:
      with open(legacy[0]) as f:
        return restored["state"], json.load(f)
    return restored["state"], restored["data"]

  def restore(self, abstract_state, step: int | None = None):
    """-> (state in the shardings of `abstract_state`, data-iterator state) of the newest step
    that restores (or of `step`); steps newer than it that fail are moved aside, with a line
    saying which and why."""
    steps = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    failures, restored = [], None
    _ignore_closed_loop_echoes()
    for candidate in steps:
      try:
        restored = self._restore_step(candidate, abstract_state)
        break
      except Exception as err:  # noqa: BLE001  (any reason a step cannot be read is reported)
        failures.append((candidate, err))
    if restored is not None:
      for bad, err in failures:
        self._set_aside(bad, err, candidate)
      return restored
    newest, err = failures[0]
    also = f" (nor do the older steps {[s for s, _ in failures[1:]]})" if len(failures) > 1 else ""
    raise CheckpointMismatchError(
        f"checkpoint step {newest} in {self.directory} does not match the current config{also} "
        f"(model shape, optimiser or data pipeline changed?): {_one_line(err)}. Use a new "
        "--workdir, or restore the config the run was started with (config.from_step_*.json "
        "in the workdir); the checkpoints are left untouched.") from err

  def _set_aside(self, step: int, err: BaseException, resumed: int) -> None:
    """Moves an unrestorable step out of orbax's sight (process 0), so saves can reuse its number."""
    if jax.process_index() == 0:
      target, n = os.path.join(self.aside, str(step)), 1
      while os.path.exists(target):
        n += 1
        target = os.path.join(self.aside, f"{step}.{n}")
      os.makedirs(self.aside, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
      print(f"warning: checkpoint step {step} cannot be restored ({_one_line(err)}); moved it to "
            f"{target} and resuming from step {resumed}", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint step {step} set aside")
    self.manager.reload()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
