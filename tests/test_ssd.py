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
