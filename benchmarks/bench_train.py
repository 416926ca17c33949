"""Train-step throughput: this project vs transformers' NemotronHForCausalLM (torch, CPU).

Both train the same small hybrid MoE (the --config preset, configs/tiny.py by
default) in float32 with AdamW on the same batch. The two are timed in
alternating rounds so machine noise hits both alike; the ratio is the figure
of merit. Run it on an otherwise idle machine: under load torch's worker
threads lose more than XLA's, which inflates the ratio (the load average is
printed). Model FLOPs utilisation is the analytic training FLOPs (6 x active
matmul parameters per token plus attention and SSD terms, from
nemotron_jax.summary) over the best float32 GEMM rate of jnp.dot, measured
first, before anything else of the run exists, at four shapes, next to
torch.mm's at the same shapes (the two libraries' GEMMs differ, and differ
by day on a shared host). Torch's MFU is printed too, against both peaks;
100% over torch's MFU bounds the speed-up any implementation can reach.
The script restarts itself with malloc on huge pages (nemotron_jax/hostmem.py;
NEMOTRON_HUGE_PAGES=0 runs it without), which both libraries share, and it
prints the minor page faults per step of each.

  python benchmarks/bench_train.py [--config configs/tiny.py] [--batch 8] [--seq 256]
  python benchmarks/bench_train.py --config configs/small.py   # d_model 512: matmul-bound
"""

import argparse
import os
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax import hostmem, summary


# GEMM shapes (m, k, n) for the peaks: the square one and three with the aspect ratios of
# the presets' projections and expert blocks.
PEAK_SHAPES = ((2048, 2048, 2048), (4096, 512, 2048), (2048, 256, 1024), (4096, 128, 512))


def _best_rate(fn, flops, reps):
  fn()  # compile / warm up
  best = float("inf")
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return flops / best


def gemm_peaks(torch, reps=10) -> dict:
  """float32 GEMM rate (FLOP/s) of jnp.dot and torch.mm at each of PEAK_SHAPES, measured
  before anything else runs in the process: {"jax": [...], "torch": [...]}."""
  rates = {"jax": [], "torch": []}
  for m, k, n in PEAK_SHAPES:
    a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
    f = jax.jit(jnp.dot)
    rates["jax"].append(_best_rate(lambda: f(a, b).block_until_ready(), 2 * m * k * n, reps))
    ta, tb = torch.ones(m, k), torch.ones(k, n)
    rates["torch"].append(_best_rate(lambda: torch.mm(ta, tb), 2 * m * k * n, reps))
  return rates


HLO_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16, "s32": jnp.int32,
              "s8": jnp.int8}


def matmul_floor(hlo_text: str, reps: int = 5) -> tuple[float, float, int]:
  """Seconds the compiled step's dots take when each runs alone, at its own shapes and
  dimension numbers (best of `reps`), summed over all of them: (seconds, FLOPs, count)."""
  groups = {}
  for d in summary.compiled_dots(hlo_text):
    key = (d["lhs"], d["rhs"], d["dims"])
    groups[key] = (groups.get(key, (0, d["flops"]))[0] + 1, d["flops"])
  seconds = 0.0
  for ((ldt, lshape), (rdt, rshape), dims), (count, _) in groups.items():
    a, b = jnp.ones(lshape, HLO_DTYPES[ldt]), jnp.ones(rshape, HLO_DTYPES[rdt])
    f = jax.jit(lambda a, b, dims=dims: jax.lax.dot_general(
        a, b, dims, preferred_element_type=jnp.float32))
    seconds += count / _best_rate(lambda: f(a, b).block_until_ready(), 1.0, reps)  # 1 / rate
  return seconds, sum(c * f for c, f in groups.values()), sum(c for c, _ in groups.values())


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--target", type=float, default=2.5, help="speed-up to report the MFU for")
  args = parser.parse_args()

  import torch
  # The peaks first, in isolation: nothing else of this run is compiled or allocated yet.
  load_before = os.getloadavg()[0]
  peaks = gemm_peaks(torch)
  peak = max(peaks["jax"])
  import transformers
  from nemotron_jax import build_model, hf, load_config, sharding
  from nemotron_jax.train_lib import Trainer

  config = load_config(args.config)
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq
  config.train.warmup_steps = 0
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  trainer = Trainer(config, build_model(config), mesh)
  state = trainer.init_state(0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, config.model.vocab_size, (args.batch, args.seq + 1))
  batch = trainer.shard_batch({
      "inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
      "segment_ids": np.ones((args.batch, args.seq), np.int32),
      "loss_mask": np.ones((args.batch, args.seq), np.float32)})

  torch.manual_seed(0)
  torch_model = transformers.NemotronHForCausalLM(
      transformers.NemotronHConfig(**hf.config_to_hf(config))).train()
  opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
  t_tokens = torch.as_tensor(tokens)

  def ours(n):
    nonlocal state
    for _ in range(n):
      state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics["loss"])

  def theirs(n):
    for _ in range(n):
      out = torch_model(t_tokens[:, :-1], labels=t_tokens[:, :-1])
      out.loss.backward()
      opt.step()
      opt.zero_grad()

  ours(2)  # compile
  theirs(1)
  times = {"ours": [], "torch": []}
  faults = {"ours": 0, "torch": 0}  # minor page faults: first touches of new host memory
  for _ in range(args.rounds):
    for name, fn in (("ours", ours), ("torch", theirs)):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      fn(args.steps)
      times[name].append((time.perf_counter() - start) / args.steps)
      faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
  flops_per_token = 3 * summary.forward_flops(config, args.seq)["total"]  # fwd + 2x bwd
  tok = args.batch * args.seq
  best = {k: min(v) for k, v in times.items()}
  print(f"devices: {jax.devices()[0].platform} x1, torch threads {torch.get_num_threads()}, "
        f"config {args.config}, batch {args.batch} x seq {args.seq}, "
        f"load average before / after {load_before:.2f} / {os.getloadavg()[0]:.2f} "
        f"(1-minute; {os.cpu_count()} cores); malloc on huge pages: {hostmem.active()}")
  for lib in ("jax", "torch"):
    shapes = ", ".join(f"{m}x{k}x{n} {r / 1e9:.0f}" for (m, k, n), r in zip(PEAK_SHAPES, peaks[lib]))
    print(f"{lib:5s} float32 GEMM GFLOP/s, measured first: {shapes}")
  for name in ("ours", "torch"):
    print(f"{name:6s} step {best[name] * 1e3:8.1f} ms   {tok / best[name]:10.0f} tokens/s   "
          f"rounds {[round(t * 1e3, 1) for t in times[name]]} ms   "
          f"{faults[name] / (args.rounds * args.steps):.0f} page faults/step")
  speedup = best["torch"] / best["ours"]
  print(f"speed-up ours / torch: {speedup:.2f}x")
  mfu = {k: 100 * flops_per_token * tok / best[k] / peak for k in best}
  print(f"model FLOPs per token (training): {flops_per_token / 1e6:.2f} MFLOP; MFU of the "
        f"best measured GEMM rate ({peak / 1e9:.0f} GFLOP/s, jnp.dot): ours {mfu['ours']:.1f}%, "
        f"torch {mfu['torch']:.1f}% (of torch.mm's own best, {max(peaks['torch']) / 1e9:.0f} "
        f"GFLOP/s: {100 * flops_per_token * tok / best['torch'] / max(peaks['torch']):.1f}%)")
  # Both run the same model FLOPs, so a speed-up s over torch means s times torch's MFU.
  print(f"a {args.target:.1f}x speed-up would need ours at {args.target * mfu['torch']:.1f}% MFU")
  # What XLA's own GEMMs allow at this model's shapes: every dot of the compiled step
  # timed alone. A step made of nothing else would take that long.
  floor, dot_flops, count = matmul_floor(trainer.compile_train_step().as_text())
  print(f"the compiled step's {count} dots ({dot_flops / 1e9:.2f} GFLOP; analytic "
        f"{flops_per_token * tok / 1e9:.2f}) take {floor * 1e3:.1f} ms when each runs alone "
        f"({dot_flops / floor / 1e9:.0f} GFLOP/s, {100 * dot_flops / floor / peak:.0f}% of the peak): "
        f"the rest of our step is {(best['ours'] - floor) * 1e3:.1f} ms; a step of dots alone "
        f"would be {best['torch'] / floor:.2f}x torch at {100 * flops_per_token * tok / floor / peak:.1f}% MFU")


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # malloc on huge pages: see nemotron_jax/hostmem.py
  os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
  main()
