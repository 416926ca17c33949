"""Train a Nemotron-style hybrid model.

  python train.py --config=configs/tiny.py --workdir=runs/tiny \
      --config.train.steps=200 --config.checkpoint.every=50

Resumes automatically from the latest complete checkpoint in --workdir; a new
workdir with --config.init.hf_checkpoint=DIR starts from a Hugging Face
checkpoint's weights (its config.json gives the model section).
Multi-process: --coordinator_address=HOST:PORT --num_processes=N --process_id=I
(or --distributed_auto to read the cluster environment). SIGTERM or SIGINT
finishes the current step, saves and exits with status 0; a user error prints
one line `error: ...` and exits with status 2 (--traceback shows where).
"""

import sys

from absl import flags, logging
from ml_collections import config_flags

from nemotron_jax import cli

flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics.jsonl, TensorBoard events.")
flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for multi-process runs.")
flags.DEFINE_integer("num_processes", 1, "Number of processes in a multi-process run.")
flags.DEFINE_integer("process_id", 0, "This process's index in a multi-process run.")
flags.DEFINE_bool("distributed_auto", False, "Initialise jax.distributed from the cluster environment.")
flags.mark_flags_as_required(["workdir"])
FLAGS = flags.FLAGS


def define_config_flag():
  # Called by cli.run: ml_collections applies --config.* overrides while defining the flag.
  config_flags.DEFINE_config_file("config", "configs/tiny.py", "Preset file with get_config().")


def init_distributed():
  import jax
  if FLAGS.num_processes > 1 or FLAGS.coordinator_address or FLAGS.distributed_auto:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.distributed_auto:
      jax.distributed.initialize()
    else:
      if not FLAGS.coordinator_address:
        cli.fail(f"--num_processes={FLAGS.num_processes} needs --coordinator_address=HOST:PORT "
                 "of process 0 (or --distributed_auto)")
      jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  init_distributed()
  import jax
  from nemotron_jax import config as config_lib
  from nemotron_jax import hf, train_loop
  config = config_lib.validate(FLAGS.config)
  try:
    result = train_loop.run(config, FLAGS.workdir,
                            overrides=config_flags.get_override_values(FLAGS["config"]))
  except hf.CheckpointError as err:
    cli.fail(str(err))
  if jax.process_index() == 0 and result.get("interrupted"):
    sys.exit(1)


if __name__ == "__main__":
  cli.run(main, define_flags=define_config_flag)
