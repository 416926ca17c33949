"""The chunked SSD equals the sequential recurrence, in values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.layers import ssd

B, L, H, P, G, N = 2, 37, 4, 8, 2, 16


def inputs(seed=0, groups=G):
  k = jax.random.split(jax.random.PRNGKey(seed), 7)
  x = jax.random.normal(k[0], (B, L, H, P))
  dt = jax.nn.softplus(jax.random.normal(k[1], (B, L, H)) - 1.0)
  A = -jnp.exp(jax.random.uniform(k[2], (H,), minval=-1.0, maxval=1.5))
  Bm = jax.random.normal(k[3], (B, L, groups, N))
  Cm = jax.random.normal(k[4], (B, L, groups, N))
  D = jax.random.normal(k[5], (H,))
  s0 = jax.random.normal(k[6], (B, H, P, N))
  return x, dt, A, Bm, Cm, D, s0


SEGMENTS = jnp.array([[1] * 10 + [2] * 20 + [3] * 7, [4] * 3 + [9] * 34])


def loss_fn(fn, with_state):
  def loss(x, dt, A, Bm, Cm, D, s0):
    y, final = fn(x, dt, A, Bm, Cm, D, s0 if with_state else None)
    w = jnp.sin(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    return jnp.sum(y * w) + jnp.sum(final * jnp.cos(final))
  return loss


@pytest.mark.parametrize("chunk", [4, 8, 16, 64])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("segments", [False, True])
def test_chunked_matches_sequential(chunk, with_state, segments):
  args = inputs()
  seg = SEGMENTS if segments else None
  chunked = lambda *a: ssd.ssd_chunked(*a[:6], chunk_size=chunk, initial_state=a[6], segment_ids=seg)
  seq = lambda *a: ssd.ssd_sequential(*a[:6], initial_state=a[6], segment_ids=seg)
  y1, f1 = chunked(*args[:6], args[6] if with_state else None)
  y2, f2 = seq(*args[:6], args[6] if with_state else None)
  # float32 sums over <= 37 steps of O(1) terms: errors of a few ulp times the length.
  np.testing.assert_allclose(y1, y2, atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(f1, f2, atol=2e-5, rtol=1e-5)
  g1 = jax.grad(loss_fn(chunked, with_state), argnums=range(7))(*args)
  g2 = jax.grad(loss_fn(seq, with_state), argnums=range(7))(*args)
  for name, a, b in zip("x dt A B C D s0".split(), g1, g2):
    np.testing.assert_allclose(a, b, atol=2e-4, rtol=2e-4, err_msg=name)


def test_one_group_per_head_and_single_group():
  for groups in (1, H):
    args = inputs(1, groups)
    y1, f1 = ssd.ssd_chunked(*args[:6], chunk_size=8, initial_state=args[6])
    y2, f2 = ssd.ssd_sequential(*args[:6], initial_state=args[6])
    np.testing.assert_allclose(y1, y2, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(f1, f2, atol=2e-5, rtol=1e-5)


def test_segments_reset_state():
  x, dt, A, Bm, Cm, D, _ = inputs(2)
  y, _ = ssd.ssd_chunked(x, dt, A, Bm, Cm, D, chunk_size=8, segment_ids=SEGMENTS)
  alone, _ = ssd.ssd_chunked(x[:1, 10:30], dt[:1, 10:30], A, Bm[:1, 10:30], Cm[:1, 10:30], D,
                             chunk_size=8)
  np.testing.assert_allclose(y[:1, 10:30], alone, atol=2e-5, rtol=1e-5)
  whole, _ = ssd.ssd_chunked(x, dt, A, Bm, Cm, D, chunk_size=8)
  assert np.abs(np.asarray(whole[:1, 10:30] - alone)).max() > 1e-2  # without reset it differs


def test_decode_step_continues_the_scan():
  x, dt, A, Bm, Cm, D, s0 = inputs(3)
  y, final = ssd.ssd_chunked(x, dt, A, Bm, Cm, D, chunk_size=8, initial_state=s0)
  state = s0
  for t in range(L):
    y_t, state = ssd.ssd_decode_step(state, x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D)
    np.testing.assert_allclose(y_t, y[:, t], atol=2e-5, rtol=1e-5)
  np.testing.assert_allclose(state, final, atol=2e-5, rtol=1e-5)


# Run ids that change exactly where a block of 2 chunks of 8 starts (token 16), inside the
# first chunk of a block of 3 chunks of 4 (token 25) and mid-chunk elsewhere (token 3).
BLOCK_SEGMENTS = jnp.array([[1] * 16 + [2] * 9 + [3] * 12, [4] * 3 + [9] * 34])


def values_and_grads(fn, args):
  """jit of (y, final state, gradients of loss_fn w.r.t. all seven inputs, the state included)."""
  def run(*a):
    y, final = fn(*a)
    return y, final, jax.grad(loss_fn(fn, True), argnums=range(7))(*a)
  return jax.jit(run)(*args)


@pytest.mark.parametrize("chunk,block,segments", [(4, 3, True), (8, 2, True), (8, 2, False)])
def test_blocked_recompute_matches_sequential(chunk, block, segments):
  """Blocks of chunks with the recomputing VJP: equal values and gradients (initial state
  included), with a shorter last block and, in (8, 2), a segment starting exactly at a block."""
  args = inputs(4)
  seg = BLOCK_SEGMENTS if segments else None
  blocked = lambda *a: ssd.ssd_chunked(*a[:6], chunk_size=chunk, initial_state=a[6],
                                       segment_ids=seg, block_chunks=block)
  single = lambda *a: ssd.ssd_chunked(*a[:6], chunk_size=chunk, initial_state=a[6],
                                      segment_ids=seg, block_chunks=10 ** 6)
  seq = lambda *a: ssd.ssd_sequential(*a[:6], initial_state=a[6], segment_ids=seg)
  got, want, ref = [values_and_grads(fn, args) for fn in (blocked, single, seq)]
  # Blocked and single pass do the same float32 arithmetic but for the order of the
  # state sums between blocks; the sequential scan differs by rounding as above.
  for name, a, b, c in zip(["y", "final"] + [f"d{n}" for n in "x dt A B C D s0".split()],
                           jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(ref)):
    tol = 2e-5 if name in ("y", "final") else 2e-4
    np.testing.assert_allclose(a, b, atol=tol / 10, rtol=tol / 10, err_msg=name)
    np.testing.assert_allclose(a, c, atol=tol, rtol=tol, err_msg=name)


def test_blocked_recompute_keeps_bfloat16_inputs():
  """16-bit inputs travel through the block scan as raw bits: same results as the single pass."""
  args = list(inputs(5))
  for i in (0, 3, 4):  # x, B, C as a bfloat16 model hands them over
    args[i] = args[i].astype(jnp.bfloat16)
  blocked = lambda *a: ssd.ssd_chunked(*a[:6], chunk_size=4, initial_state=a[6],
                                       segment_ids=BLOCK_SEGMENTS, block_chunks=3)
  single = lambda *a: ssd.ssd_chunked(*a[:6], chunk_size=4, initial_state=a[6],
                                      segment_ids=BLOCK_SEGMENTS)
  got, want = [values_and_grads(fn, args) for fn in (blocked, single)]
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert a.dtype == b.dtype
    # float32 arithmetic on both sides; the bfloat16 gradients may round to a neighbour.
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=1e-4, rtol=1e-2)


def ssd_grad_temp(seq_len, block_chunks):
  """Compiled temp bytes of the gradient of one Nano-shaped SSD (64 heads x 64, 8 groups, N 128,
  chunk 128, bfloat16 x, B, C as the model hands them over), from abstract inputs."""
  h, p, g, n = 64, 64, 8, 128
  shapes = [((1, seq_len, h, p), jnp.bfloat16), ((1, seq_len, h), jnp.float32), ((h,), jnp.float32),
            ((1, seq_len, g, n), jnp.bfloat16), ((1, seq_len, g, n), jnp.bfloat16), ((h,), jnp.float32)]

  def loss(*a):
    y, final = ssd.ssd_chunked(*a, chunk_size=128, block_chunks=block_chunks)
    return jnp.sum(y * y) + jnp.sum(final)

  args = [jax.ShapeDtypeStruct(*s) for s in shapes]
  compiled = jax.jit(jax.grad(loss, argnums=range(6))).lower(*args).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_blocked_recompute_saves_no_quadratic_tensors():
  """At Nano's SSD shape the default blocks cut the backward's temp to a fraction of the single
  pass, which keeps float32 [b c g r q q] decay and score products (256 MiB each at 8k)."""
  single = {t: ssd_grad_temp(t, 10 ** 6) for t in (4096, 8192)}
  blocked = {t: ssd_grad_temp(t, None) for t in (4096, 8192)}
  # Measured here: 583 MiB against 2790 MiB at 8k; per extra 4k tokens 133 MiB against 1396 MiB.
  assert blocked[8192] <= single[8192] / 3, (blocked, single)
  assert blocked[8192] - blocked[4096] <= (single[8192] - single[4096]) / 5, (blocked, single)
