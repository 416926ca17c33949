"""Checkpoints with orbax: the train state plus each process's data-iterator state.

Saves are asynchronous; orbax writes into a temporary folder and renames it
when complete, so a run killed mid-save resumes from the last complete step.
"""

from __future__ import annotations

import os

import grain
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
  """A checkpoint in the workdir that does not fit the current config."""


class Checkpointer:
  def __init__(self, workdir: str, *, keep: int, async_save: bool):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": grain.checkpoint.CheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_iterator) -> None:
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator)))

  def restore(self, abstract_state, data_iterator, step: int | None = None):
    """Restores the state (into the shardings of `abstract_state`) and the iterator in place."""
    step = self.latest_step() if step is None else step
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=grain.checkpoint.CheckpointRestore(data_iterator)))
    except (ValueError, KeyError, TypeError) as err:
      raise CheckpointMismatchError(
          f"checkpoint step {step} in {self.directory} does not match the current config "
          f"(model shape, optimiser or data pipeline changed?): {err}. Use a new --workdir, "
          "or restore the config the run was started with; the checkpoint is left untouched."
      ) from err
    return restored["state"]

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()
