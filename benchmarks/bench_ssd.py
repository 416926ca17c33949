"""SSD scan benchmark: measured scaling of the jnp paths, analytic cost of the Pallas kernels.

Part 1 times forward+backward (jit of value_and_grad w.r.t. x, dt, A, B, C, D
and the initial state) of `ssd_chunked` and `ssd_sequential` on this machine
over sequence lengths 1k..32k and fits the log-log slope of time vs length.
Part 2 counts FLOPs and HBM bytes of one call of the Pallas kernels in
`nemotron_jax.kernels.ssd` at a Nemotron 3 Nano Mamba layer and places them on
an H100 SXM roofline. The Pallas kernels are not timed: on CPU they only run
in the interpreter, which measures nothing about the GPU kernel.

Usage: python benchmarks/bench_ssd.py [--max-seq-sequential 32768] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.layers.ssd import ssd_chunked, ssd_sequential

# H100 SXM5 dense peaks (NVIDIA datasheet; the sparse figures are 2x) and HBM3 bandwidth.
H100_FLOPS = {"bf16 tensor": 989e12, "tf32 tensor": 494.7e12, "fp32 cuda-core": 66.9e12}
H100_HBM = 3.35e12


def make_inputs(b, l, h, p, n, g, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  dt = jax.nn.softplus(normal(b, l, h) - 2.0)
  A = -jnp.exp(jnp.asarray(rng.uniform(0.0, 2.7, h), jnp.float32))
  return (normal(b, l, h, p), dt, A, normal(b, l, g, n), normal(b, l, g, n), normal(h),
          normal(b, h, p, n))


def fwd_bwd(impl, **kw):
  """jit of value_and_grad of a scalar loss of (y, final state) w.r.t. all float inputs."""
  def loss(x, dt, A, B, C, D, init):
    y, final = impl(x, dt, A, B, C, D, initial_state=init, **kw)
    return jnp.mean(y * y) + jnp.mean(final * final)
  return jax.jit(jax.value_and_grad(loss, argnums=tuple(range(7))))


def best_time(fn, args, repeats):
  jax.block_until_ready(fn(*args))  # compile and warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def scaling(args):
  b, h, p, n, g, q = 1, 4, 32, 32, 1, 64
  print(f"== Part 1: forward+backward wall time on {jax.devices()[0].device_kind} "
        f"({jax.local_device_count()} device, best of {args.repeats})")
  print(f"shape: b={b} h={h} head_dim={p} d_state={n} n_groups={g} chunk={q}, float32")
  lengths = [1024, 2048, 4096, 8192, 16384, 32768]
  paths = {"chunked (XLA)": fwd_bwd(ssd_chunked, chunk_size=q), "sequential (scan)": fwd_bwd(ssd_sequential)}
  results = {name: {} for name in paths}
  print(f"{'length':>8} " + " ".join(f"{name:>20}" for name in paths))
  for l in lengths:
    inputs = make_inputs(b, l, h, p, n, g)
    row = []
    for name, fn in paths.items():
      if name.startswith("sequential") and l > args.max_seq_sequential:
        row.append(f"{'skipped':>20}")
        continue
      results[name][l] = best_time(fn, inputs, args.repeats)
      row.append(f"{results[name][l] * 1e3:>18.1f}ms")
    print(f"{l:>8} " + " ".join(row))
  for name, res in results.items():
    ls = np.array(sorted(res))
    slope = np.polyfit(np.log(ls), np.log([res[l] for l in ls]), 1)[0]
    print(f"log-log exponent, {name}: {slope:.2f} (lengths {ls[0]}..{ls[-1]})")


def kernel_cost(b, l, h, p, n, g, q, in_bytes):
  """FLOPs and HBM bytes of each Pallas kernel launch of one forward+backward, counted from the algorithm.

  Matmul FLOPs are 2*M*N*K. Elementwise work is counted one FLOP per element
  per operation (exp as one); it is listed separately because it runs on CUDA
  cores whatever the dot precision. Bytes are what each program loads and
  stores, assuming no reuse through L2 (B and C are read once per head by the
  chunk-state kernel, once per group by the scan kernels). x, B, C, dx, dB, dC
  take `in_bytes` per element; dt, A, D, states, y, dy and ids are 4 bytes.
  """
  nc, f = l // q, 4
  s = in_bytes
  chunk_heads, chunk_groups = b * nc * h, b * nc * g
  weights_ew = 2 * q * q + 8 * q  # masked cumsum (select+add per element) and the O(Q) weights
  decay_ew = 5 * q * q  # mask compare, select, subtract, exp, per element
  kernels = []

  def add(name, mm, ew, nbytes):
    kernels.append((name, mm, ew, nbytes))

  # Forward.
  add("fwd chunk_state", chunk_heads * 2 * q * p * n, chunk_heads * (weights_ew + 2 * q * p),
      chunk_heads * (q * p * s + q * f + q * n * s + q * 4 + p * n * f))
  state_pass = (0, b * h * nc * (2 * p * n + 2 * q),
                b * h * (nc * (2 * p * n * f + q * f + q * 4) + 2 * p * n * f))
  add("fwd state_pass", *state_pass)
  add("fwd chunk_scan",
      chunk_groups * 2 * q * q * n + chunk_heads * (2 * q * q * p + 2 * q * n * p),
      chunk_heads * (weights_ew + decay_ew + q * q + 5 * q * p),
      chunk_groups * (2 * q * n * s + q * 4) + chunk_heads * (q * p * s + q * f + p * n * f + q * p * f))
  # Backward: the chunk states and entering states are recomputed, never stored.
  add("bwd chunk_state (+u)", chunk_heads * 4 * q * p * n, chunk_heads * (weights_ew + 4 * q * p),
      chunk_heads * (q * p * (s + f) + q * f + 2 * q * n * s + q * 4 + 2 * p * n * f))
  add("bwd state_pass (recompute)", *state_pass)
  add("bwd state_pass_bwd", *state_pass)
  add("bwd chunk_scan_bwd",
      chunk_groups * 2 * q * q * n + chunk_heads * (8 * q * p * n + 4 * q * q * p + 4 * q * q * n),
      chunk_heads * (weights_ew + decay_ew + 8 * q * q + 14 * q * p + 2 * q * n),
      chunk_groups * (4 * q * n * s + q * 4)
      + chunk_heads * (q * p * (2 * s + f) + q * f * 4 + 2 * p * n * f))
  return kernels


def roofline(args):
  b, l, h, p, n, g, q = 1, args.seq, 64, 64, 128, 8, 128
  print("\n== Part 2: Pallas kernels, analytic cost per call at a Nemotron 3 Nano Mamba layer")
  print(f"shape: b={b} seq={l} heads={h} head_dim={p} d_state={n} n_groups={g} chunk={q}; "
        f"x/B/C in bf16 (2 B), dt, states, y in fp32")
  kernels = kernel_cost(b, l, h, p, n, g, q, in_bytes=2)
  print(f"{'kernel':<28}{'matmul GFLOP':>14}{'elementwise GFLOP':>19}{'MB':>10}{'FLOP/B':>9}")
  totals = {}
  for name, mm, ew, nbytes in kernels:
    print(f"{name:<28}{mm / 1e9:>14.3f}{ew / 1e9:>19.3f}{nbytes / 1e6:>10.1f}{(mm + ew) / nbytes:>9.1f}")
    part = name.split()[0]
    t = totals.setdefault(part, [0, 0, 0])
    for i, v in enumerate((mm, ew, nbytes)):
      t[i] += v
  totals["fwd+bwd"] = [a + c for a, c in zip(totals["fwd"], totals["bwd"])]
  for part, (mm, ew, nbytes) in totals.items():
    print(f"{'total ' + part:<28}{mm / 1e9:>14.3f}{ew / 1e9:>19.3f}{nbytes / 1e6:>10.1f}{(mm + ew) / nbytes:>9.1f}")

  mm, ew, nbytes = totals["fwd+bwd"]
  intensity = (mm + ew) / nbytes
  print(f"\nH100 SXM: HBM3 {H100_HBM / 1e12:.2f} TB/s; dense peaks "
        + ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" for k, v in H100_FLOPS.items()))
  print(f"fwd+bwd arithmetic intensity: {intensity:.1f} FLOP/byte; "
        f"memory time at peak bandwidth {nbytes / H100_HBM * 1e6:.1f} us")
  for unit, peak in H100_FLOPS.items():
    ridge = peak / H100_HBM
    bound = "memory-bound" if intensity < ridge else "compute-bound"
    t_compute = mm / peak + ew / H100_FLOPS["fp32 cuda-core"]
    print(f"  dots on {unit:<15} ridge {ridge:6.1f} FLOP/B -> {bound}; "
          f"roofline time max(compute {t_compute * 1e6:.1f} us, memory {nbytes / H100_HBM * 1e6:.1f} us)")
  print("The in-kernel dots are fp32 by default (precision=HIGHEST, IEEE on Triton); "
        "precision=DEFAULT lets Triton use TF32 tensor cores.")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max-seq-sequential", type=int, default=32768,
                      help="skip the sequential scan above this length")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--seq", type=int, default=8192, help="sequence length of the roofline shape")
  args = parser.parse_args()
  scaling(args)
  roofline(args)


if __name__ == "__main__":
  main()
