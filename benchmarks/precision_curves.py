"""Loss curves and step time of the tiny config under each low-precision recipe.

Trains configs/tiny.py on the embedded corpus once per variant, in one
process, one after another: the "bf16" recipe (the same emulation path with
bf16 operands) is the baseline for the loss gap and the step-time overhead.
Writes every curve to --output (JSON) and prints a table.

  python benchmarks/precision_curves.py --steps 300 --output precision_curves.json
"""

import argparse
import json
import os
import tempfile

import numpy as np

from nemotron_jax import hostmem

VARIANTS = {
    "bf16": {},
    "fp8_tensorwise": {},
    "mxfp8": {},
    "nvfp4": {},
    "nvfp4 no-RHT": {"hadamard": False},
    "nvfp4 no-SR": {"stochastic_rounding": False},
    "nvfp4 no-RHT no-SR": {"hadamard": False, "stochastic_rounding": False},
}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--log_every", type=int, default=10)
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--output", default="precision_curves.json")
  args = parser.parse_args()

  from absl import logging
  logging.set_verbosity(logging.WARNING)
  from nemotron_jax import load_config, train_loop

  results = {}
  for name in args.variants.split(","):
    c = load_config(args.config)
    c.model.precision.recipe = name.split()[0]
    for key, value in VARIANTS[name].items():
      c.model.precision[key] = value
    c.train.steps = args.steps
    c.train.batch_size = args.batch
    c.data.seq_len = args.seq
    c.train.log_every = args.log_every
    c.train.sample_tokens = 0
    c.checkpoint.every = 0
    with tempfile.TemporaryDirectory() as workdir:
      summary = train_loop.run(c, workdir)
      with open(os.path.join(workdir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # The first interval includes compilation; statistics passes run at log steps in all.
    speed = float(np.median([r["tokens_per_s"] for r in records[2:]]))
    results[name] = {"steps": [r["step"] for r in records], "loss": [r["loss"] for r in records],
                     "tokens_per_s": speed, "eval_loss": summary.get("eval_loss"),
                     "finite": not summary["interrupted"]}
    print(f"{name}: final loss {records[-1]['loss']:.4f}, eval {summary.get('eval_loss')}, "
          f"{speed:.0f} tokens/s", flush=True)
    with open(args.output, "w") as f:  # after every variant, so a cut-short run keeps its curves
      json.dump(results, f, indent=1)

  base = results.get("bf16")
  print(f"\n{'variant':22s} {'finite':>6s} {'last-50 loss':>12s} {'gap vs bf16':>11s} "
        f"{'eval loss':>9s} {'tokens/s':>9s} {'time vs bf16':>12s}")
  for name, r in results.items():
    tail = float(np.mean(r["loss"][-5:]))
    gap = tail - float(np.mean(base["loss"][-5:])) if base else float("nan")
    slow = base["tokens_per_s"] / r["tokens_per_s"] if base else float("nan")
    print(f"{name:22s} {str(r['finite']):>6s} {tail:12.4f} {gap:+11.4f} "
          f"{r['eval_loss'] or float('nan'):9.4f} {r['tokens_per_s']:9.0f} {slow:11.2f}x")


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # malloc on huge pages: see nemotron_jax/hostmem.py
  main()
