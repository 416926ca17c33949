"""The chunked LM-head loss: equal to the plain full-logits loss, and memory that a chunk bounds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import loss as loss_lib
from nemotron_jax import summary
from conftest import tiny_config


def plain_loss(h, kernel, targets, mask):
  """Reference: full float32 logits, log-softmax, the target's log-probability."""
  logp = jax.nn.log_softmax(jnp.einsum("bld,dv->blv", h, kernel))
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  return jnp.sum(nll * mask)


@pytest.mark.parametrize("chunk", [0, 8, 16, 64])
def test_chunked_loss_equals_plain_loss_and_gradients(chunk):
  rng = np.random.default_rng(0)
  b, l, d, v = 2, 37, 16, 50  # 37 is no multiple of any chunk: the padding is masked
  h = jnp.asarray(rng.normal(size=(b, l, d)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
  targets = jnp.asarray(rng.integers(0, v, (b, l)), jnp.int32)
  mask = jnp.asarray(rng.random((b, l)) > 0.2, jnp.float32)
  ours = lambda h, k: loss_lib.head_loss(h, k, targets, mask, dtype=jnp.float32, chunk=chunk,
                                        hits=True)
  out = jax.jit(ours)(h, kernel)
  np.testing.assert_allclose(out.nll, plain_loss(h, kernel, targets, mask), rtol=1e-6)
  assert out.count == mask.sum()
  hits = (jnp.argmax(jnp.einsum("bld,dv->blv", h, kernel), -1) == targets) * mask
  assert out.hits == hits.sum()
  g_ours = jax.jit(jax.grad(lambda h, k: ours(h, k).nll, argnums=(0, 1)))(h, kernel)
  g_ref = jax.grad(plain_loss, argnums=(0, 1))(h, kernel, targets, mask)
  for a, r in zip(g_ours, g_ref):
    np.testing.assert_allclose(a, r, rtol=1e-6, atol=1e-6 * float(jnp.abs(r).max()))


def test_chunked_loss_temp_is_a_fraction_of_one_logits_buffer():
  """MLP model, d 64, vocabulary 65536, 4096 positions: the train step's temp is below half
  of one float32 [T, V] buffer with chunks of 512, and holds several such buffers without."""
  def temp(chunk):
    c = tiny_config("-", {"d_model": 64, "vocab_size": 65536})
    c.data.seq_len, c.train.batch_size, c.train.loss_chunk = 4096, 1, chunk
    return summary.memory_report(c, 1)["per_device_bytes"]["temp"]
  logits_buffer = 4096 * 65536 * 4
  plain, chunked = temp(0), temp(512)
  assert plain >= 2 * logits_buffer, plain
  assert chunked <= 0.5 * logits_buffer, chunked
