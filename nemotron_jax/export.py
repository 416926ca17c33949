"""Export a train.py checkpoint as a Hugging Face checkpoint folder.

  python -m nemotron_jax.export --workdir=runs/tiny --out=hub/tiny [--step=N] [--dtype=bfloat16]

Restores the latest (or --step) checkpoint of --workdir sharded over this
host's devices and writes --out in the hub layout (`hf.save_checkpoint`):
config.json with the hub's field names, safetensors shards with an index, the
MTP head's tensors included, and the tokenizer.json the run used, if any.
transformers' `NemotronHForCausalLM.from_pretrained(out)` loads the folder.
"""

from __future__ import annotations

import os
import shutil

import jax
from absl import flags, logging

from nemotron_jax import checkpoint as checkpoint_lib
from nemotron_jax import config as config_lib
from nemotron_jax import cli, hf, sharding
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer


class ExportError(ValueError):
  """A workdir or option that cannot be exported."""


def default_mesh(config):
  """The workdir's mesh if it fits this host's devices, else every device on `data`."""
  try:
    return sharding.make_mesh(config.mesh)
  except config_lib.ConfigError:
    return sharding.make_mesh(config_lib.mesh_config())


def load_workdir(workdir: str, *, mesh=None, step: int | None = None):
  """A train.py workdir's config and the variables of its latest (or `step`) checkpoint.

  Returns (config, variables {"params", "moe_state"}, step); the variables are
  sharded over `mesh` (default: `default_mesh`) by the rules table.
  """
  cfg = os.path.join(workdir, "config.json")
  if not os.path.isfile(cfg):
    raise ExportError(f"workdir {workdir!r} has no config.json (train.py writes it at the start)")
  config = config_lib.from_dict(config_lib.read_json(cfg))
  mesh = default_mesh(config) if mesh is None else mesh
  trainer = Trainer(config, build_model(config), mesh)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=False)
  try:
    steps = ckpt.manager.all_steps()
    if not steps:
      raise ExportError(f"workdir {workdir!r} has no checkpoint in {ckpt.directory}; train.py "
                        "saves every checkpoint.every steps and at the end")
    if step is not None and step not in steps:
      raise ExportError(f"--step={step} is not in {ckpt.directory}; saved steps: {sorted(steps)}")
    # The newest step that restores (or `step`); CheckpointMismatchError when none does.
    state, _ = ckpt.restore(trainer.abstract_state(), step)
    step = int(state.step)
  finally:
    ckpt.close()
  return config, {"params": state.params, "moe_state": state.moe_state}, step


def export(workdir: str, out: str, *, step: int | None = None, dtype: str | None = None,
           max_shard_bytes: int = hf.DEFAULT_SHARD_BYTES) -> int:
  """Writes the workdir's checkpoint to `out` in the hub layout; returns the step exported."""
  config, variables, step = load_workdir(workdir, step=step)
  hf.save_checkpoint(config, variables, out, dtype=dtype, max_shard_bytes=max_shard_bytes)
  tokenizer = config.data.tokenizer
  if jax.process_index() == 0 and tokenizer != "bytes" and os.path.isfile(tokenizer):
    shutil.copy(tokenizer, os.path.join(out, "tokenizer.json"))
  return step


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  FLAGS = flags.FLAGS
  step = export(FLAGS.workdir, FLAGS.out, step=FLAGS.step, dtype=FLAGS.dtype)
  print(f"exported step {step} of {FLAGS.workdir} to {FLAGS.out}")


def define_flags():
  flags.DEFINE_string("workdir", None, "A train.py workdir.")
  flags.DEFINE_string("out", None, "The Hugging Face checkpoint folder to write.")
  flags.DEFINE_integer("step", None, "The checkpoint step to export (default: the latest).")
  flags.DEFINE_enum("dtype", None, list(config_lib.DTYPES),
                    "dtype of the written tensors (default: model.param_dtype).")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  # Flags are defined here, not on import: eval.py imports this module's loader with flags
  # of its own.
  cli.run(main, define_flags=define_flags, user_errors=(ExportError, hf.CheckpointError))
