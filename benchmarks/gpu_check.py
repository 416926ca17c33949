"""One prepared device check of the Pallas SSD kernels and the train step, for a CUDA machine.

Sections, in this order, each printing one line per measurement:
  1. Environment: jax / jaxlib versions, the device and its dense bf16 peak (table below).
  2. SSD at the Mamba shapes of Nemotron 3 Nano (64 x 64), Nemotron Nano v2 (128 x 80) and
     Nemotron-H 8B (128 x 64), all with 8 groups, d_state 128 and chunk 128, with float32
     and bfloat16 inputs: forward + backward of `ssd_pallas` against `ssd_chunked` at full
     float32 matmul precision (the largest error of y, the final state and every gradient,
     relative to the largest reference value), for the kernels' float32 dots and, with
     bf16 inputs, their bf16 dots; then the best time of each and its TFLOP/s (3x the
     forward model FLOPs of `summary.ssd_flops`) against the bf16 peak.
  3. A `configs/small.py` train step (bf16 compute) with each `mamba.ssd_impl`: time,
     tokens/s, model TFLOP/s against the peak.
  4. pytest of the test files that need no torch, under this machine's JAX on its CPU
     (JAX_PLATFORMS=cpu: the tests simulate 8 CPU devices), one process per file, several at
     once, within what is left of --budget (files not finished by then are listed).
Exit status 1 if a value check fails or pytest does.

--dry-run runs the same code on any machine at tiny shapes, trimmed to what the tests can
afford: the Pallas interpreter on bfloat16 inputs only, train steps of configs/tiny_mamba.py
reduced to one layer with ssd_impl xla and pallas, and no pytest (the tests run the dry run).

Needs nemotron_jax importable with ml-collections; the data / train-loop test files also
import grain and tensorboardX. Usage, from the repository root:
  python benchmarks/gpu_check.py [--length 8192] [--repeats 5] [--budget 300]
  python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (heads, head_dim, groups, d_state, chunk) of the published Mamba layers.
SHAPES = {"nano3": (64, 64, 8, 128, 128), "nano_v2": (128, 80, 8, 128, 128),
          "nemotron_h_8b": (128, 64, 8, 128, 128)}
DRY_SHAPES = {"tiny_odd": (4, 12, 2, 24, 24)}

# Dense bf16 tensor-core peaks from NVIDIA's datasheets (sparse figures are 2x), by the
# longest name found in the device kind.
BF16_PEAKS = {"H200": 989e12, "H100": 989e12, "H100 PCIE": 756e12, "H800": 989e12, "A100": 312e12,
              "L40S": 362e12, "L4": 121e12, "B200": 2250e12, "GB200": 2500e12}

# Largest error relative to the largest reference value (see check_ssd).
TOLERANCE = {"float32": 2e-4, "float32 reductions": 2e-3, "bfloat16": 3e-2}


def bf16_peak(kind: str) -> float | None:
  kind = kind.upper()
  names = [name for name in BF16_PEAKS if name in kind]
  return BF16_PEAKS[max(names, key=len)] if names else None


def best_time(fn, args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def rel_err(actual, expected) -> float:
  expected = np.asarray(expected, np.float64)
  return float(np.max(np.abs(np.asarray(actual, np.float64) - expected))
               / max(np.max(np.abs(expected)), 1e-30))


def ssd_inputs(b, l, h, p, g, n, dtype, seed=0):
  """Realistic SSD inputs (dt ~ softplus(N(-1, 1)), A in [-4.5, -1]), two documents per row,
  and fixed cotangents for y and the final state."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  x, B, C = (normal(*s).astype(dtype) for s in ((b, l, h, p), (b, l, g, n), (b, l, g, n)))
  dt = jax.nn.softplus(normal(b, l, h) - 1.0).astype(dtype)
  A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 1.5, h), jnp.float32))
  seg = jnp.asarray(np.repeat([[0] * (l // 3) + [1] * (l - l // 3)], b, axis=0), jnp.int32)
  args = (x, dt, A, B, C, normal(h), normal(b, h, p, n))
  return args, seg, (normal(b, l, h, p), normal(b, h, p, n))


def fwd_bwd(impl, chunk, **kw):
  """jit of (inputs, segment ids, cotangents) -> (y, final state, gradients of all 7 inputs)."""
  def run(args, seg, cot):
    def f(x, dt, A, B, C, D, init):
      return impl(x, dt, A, B, C, D, chunk_size=chunk, initial_state=init, segment_ids=seg, **kw)
    (y, final), pullback = jax.vjp(f, *args)
    return y, final, pullback(cot)
  return jax.jit(run)


def ssd_model_flops(h, p, g, n, q, l):
  """Forward + backward model FLOPs of one SSD call (3x the forward count of summary.ssd_flops)."""
  from nemotron_jax import config as config_lib, summary
  m = config_lib.model_config()
  m.mamba.num_heads, m.mamba.head_dim, m.mamba.n_groups, m.mamba.d_state = h, p, g, n
  m.mamba.chunk_size = q
  return 3 * summary.ssd_flops(m, l) * l


def check_ssd(args, peak) -> int:
  """Section 2. Returns the number of failed value checks."""
  from nemotron_jax.kernels.ssd import ssd_pallas
  from nemotron_jax.layers.ssd import ssd_chunked

  print("== SSD forward + backward: ssd_pallas vs ssd_chunked (reference at float32 precision)")
  failures = 0
  shapes = DRY_SHAPES if args.dry_run else SHAPES
  for shape, (h, p, g, n, q) in shapes.items():
    for dtype in (jnp.bfloat16,) if args.dry_run else (jnp.float32, jnp.bfloat16):
      inputs = ssd_inputs(args.batch, args.length, h, p, g, n, dtype)
      flops = ssd_model_flops(h, p, g, n, q, args.length) * args.batch
      with jax.default_matmul_precision("highest"):
        ref_fn = fwd_bwd(ssd_chunked, q)
        want = ref_fn(*inputs)
        ref_time = best_time(ref_fn, inputs, args.repeats)
      label = (f"{shape} (h={h} p={p} g={g} n={n} chunk={q}) {jnp.dtype(dtype).name:8s} "
               f"b={args.batch} l={args.length}")

      def rate(t):
        share = f" ({100 * flops / t / peak:5.1f}% of bf16 peak)" if peak else ""
        return f"{flops / t / 1e12:7.2f} TFLOP/s{share}"

      print(f"{label}  xla      {ref_time * 1e3:9.2f} ms {rate(ref_time)}")
      precisions = ("float32", "bf16") if dtype == jnp.bfloat16 else ("float32",)
      for precision in precisions:
        fn = fwd_bwd(ssd_pallas, q, interpret=args.dry_run, precision=precision)
        got = fn(*inputs)
        errors = {"y": rel_err(got[0], want[0]), "final": rel_err(got[1], want[1])}
        errors.update({f"d{name}": rel_err(a, b)
                       for name, a, b in zip(("x", "dt", "A", "B", "C", "D", "init"), got[2], want[2])})
        # bf16 inputs have bf16 gradients, rounded to 2^-8 relative; bf16 dots round operands
        # alike. dA and dD sum every token and head_dim entry: longer float32 reductions.
        def tolerance(name):
          if precision == "bf16" or (dtype == jnp.bfloat16 and name in ("dx", "ddt", "dB", "dC")):
            return TOLERANCE["bfloat16"]
          return TOLERANCE["float32 reductions" if name in ("dA", "dD") else "float32"]
        bad = [name for name, e in errors.items() if not e <= tolerance(name)]
        failures += bool(bad)
        t = best_time(fn, inputs, args.repeats)
        worst = max(errors, key=errors.get)
        print(f"{label}  pallas/{precision:7s} {t * 1e3:9.2f} ms {rate(t)}  x{ref_time / t:5.2f} vs xla  "
              f"max rel err {errors[worst]:.1e} ({worst})  {'FAIL ' + str(bad) if bad else 'ok'}")
  return failures


def time_train_steps(args, peak):
  """Section 3."""
  from nemotron_jax import build_model, load_config, sharding, summary
  from nemotron_jax.train_lib import Trainer

  preset = "tiny_mamba.py" if args.dry_run else "small.py"
  print(f"== train step, configs/{preset}{' (one layer)' if args.dry_run else ''}, "
        f"batch {args.train_batch} x seq {args.train_seq}, bf16 compute")
  for impl in ("xla", "pallas") if args.dry_run else ("xla", "pallas", "sequential"):
    config = load_config(os.path.join(ROOT, "configs", preset))
    if args.dry_run:
      config.model.pattern = "M"
    config.model.compute_dtype = "bfloat16"
    config.model.mamba.ssd_impl = impl
    config.model.mamba.kernel.interpret = args.dry_run
    config.train.batch_size, config.data.seq_len = args.train_batch, args.train_seq
    config.train.warmup_steps = 0
    trainer = Trainer(config, build_model(config), sharding.make_mesh(config.mesh, jax.devices()[:1]))
    state = trainer.init_state(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.model.vocab_size, (args.train_batch, args.train_seq + 1))
    shape = (args.train_batch, args.train_seq)
    batch = trainer.shard_batch({
        "inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32),
        "segment_ids": np.ones(shape, np.int32), "loss_mask": np.ones(shape, np.float32)})

    def steps(n):
      nonlocal state
      for _ in range(n):
        state, metrics = trainer.train_step(state, batch)
      return float(jax.block_until_ready(metrics["loss"]))

    start = time.perf_counter()
    steps(2)  # compile and warm up
    warm = time.perf_counter() - start
    start = time.perf_counter()
    loss = steps(args.repeats)
    t = (time.perf_counter() - start) / args.repeats
    tok = args.train_batch * args.train_seq
    flops = 3 * summary.forward_flops(config, args.train_seq)["total"] * tok
    share = f" ({100 * flops / t / peak:5.1f}% of bf16 peak)" if peak else ""
    print(f"ssd_impl={impl:10s} step {t * 1e3:9.2f} ms  {tok / t:11.0f} tokens/s  "
          f"{flops / t / 1e12:7.3f} TFLOP/s{share}  loss {loss:.4f}  (compile + 2 steps {warm:.1f} s)")


def torch_free_tests() -> list[str]:
  folder = os.path.join(ROOT, "tests")
  files = sorted(f for f in os.listdir(folder) if re.fullmatch(r"test_\w+\.py", f))
  needs_torch = re.compile(r"^\s*(import|from)\s+(torch|transformers)\b"
                           r"|importorskip\(\s*[\"'](torch|transformers)\b", re.M)
  return [os.path.join("tests", f) for f in files
          if not needs_torch.search(open(os.path.join(folder, f)).read())]


def run_tests(args, deadline) -> int:
  """Section 4: one pytest process per file, several at once. Returns 0 when every file passed."""
  files = torch_free_tests()
  left = max(30, int(deadline - time.monotonic()))
  workers = max(1, min(8, (os.cpu_count() or 2) // 2))
  print(f"== pytest under jax {jax.__version__} (JAX_PLATFORMS=cpu), {len(files)} files, {workers} at a time, "
        f"{left} s left: " + " ".join(os.path.basename(f) for f in files), flush=True)
  if args.dry_run:
    print("(dry run: not started)")
    return 0
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  pending, running, failed = list(files), {}, []
  end = time.monotonic() + left
  while (pending or running) and time.monotonic() < end:
    while pending and len(running) < workers:
      f = pending.pop(0)
      # A file, not a pipe, takes the output: a full pipe would stall a verbose failure.
      log = tempfile.TemporaryFile("w+")
      proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider", f],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
                              start_new_session=True)
      running[f] = (proc, log, time.monotonic())
    for f, (proc, log, started) in list(running.items()):
      if proc.poll() is None:
        continue
      log.seek(0)
      out = log.read()
      log.close()
      del running[f]
      summary = out.strip().splitlines()[-1] if out.strip() else ""
      print(f"{os.path.basename(f):24s} exit {proc.returncode}  {time.monotonic() - started:6.1f} s  {summary}",
            flush=True)
      if proc.returncode:
        failed.append(f)
        print("\n".join(out.splitlines()[-40:]))
    time.sleep(0.5)
  for f, (proc, log, _) in running.items():
    os.killpg(proc.pid, signal.SIGKILL)  # the file's pytest and any processes its tests started
    log.close()
  unfinished = list(running) + pending
  if unfinished:
    print(f"budget spent; not finished: {' '.join(os.path.basename(f) for f in unfinished)} (raise --budget)")
  return int(bool(failed or unfinished))


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--dry-run", action="store_true")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--length", type=int, default=None, help="SSD tokens per row (default 8192; dry run 40)")
  parser.add_argument("--repeats", type=int, default=None, help="timed calls (default 5; dry run 1)")
  parser.add_argument("--train-batch", type=int, default=None, help="default 8; dry run 2")
  parser.add_argument("--train-seq", type=int, default=None, help="default 1024; dry run 32")
  parser.add_argument("--budget", type=float, default=300.0, help="seconds for the whole check")
  args = parser.parse_args(argv)
  dry = args.dry_run
  args.length = args.length or (40 if dry else 8192)
  args.repeats = args.repeats or (1 if dry else 5)
  args.train_batch = args.train_batch or (2 if dry else 8)
  args.train_seq = args.train_seq or (32 if dry else 1024)
  deadline = time.monotonic() + args.budget

  import jaxlib
  device = jax.devices()[0]
  peak = bf16_peak(device.device_kind)
  print(f"== jax {jax.__version__}, jaxlib {jaxlib.__version__}, {device.platform} {device.device_kind} "
        f"x{jax.device_count()}, dense bf16 peak "
        + (f"{peak / 1e12:.0f} TFLOP/s" if peak else "unknown (not in BF16_PEAKS)"))
  if not dry and device.platform != "gpu":
    print(f"no CUDA device (found {device.platform}): run with --dry-run, or on a CUDA machine")
    return 1
  start = time.monotonic()
  failures = check_ssd(args, peak)
  print(f"(SSD section {time.monotonic() - start:.0f} s)")
  start = time.monotonic()
  time_train_steps(args, peak)
  print(f"(train-step section {time.monotonic() - start:.0f} s)", flush=True)
  status = run_tests(args, deadline)
  print(f"== gpu_check: {failures} SSD value check(s) failed; pytest {'failed' if status else 'passed'}")
  return int(failures > 0 or status != 0)


if __name__ == "__main__":
  sys.exit(main())
