"""Whole-model behaviour: the public API, packed documents, carried Mamba state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax.layers.mamba import Mamba2
from nemotron_jax.model import output_std
from conftest import tiny_config


@pytest.fixture(scope="module")
def hybrid():
  c = tiny_config("M*-EM", {"moe.n_group": 2, "moe.topk_group": 1, "moe.latent_size": 16})
  model = nj.build_model(c)
  variables = nj.init_variables(model, jax.random.PRNGKey(0))
  return model, variables, jax.jit(model.apply)


def test_api_shapes_and_dtypes(hybrid):
  model, variables, apply = hybrid
  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, 19), 0, 64, jnp.int32)
  logits = apply(variables, tokens)
  assert logits.shape == (3, 19, 64) and logits.dtype == jnp.float32
  assert set(variables) == {"params", "moe_state"}
  _, stats = model.apply(variables, tokens, mutable=["moe_stats"])
  load = stats["moe_stats"]["layers_3"]["mixer"]["load"][0]
  assert float(load.sum()) == 3 * 19 * 2  # every token copy lands on exactly one expert


def test_packed_row_equals_documents_alone(hybrid):
  _, variables, apply = hybrid
  docs = [jax.random.randint(jax.random.PRNGKey(i), (n,), 0, 64, jnp.int32)
          for i, n in enumerate([7, 12, 5])]
  row = jnp.concatenate(docs)[None]
  seg = jnp.concatenate([jnp.full((len(d),), i + 1) for i, d in enumerate(docs)])[None]
  packed = apply(variables, row, seg)
  unpacked = apply(variables, row)
  start = 0
  for d in docs:
    alone = apply(variables, d[None])
    np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5, rtol=1e-5)
    start += len(d)
  # The first document is unaffected by packing; later ones would see earlier ones without ids.
  assert np.abs(np.asarray(unpacked[0, 7:] - packed[0, 7:])).max() > 1e-3


def test_mamba_state_carries_across_calls():
  c = tiny_config("M").model
  mixer = Mamba2(c, output_std(c))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 21, c.d_model))
  params = mixer.init(jax.random.PRNGKey(1), x)
  whole, final = mixer.apply(params, x)
  first, state = mixer.apply(params, x[:, :13])
  second, state = mixer.apply(params, x[:, 13:], state=state)
  np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(state.ssm, final.ssm, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(state.conv, final.conv, atol=0)


def test_init_follows_published_ranges(hybrid):
  c = tiny_config("M*-EM").model
  params = hybrid[1]["params"]
  mixer = params["layers_0"]["mixer"]
  dt = np.asarray(jax.nn.softplus(mixer["dt_bias"]))
  assert (dt >= c.mamba.dt_min * 0.999).all() and (dt <= c.mamba.dt_max * 1.001).all()
  A = np.exp(np.asarray(mixer["A_log"]))
  assert (A >= 1).all() and (A <= 16).all()
  np.testing.assert_array_equal(mixer["D"], 1.0)
  std = lambda a: float(np.asarray(a).std())
  assert abs(std(mixer["in_proj_x"]["kernel"]) - c.init_std) < 0.2 * c.init_std
  scaled = c.init_std / np.sqrt(2 * 5)
  assert abs(std(params["layers_2"]["mixer"]["down_proj"]["kernel"]) - scaled) < 0.2 * scaled


def test_bfloat16_compute_runs_and_stays_close(hybrid):
  model, variables, apply = hybrid
  c = tiny_config("M*-EM", {"moe.n_group": 2, "moe.topk_group": 1, "moe.latent_size": 16,
                            "compute_dtype": "bfloat16"})
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 64, jnp.int32)
  low = nj.build_model(c).apply(variables, tokens)
  assert low.dtype == jnp.float32
  # bf16 keeps 8 bits of mantissa: logits of size ~0.1 agree to a few 1e-3.
  np.testing.assert_allclose(low, apply(variables, tokens), atol=2e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_matmul_gradient_matches_plain_dot(dtype):
  from nemotron_jax.layers.basic import matmul
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (2, 5, 16)).astype(dtype)
  w = jax.random.normal(kw, (16, 24)).astype(dtype)
  g = jax.random.normal(kg, (2, 5, 24))

  def loss(f):
    # The output is cast to the compute dtype, as Linear does.
    return lambda x, w: jnp.sum(f(x, w).astype(dtype).astype(jnp.float32) * g)

  plain = lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.float32)
  ours = jax.jit(jax.grad(loss(matmul), argnums=(0, 1)))(x, w)
  ref = jax.grad(loss(plain), argnums=(0, 1))(x, w)
  for a, b in zip(ours, ref):
    assert a.dtype == b.dtype == dtype
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-6 if dtype == jnp.float32 else 1e-2, atol=1e-5)
