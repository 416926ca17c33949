"""Which meshes fit the published models: per-device train-step memory of Nano and Super.

For each model and device count, on simulated CPU devices (nothing allocated):
  state    exact per-device bytes of parameters, Adam moments, expert biases and
           RNG of the *full* model, from its abstract state and the shardings of
           the rules table;
  temp     XLA's compiled temp bytes of the train step, measured on slices of
           the real widths (the pattern's repeating unit twice and three times,
           with the model's MTP head) and extrapolated linearly in depth to the
           full pattern: temp(L) = temp(3u) + (L / |u| - 3) (temp(3u) - temp(2u))
           (the first layers of a kind cost more than the later ones, so the
           increment is taken past them);
  peak     state + the slice's non-donated arguments and outputs (batch, metrics)
           + temp.
Per-device batch 1 row of data.seq_len (8192) tokens, the preset's remat and
dtypes, scheduled as `python -m nemotron_jax.summary --memory` does. With
--preset, each model's own launch setting instead: the preset's mesh (its
device count), global batch and train.grad_accum_steps, the step compiled
as train.py runs it (microbatches in one scan, the gradient sum included). Compiling a
whole 52- or 88-layer step on 64 simulated devices takes too long on a small
machine, hence the slices; the extrapolation assumes every further unit adds
what the third did.

Usage: python benchmarks/memory_fit.py [--models nano,super] [--devices 8,16,64]
       [--preset] [--budget_gb 80] [--state_only] [--json out.json]
(--state_only: the exact state column alone, in seconds; the slices take minutes each,
Super's tens of minutes on 2 cores.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time


# Mesh per (model, devices): experts split over `expert` (at most the expert count's
# divisor that keeps >= 2 experts per device), the rest over fsdp.
MESHES = {
    "nano": {8: {"expert": 8}, 16: {"fsdp": 2, "expert": 8}, 64: {"fsdp": 8, "expert": 8}},
    "super": {8: {"expert": 8}, 16: {"expert": 16}, 64: {"expert": 64}},
}
UNITS = {"nano": "MEMEM*E", "super": "MEMEMEM*E", "nemotron_h_8b": "M-M-M-M*-"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="nano,super")
  parser.add_argument("--devices", default="8,16,64")
  parser.add_argument("--budget_gb", type=float, default=80.0)
  parser.add_argument("--state_only", action="store_true")
  parser.add_argument("--preset", action="store_true",
                      help="each preset's own mesh, batch and accumulation")
  parser.add_argument("--json", default=None)
  args = parser.parse_args()
  from nemotron_jax import config as config_lib, sharding
  from nemotron_jax.summary import MEMORY_XLA_FLAGS
  preset_devices = lambda name: math.prod(
      config_lib.load_config(f"configs/{name}.py").mesh[a] for a in sharding.MESH_AXES)
  models = args.models.split(",")
  counts = ([preset_devices(name) for name in models] if args.preset
            else [int(n) for n in args.devices.split(",")])
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + MEMORY_XLA_FLAGS
                             + f" --xla_force_host_platform_device_count={max(counts)}")
  import jax
  from nemotron_jax.model import build_model
  from nemotron_jax.train_lib import Trainer

  def trainer_for(config, n):
    return Trainer(config, build_model(config), sharding.make_mesh(config.mesh, jax.devices()[:n]))

  def configure(name, n, pattern=None):
    config = config_lib.load_config(f"configs/{name}.py")
    if not args.preset:
      for axis in sharding.MESH_AXES:
        config.mesh[axis] = MESHES[name][n].get(axis, 1)
      config.train.batch_size, config.train.grad_accum_steps = n, 1  # one row per device
    if pattern:
      config.model.pattern = pattern
    return config

  mesh_of = lambda name, n: (
      {a: v for a, v in configure(name, n).mesh.items() if v != 1} if args.preset
      else MESHES[name][n])
  rows = []
  for i, name in enumerate(models):
    full_layers = len(configure(name, counts[0]).model.pattern)
    unit = UNITS[name]
    for n in ([counts[i]] if args.preset else counts):
      t0 = time.time()
      state = trainer_for(configure(name, n), n).abstract_state()
      state_bytes = sum(math.prod(leaf.sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
                        for leaf in jax.tree.leaves(state))
      if args.state_only:
        rows.append({"model": name, "devices": n, "mesh": mesh_of(name, n),
                     "state_gb": state_bytes / 1e9})
        print(f"{name:6s} {n:3d} devices {json.dumps(mesh_of(name, n)):28s} "
              f"state {state_bytes / 1e9:7.1f} GB", flush=True)
        continue
      temps, extra = [], 0
      for repeat in (2, 3):
        analysis = trainer_for(configure(name, n, unit * repeat), n).compile_train_step(
        ).memory_analysis()
        temps.append(analysis.temp_size_in_bytes)
        extra = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                 - 2 * analysis.alias_size_in_bytes)
      temp = temps[1] + (full_layers / len(unit) - 3) * (temps[1] - temps[0])
      peak = state_bytes + extra + temp
      row = {"model": name, "devices": n, "mesh": mesh_of(name, n), "state_gb": state_bytes / 1e9,
             "temp_gb": temp / 1e9, "temp_unit_gb": [x / 1e9 for x in temps],
             "peak_gb": peak / 1e9, "fits": peak <= args.budget_gb * 1e9,
             "seconds": time.time() - t0}
      rows.append(row)
      print(f"{name:6s} {n:3d} devices {json.dumps(row['mesh']):28s} state {row['state_gb']:7.1f} GB"
            f"  temp {row['temp_gb']:7.1f} GB (unit x2 {temps[0] / 1e9:.1f}, x3 {temps[1] / 1e9:.1f})"
            f"  peak {row['peak_gb']:7.1f} GB  {'fits' if row['fits'] else 'does not fit'}"
            f" {args.budget_gb:.0f} GB  [{row['seconds']:.0f} s]", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
