"""Uncached attention implementations: flash against the XLA reference, memory, block skipping, auto."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import config as config_lib
from nemotron_jax import summary
from nemotron_jax.layers import attention as attn
from conftest import tiny_config


def reference(q, k, v, segment_ids, window, scale):
  """Today's XLA path: the mask on absolute indices, jax.nn.dot_product_attention."""
  b, length = q.shape[:2]
  idx = jnp.broadcast_to(jnp.arange(length)[None], (b, length))
  mask = attn.attention_mask(segment_ids, segment_ids, idx, idx, window)
  return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale)


def segments(lengths, batch=2):
  ids = np.repeat(np.arange(1, len(lengths) + 1), lengths)
  return jnp.asarray(np.broadcast_to(ids, (batch, ids.size)), jnp.int32)


# (length, document lengths or None, window, block_q, block_kv): causal GQA at lengths that
# are not block multiples, packed documents, windows across blocks, and a first block that
# holds several documents under a window smaller than a block.
CASES = [
    (37, None, 0, 16, 16),
    (50, [10, 3, 20, 17], 7, 16, 8),
    (50, [2, 3, 1, 30, 14], 5, 16, 16),
    (37, None, 20, 8, 16),
]


@pytest.mark.parametrize("length,docs,window,block_q,block_kv", CASES)
def test_flash_equals_xla_values_and_gradients(length, docs, window, block_q, block_kv):
  kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(length + window), 4)
  q = jax.random.normal(kq, (2, length, 8, 16))
  k, v = jax.random.normal(kk, (2, length, 2, 16)), jax.random.normal(kv, (2, length, 2, 16))
  seg = None if docs is None else segments(docs)
  d_out = jax.random.normal(kd, q.shape)

  def flash(q, k, v):
    return attn.flash_attention(q, k, v, seg, seg, scale=0.25, window=window,
                                block_q=block_q, block_kv=block_kv)

  out, flash_vjp = jax.vjp(jax.jit(flash), q, k, v)
  want, ref_vjp = jax.vjp(jax.jit(lambda q, k, v: reference(q, k, v, seg, window, 0.25)), q, k, v)
  np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-5)
  for got, expected in zip(flash_vjp(d_out), ref_vjp(d_out)):
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_flash_row_that_sees_nothing_is_zero_without_nan():
  q = jax.random.normal(jax.random.PRNGKey(0), (1, 20, 4, 8))
  k = v = jax.random.normal(jax.random.PRNGKey(1), (1, 20, 2, 8))
  q_seg = jnp.asarray([[1] * 12 + [9] * 8])  # segment 9 has no keys
  kv_seg = jnp.ones((1, 20), jnp.int32)

  def loss(q, k, v):
    out = attn.flash_attention(q, k, v, q_seg, kv_seg, scale=0.3, block_q=8, block_kv=8)
    return (out ** 2).sum(), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  assert np.all(np.asarray(out[:, 12:]) == 0) and np.abs(np.asarray(out[:, :12])).min() > 0
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))
  assert np.all(np.asarray(grads[0][:, 12:]) == 0)


def test_attention_module_flash_equals_xla():
  """Through the layer: projections, RoPE on per-document positions, packed rows."""
  c = tiny_config("*", {"attention.pos_emb": "rope", "attention.flash_block_q": 8,
                        "attention.flash_block_kv": 16}).model
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, c.d_model))
  seg = segments([5, 9, 7])
  outs = {}
  for impl in ("xla", "flash"):
    c.attention.impl = impl
    layer = attn.Attention(c, 0.02)
    params = layer.init(jax.random.PRNGKey(1), x)
    loss = lambda p, x: (layer.apply(p, x, segment_ids=seg)[0] ** 2).sum()
    outs[impl] = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)
  for got, want in zip(jax.tree.leaves(outs["flash"]), jax.tree.leaves(outs["xla"])):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


def test_flash_train_step_memory_is_linear_in_length():
  """Attention-only model, compiled train step: 8x the length within 10x the temp."""
  temp = {}
  for length in (512, 4096):
    c = config_lib.load_config("configs/tiny.py")
    c.model.pattern = "*"
    c.model.attention.num_heads, c.model.attention.head_dim = 8, 16
    c.model.attention.impl = "flash"
    c.train.batch_size, c.data.seq_len = 1, length
    temp[length] = summary.memory_report(config_lib.validate(c), 1)["per_device_bytes"]["temp"]
  assert temp[4096] <= 10 * temp[512], temp


def _scan_lengths(length, window):
  q = jax.ShapeDtypeStruct((1, length, 4, 8), jnp.float32)
  k = jax.ShapeDtypeStruct((1, length, 2, 8), jnp.float32)
  loss = lambda q, k, v: attn.flash_attention(q, k, v, scale=1.0, window=window,
                                              block_q=64, block_kv=64).sum()
  jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k))
  return [int(n) for n in re.findall(r"length=(\d+)", jaxpr)]


def test_sliding_window_iterates_blocks_linear_in_length():
  """The forward and backward loops visit only the visible block pairs."""
  steps = {t: _scan_lengths(t, window=48) for t in (1024, 2048, 4096)}
  for t, lengths in steps.items():
    assert lengths == [len(attn.block_schedule(t, 64, 64, 48)[0])] * 2  # forward, backward
  # Each query block sees its own key block and at most one before it: 2 per block, linear.
  assert steps[1024][0] == 2 * 16 - 1 and steps[4096][0] == 2 * 64 - 1
  # Global causal attention visits the lower triangle only, quadratic in length.
  assert _scan_lengths(1024, window=0)[0] == 16 * 17 // 2


def test_auto_on_a_cudnn_gpu_keeps_long_packed_rows_off_cudnn(monkeypatch):
  """Where cuDNN applies, auto takes it, except for packed documents from the flash length
  (cuDNN would get them as a [b 1 T T] mask)."""
  monkeypatch.setattr(attn, "_cudnn_misfit", lambda dtype, head_dim: None)
  long = attn.AUTO_FLASH_MIN_LENGTH
  assert attn.select_impl("auto", long, jnp.bfloat16, 128) == "cudnn"
  assert attn.select_impl("auto", long // 2, jnp.bfloat16, 128, segmented=True) == "cudnn"
  assert attn.select_impl("auto", long, jnp.bfloat16, 128, segmented=True) == "flash"


def test_auto_keeps_short_rows_on_xla_and_long_ones_on_flash():
  c = config_lib.load_config("configs/tiny.py")
  a = c.model.attention
  assert a.impl == "auto" and jax.default_backend() == "cpu"
  assert attn.select_impl(a.impl, c.data.seq_len, jnp.float32, a.head_dim) == "xla"
  assert attn.select_impl(a.impl, 8192, jnp.float32, a.head_dim) == "flash"
  m = tiny_config("*").model
  layer = attn.Attention(m, 0.02)
  x = jax.ShapeDtypeStruct((1, attn.AUTO_FLASH_MIN_LENGTH, m.d_model), jnp.float32)
  params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), x)
  # flash loops over block pairs; the XLA path has no loop.
  assert "scan[" in str(jax.make_jaxpr(layer.apply)(params, x))
  short = jax.ShapeDtypeStruct((1, 256, m.d_model), jnp.float32)
  assert "scan[" not in str(jax.make_jaxpr(layer.apply)(params, short))


def test_cudnn_off_gpu_is_one_line_config_error():
  m = tiny_config("*", {"attention.impl": "cudnn"}).model
  x = jnp.zeros((1, 16, m.d_model))
  with pytest.raises(config_lib.ConfigError, match=r"model\.attention\.impl.*cudnn.*xla, flash or auto") as err:
    attn.Attention(m, 0.02).init(jax.random.PRNGKey(0), x)
  assert "\n" not in str(err.value)


@pytest.mark.parametrize("field,value", [("impl", "pallas"), ("flash_block_q", 0),
                                         ("flash_block_kv", -4)])
def test_bad_attention_impl_fields_are_rejected(field, value):
  c = tiny_config("*")
  c.model.attention[field] = value
  with pytest.raises(config_lib.ConfigError, match=f"model.attention.{field}"):
    config_lib.validate(c)
