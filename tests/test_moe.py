"""Router selection against a brute-force reference; dropless experts against the dense one."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax.layers import moe

T, D, F, E, K = 24, 16, 12, 8, 3


def brute_force_route(logits, bias, top_k, n_group, topk_group, norm, scale):
  """Each token: try every set of kept groups, pick experts by biased score."""
  scores = 1 / (1 + np.exp(-logits))
  choice = scores + bias
  per = E // n_group
  weights, experts = [], []
  for s, c in zip(scores, choice):
    group_score = [np.sort(c[g * per:(g + 1) * per])[-2:].sum() for g in range(n_group)]
    kept = np.argsort(group_score)[::-1][:topk_group]
    allowed = [i for i in range(E) if i // per in kept]
    chosen = sorted(allowed, key=lambda i: -c[i])[:top_k]
    w = s[chosen]
    if norm:
      w = w / (w.sum() + 1e-20)
    weights.append(w * scale)
    experts.append(chosen)
  return np.array(weights), np.array(experts)


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (4, 2, True), (2, 1, False)])
def test_route_matches_brute_force(n_group, topk_group, norm):
  k = jax.random.split(jax.random.PRNGKey(n_group), 2)
  logits = np.asarray(jax.random.normal(k[0], (T, E)) * 2)
  bias = np.asarray(jax.random.normal(k[1], (E,)) * 0.3)
  w, idx, _ = moe.route(jnp.asarray(logits), jnp.asarray(bias), top_k=K if n_group < 4 else 2,
                        n_group=n_group, topk_group=topk_group, norm_topk_prob=norm,
                        routed_scaling=2.5)
  w_ref, idx_ref = brute_force_route(logits, bias, K if n_group < 4 else 2, n_group, topk_group,
                                     norm, 2.5)
  order = np.argsort(np.asarray(idx), axis=1)
  order_ref = np.argsort(idx_ref, axis=1)
  np.testing.assert_array_equal(np.take_along_axis(np.asarray(idx), order, 1),
                                np.take_along_axis(idx_ref, order_ref, 1))
  np.testing.assert_allclose(np.take_along_axis(np.asarray(w), order, 1),
                             np.take_along_axis(w_ref, order_ref, 1), rtol=1e-6)


def test_bias_changes_selection_but_not_weights():
  logits = jnp.zeros((1, E)).at[0, :].set(jnp.arange(E, dtype=jnp.float32))
  bias = jnp.zeros((E,)).at[0].set(100.0)
  w, idx, scores = moe.route(logits, bias, top_k=2, n_group=1, topk_group=1,
                             norm_topk_prob=False, routed_scaling=1.0)
  assert set(np.asarray(idx[0]).tolist()) == {0, 7}
  np.testing.assert_allclose(sorted(np.asarray(w[0])), sorted(np.asarray(scores[0, [0, 7]])))


def expert_inputs():
  k = jax.random.split(jax.random.PRNGKey(7), 5)
  x = jax.random.normal(k[0], (T, D))
  up = jax.random.normal(k[1], (E, D, F)) * 0.3
  down = jax.random.normal(k[2], (E, F, D)) * 0.3
  _, idx = jax.lax.top_k(jax.random.normal(k[3], (T, E)), K)
  w = jax.random.uniform(k[4], (T, K))
  # Leave expert 5 without tokens: empty groups must work.
  idx = jnp.where(idx == 5, 6, idx)
  return x, w, idx, up, down


@pytest.mark.parametrize("impl", ["ragged", "blocked"])
def test_dropless_matches_dense_values_and_gradients(impl):
  x, w, idx, up, down = expert_inputs()
  gmm = functools.partial(moe.plain_gmm, impl=impl)
  ragged = lambda x, w, up, down: moe.ragged_experts(x, w, idx, up, down, gmm=gmm)
  dense = lambda x, w, up, down: moe.dense_experts(x, w, idx, up, down)
  np.testing.assert_allclose(ragged(x, w, up, down), dense(x, w, up, down), atol=1e-5, rtol=1e-5)
  probe = jax.random.normal(jax.random.PRNGKey(1), (T, D))
  grads = [jax.grad(lambda *a: jnp.sum(f(*a) * probe), argnums=range(4))(x, w, up, down)
           for f in (ragged, dense)]
  for name, a, b in zip(["x", "weights", "up", "down"], *grads):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4, err_msg=name)


def test_load_and_balance_loss_by_hand():
  idx = jnp.array([[0, 1], [0, 2], [0, 1]])
  load = moe.expert_load(idx, 4)
  np.testing.assert_array_equal(load, [3, 2, 1, 0])
  scores = jnp.full((3, 4), 0.5)  # uniform normalised scores: P_i = 1/4
  # f = load * 4 / (2 * 3); sum f_i / 4 = sum(load) / 6 = 1.
  np.testing.assert_allclose(moe.balance_loss(scores, load, 2), 1.0, rtol=1e-6)


def test_blocked_dot_equals_ragged_dot_across_block_edges():
  k = jax.random.split(jax.random.PRNGKey(3), 2)
  x = jax.random.normal(k[0], (300, 8))
  w = jax.random.normal(k[1], (4, 8, 5))
  sizes = jnp.array([130, 0, 129, 31], jnp.int32)  # groups span blocks; 10 rows past the end
  out = moe.blocked_dot(x, w, sizes, block=64)
  np.testing.assert_allclose(out, jax.lax.ragged_dot(x, w, sizes), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out[290:], 0.0)


@pytest.mark.parametrize("gather_bytes", [10 ** 9, 3 * 8 * 5 * 4], ids=["batched", "chunks_of_3"])
def test_blocked_dot_values_and_gradients_in_one_step_or_chunks(gather_bytes):
  """The chunked scan (3 blocks of weights per step, 8 blocks in all) equals ragged_dot."""
  k = jax.random.split(jax.random.PRNGKey(4), 3)
  x = jax.random.normal(k[0], (300, 8))
  w = jax.random.normal(k[1], (4, 8, 5))
  probe = jax.random.normal(k[2], (300, 5))
  sizes = jnp.array([130, 0, 129, 31], jnp.int32)
  loss = lambda f: lambda x, w: jnp.sum(f(x, w) * probe)
  blocked = lambda x, w: moe.blocked_dot(x, w, sizes, block=64, gather_bytes=gather_bytes)
  ragged = lambda x, w: jax.lax.ragged_dot(x, w, sizes)
  np.testing.assert_allclose(blocked(x, w), ragged(x, w), atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.grad(loss(blocked), (0, 1))(x, w), jax.grad(loss(ragged), (0, 1))(x, w)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
