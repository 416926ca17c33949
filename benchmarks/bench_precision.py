"""Train-step cost of the emulated low-precision recipes, as ratios to the bf16 recipe.

Each recipe's step is compiled once; then the recipes are timed in alternating
rounds (best round of `--steps` steps each), so machine noise hits them alike.
The figure of merit is the ratio to the bf16 recipe's step measured in the same
run. Run it on an otherwise idle machine.

  python benchmarks/bench_precision.py [--config configs/tiny.py] [--recipes bf16,nvfp4,mxfp8]
"""

import argparse
import os
import time

import jax
import numpy as np

from nemotron_jax import hostmem

# name -> model.precision fields; "nvfp4_no_sr" / "nvfp4_no_rht" switch off one
# part of the default NVFP4 recipe, to see what each costs.
VARIANTS = {
    "bf16": {"recipe": "bf16"},
    "fp8_tensorwise": {"recipe": "fp8_tensorwise"},
    "fp8_blockwise": {"recipe": "fp8_blockwise"},
    "mxfp8": {"recipe": "mxfp8"},
    "nvfp4": {"recipe": "nvfp4"},
    "nvfp4_no_sr": {"recipe": "nvfp4", "stochastic_rounding": False},
    "nvfp4_no_rht": {"recipe": "nvfp4", "hadamard": False},
}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--recipes", default="bf16,fp8_tensorwise,mxfp8,nvfp4")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=4)
  args = parser.parse_args()
  from nemotron_jax import build_model, load_config, sharding
  from nemotron_jax.train_lib import Trainer

  names = args.recipes.split(",")
  unknown = [n for n in names if n not in VARIANTS]
  if unknown or names[0] != "bf16":
    parser.error(f"--recipes must start with bf16 and name only {sorted(VARIANTS)}; got {names}")
  tokens = np.random.default_rng(0).integers(0, 256, (args.batch, args.seq + 1))
  runs = {}
  for name in names:
    config = load_config(args.config)
    config.train.batch_size, config.data.seq_len, config.train.warmup_steps = (
        args.batch, args.seq, 0)
    for field, value in VARIANTS[name].items():
      config.model.precision[field] = value
    trainer = Trainer(config, build_model(config),
                      sharding.make_mesh(config.mesh, jax.devices()[:1]))
    batch = trainer.shard_batch({
        "inputs": tokens[:, :-1].astype(np.int32) % config.model.vocab_size,
        "targets": tokens[:, 1:].astype(np.int32) % config.model.vocab_size,
        "segment_ids": np.ones((args.batch, args.seq), np.int32),
        "loss_mask": np.ones((args.batch, args.seq), np.float32)})
    state, metrics = trainer.train_step(trainer.init_state(0), batch)  # compile
    jax.block_until_ready(metrics["loss"])
    runs[name] = [trainer, state, batch]

  load_before = os.getloadavg()[0]
  times = {name: [] for name in names}
  for _ in range(args.rounds):
    for name in names:
      trainer, state, batch = runs[name]
      start = time.perf_counter()
      for _ in range(args.steps):
        state, metrics = trainer.train_step(state, batch)
      jax.block_until_ready(metrics["loss"])
      times[name].append((time.perf_counter() - start) / args.steps)
      runs[name][1] = state
  print(f"config {args.config}, batch {args.batch} x seq {args.seq}, one {jax.devices()[0].platform} "
        f"device, load average before / after {load_before:.2f} / {os.getloadavg()[0]:.2f}")
  base = min(times["bf16"])
  for name in names:
    best = min(times[name])
    print(f"{name:15s} step {best * 1e3:8.1f} ms  {best / base:5.2f}x bf16   "
          f"rounds {[round(t * 1e3, 1) for t in times[name]]} ms")


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # malloc on huge pages: see nemotron_jax/hostmem.py
  main()
