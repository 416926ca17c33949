"""One process of a multi-process sharded hub-checkpoint load (tests/test_hf.py).

  python tests/hf_load_worker.py CHECKPOINT OUT_DIR ADDRESS NUM_PROCESSES PROCESS_ID

Loads CHECKPOINT on a mesh of every process's devices (fsdp over all of them),
counts the bytes this process reads from the safetensors files, computes the
logits of fixed tokens, and writes OUT_DIR/process_{i}.json (bytes read) and,
on process 0, OUT_DIR/logits.npy; then saves the sharded variables to
OUT_DIR/export.
"""

import json
import os
import sys

import jax

jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.config.update("jax_default_matmul_precision", "highest")


def main(path, out, address, num_processes, process_id):
  jax.distributed.initialize(address, int(num_processes), int(process_id))
  import flax.linen as nn
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from nemotron_jax import build_model, hf, sharding

  read = hf._Reader.read
  counted = {"bytes": 0}

  def counting(self, name, index):
    value = read(self, name, index)
    counted["bytes"] += value.nbytes
    return value

  hf._Reader.read = counting
  config = hf.read_config(path)
  config.mesh.data, config.mesh.fsdp = 1, jax.device_count()
  mesh = sharding.make_mesh(config.mesh)
  config, variables = hf.load_checkpoint(path, mesh=mesh)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (3, 21)).astype(np.int32)
  replicated = NamedSharding(mesh, P())
  model = build_model(config)

  def apply(variables, tokens):
    with nn.logical_axis_rules(sharding.RULES):
      return model.apply(variables, tokens)

  with jax.set_mesh(mesh):
    tokens = jax.make_array_from_callback(tokens.shape, replicated, lambda i: tokens[i])
    logits = jax.jit(apply, out_shardings=replicated)(variables, tokens)
  with open(os.path.join(out, f"process_{process_id}.json"), "w") as f:
    json.dump({"bytes_read": counted["bytes"], "devices": jax.local_device_count()}, f)
  if jax.process_index() == 0:
    np.save(os.path.join(out, "logits.npy"), np.asarray(logits.addressable_data(0)))
  # Variables spanning both processes: each process takes part, process 0 writes.
  hf.save_checkpoint(config, variables, os.path.join(out, "export"), max_shard_bytes=50_000)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
