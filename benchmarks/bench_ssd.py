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

from nemotron_jax import hostmem
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


def kernel_cost(b, l, h, p, n, g, q, in_bytes, t_fwd=64, t_bwd=32, bp=32):
  """FLOPs and HBM bytes of each launch of one forward+backward, counted from the algorithm.

  The Pallas kernels of `nemotron_jax.kernels.ssd` at token tiles t_fwd / t_bwd and
  head_dim tile bp (its defaults), and the XLA parts they rely on: C.B^T per chunk
  and group (and, in the backward, dB and dC from dL/dCB). Matmul FLOPs are 2*M*N*K;
  elementwise work is one FLOP per element per operation (exp as one), listed apart
  because it runs on CUDA cores whatever the dot precision; (query, key) block pairs
  above the diagonal are skipped. Bytes are what each program loads and stores,
  with no reuse through L2. x and B, C take `in_bytes` per element; dt, acum and
  the other [b l h] weights, states, C.B^T, y, dy and ids are 4 bytes.
  """
  nc, f, s = l // q, 4, in_bytes
  ch, cg = b * nc * h, b * nc * g  # (chunk, head) and (chunk, group) pairs
  nf, nb = q // t_fwd, q // t_bwd
  pt = p // bp
  pairs_f, pairs_b = nf * (nf + 1) // 2, nb * (nb + 1) // 2  # causal (query, key) block pairs
  decay_ew = 6  # position and run compares, select, subtract, exp, product with C.B^T
  kernels = []

  def add(name, mm, ew, nbytes):
    kernels.append((name, mm, ew, nbytes))

  cb = (cg * 2 * q * q * n, 0, 2 * b * l * g * n * s + cg * q * q * f)
  chunk_state = (ch * 2 * q * p * n, ch * q * p,
                 ch * (q * p * s + pt * (q * f + q * n * s) + p * n * f))
  state_pass = (0, b * h * nc * 2 * p * n, b * h * (nc * (2 * p * n * f + pt * f) + 2 * p * n * f))
  # Forward.
  add("fwd C.B^T (XLA)", *cb)
  add("fwd chunk_state", *chunk_state)
  add("fwd state_pass", *state_pass)
  add("fwd chunk_scan",
      ch * (2 * q * n * p + pairs_f * 2 * t_fwd * t_fwd * p),
      ch * pt * pairs_f * (decay_ew * t_fwd * t_fwd + t_fwd * bp),
      ch * pt * (nf * (t_fwd * n * s + bp * n * f + 2 * t_fwd * f + t_fwd * bp * f)
                 + pairs_f * (t_fwd * t_fwd * f + t_fwd * bp * s + 3 * t_fwd * f)))
  # Backward: C.B^T, the chunk states and the entering states are recomputed, never stored.
  add("bwd C.B^T (XLA, recompute)", *cb)
  add("bwd chunk_state (recompute)", *chunk_state)
  add("bwd state_pass (recompute)", *state_pass)
  add("bwd chunk_state (u)", ch * 2 * q * p * n, ch * q * p,
      ch * (q * p * f + pt * (q * f + q * n * s) + p * n * f))
  add("bwd state_pass_bwd", 0, b * h * nc * 5 * p * n,
      b * h * (nc * (3 * p * n * f + 2 * pt * f) + 2 * p * n * f))
  add("bwd chunk_pair", ch * pairs_b * 2 * t_bwd * t_bwd * p,
      ch * pairs_b * ((decay_ew + 4) * t_bwd * t_bwd + t_bwd * p),
      cg * pairs_b * 2 * t_bwd * t_bwd * f
      + ch * pairs_b * (t_bwd * p * (f + s) + 2 * t_bwd * f + 4 * t_bwd * f))
  add("bwd chunk_token", ch * (pairs_b * 2 * t_bwd * t_bwd * p + 4 * q * n * p),
      ch * pt * (pairs_b * (decay_ew * t_bwd * t_bwd) + nb * 8 * t_bwd * bp),
      ch * pt * (pairs_b * (t_bwd * t_bwd * f + t_bwd * bp * f + 2 * t_bwd * f)
                 + nb * (2 * t_bwd * n * s + 2 * bp * n * f + t_bwd * bp * (2 * s + f) + 6 * t_bwd * f)))
  group = (ch * 2 * q * p * n, ch * q * p, b * l * (h * p * (s + f) + h * f + g * n * f) + ch * p * n * f)
  add("bwd group dB", *group)
  add("bwd group dC", *group)
  add("bwd dB, dC from dCB (XLA)", 2 * cg * 2 * q * q * n, 0,
      cg * q * q * f + 2 * b * l * g * n * (s + f))
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
  print("The in-kernel dots are IEEE float32 by default (precision='float32'); "
        "precision='tf32' or 'bf16' (model.mamba.kernel.precision) uses tensor cores.")


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
  hostmem.reexec_with_huge_pages()  # malloc on huge pages: see nemotron_jax/hostmem.py
  main()
