"""The precision policy in the model and the train step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import ConfigError, build_model, init_variables, sharding
from nemotron_jax.quant import policy
from nemotron_jax.train_lib import Trainer
from conftest import tiny_config

PATTERN = "M*EM-E"  # for the policy table, which compiles nothing
SMALL = "ME*-"  # for compiled tests: Mamba, LatentMoE, BF16 attention, MLP


def quantized_config(recipe="nvfp4", pattern=SMALL, **precision):
  c = tiny_config(pattern, {"moe.latent_size": 16, "precision.recipe": recipe,
                            **{f"precision.{k}": v for k, v in precision.items()}})
  c.data.source = "mqar"
  c.train.batch_size = 8
  c.mesh.data = 1
  return c


def test_policy_assigns_published_overrides():
  m = quantized_config(pattern=PATTERN, bf16_first_layers=1, bf16_last_layers=1,
                       mamba_out_proj="mxfp8").model
  r = lambda layer, name: policy.projection_recipe(m, layer, PATTERN[layer], name)
  assert r(0, "in_proj_x") == "bf16"  # first layer
  assert r(5, "up_proj") == "bf16"  # last layer
  assert r(1, "q_proj") == "bf16" and r(1, "o_proj") == "bf16"  # attention
  assert r(2, "fc1_latent_proj") == "bf16"  # latent projections
  assert r(2, "up_proj") == "nvfp4"  # the shared expert
  assert r(3, "in_proj_x") == "nvfp4" and r(3, "out_proj") == "mxfp8"
  assert policy.layer_recipe(m, None, "*") == "bf16"  # MTP
  assert policy.layer_recipe(quantized_config("none", PATTERN).model, 3, "M") is None
  with pytest.raises(ConfigError, match="'model.precision.recipe'"):
    build_model(quantized_config("fp6"))


def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 64, (8, 17)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "segment_ids": np.ones((8, 16), np.int32), "loss_mask": np.ones((8, 16), np.float32)}


def test_quantized_forward_is_close_not_equal():
  plain = build_model(quantized_config("none"))
  variables = init_variables(plain, jax.random.PRNGKey(0))
  tokens = jnp.asarray(batch()["inputs"])
  ref = plain.apply(variables, tokens)
  # One quantised GEMM is off by ~0.037 (FP8, 3 mantissa bits) or ~0.15 (NVFP4) relative
  # (tests/test_quant.py); three quantised blocks in series compound that, so allow 3x.
  for recipe, bound in (("fp8_tensorwise", 3 * 0.037), ("nvfp4", 3 * 0.15)):
    out = build_model(quantized_config(recipe)).apply(variables, tokens)
    rel = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref - ref.mean()))
    print(recipe, rel)
    assert 1e-4 < rel < bound, (recipe, rel)


@pytest.fixture(scope="module")
def trainer():
  c = quantized_config(bf16_from_step=3, mamba_out_proj="mxfp8")
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  return Trainer(c, build_model(c), mesh)


def test_stochastic_rounding_is_keyed_by_the_state(trainer):
  state = trainer.init_state(0)
  b = trainer.shard_batch(batch())
  params = lambda s: jax.device_get(s.params)
  first = params(trainer.train_step(jax.tree.map(jnp.copy, state), b, 0)[0])
  again = params(trainer.train_step(jax.tree.map(jnp.copy, state), b, 0)[0])
  other = params(trainer.train_step(state.replace(rng=jax.random.PRNGKey(9)), b, 0)[0])
  jax.tree.map(np.testing.assert_array_equal, first, again)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), first, other))
  assert max(diffs) > 0  # gradient rounding noise differs with the key


def test_late_steps_drop_quantisation(trainer):
  c = quantized_config("none")
  mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
  plain = Trainer(c, build_model(c), mesh)
  b = batch()
  state = trainer.init_state(0)
  _, late = trainer.train_step(jax.tree.map(jnp.copy, state), trainer.shard_batch(b), 3)
  _, early = trainer.train_step(jax.tree.map(jnp.copy, state), trainer.shard_batch(b), 2)
  _, ref = plain.train_step(plain.init_state(0), plain.shard_batch(b), 3)
  np.testing.assert_allclose(late["loss"], ref["loss"], rtol=1e-6)
  assert abs(float(early["loss"]) - float(ref["loss"])) > 1e-6
  # Held-out loss follows the phase the state was last trained in.
  sb = plain.shard_batch(b)
  for steps, model in ((3, trainer), (4, plain)):
    s = state.replace(step=jnp.asarray(steps, state.step.dtype))
    np.testing.assert_allclose(trainer.eval_step(s, sb)["nll_sum"],
                               model.eval_step(s, sb)["nll_sum"], rtol=1e-6)
  assert trainer.in_late_phase(state.replace(step=jnp.asarray(4, state.step.dtype)))
  assert abs(float(trainer.eval_step(state, sb)["nll_sum"]) -
             float(plain.eval_step(state, sb)["nll_sum"])) > 1e-4


def test_stats_cover_every_quantised_tensor(trainer):
  state = trainer.init_state(0)
  stats = jax.device_get(trainer.quant_stats(state, trainer.shard_batch(batch())))
  names = {k.rsplit("/", 1)[0] + "/" + k.rsplit("/", 1)[1].split("_")[0] for k in stats}
  # Layer 0 (Mamba): every projection, operands x, w and the gradient dy.
  for proj in ("in_proj_x", "in_proj_z", "in_proj_B", "in_proj_C", "in_proj_dt", "out_proj"):
    for operand in ("x", "w", "dy"):
      assert f"quant/layers_0/mixer/{proj}/{operand}" in names
  assert "quant/layers_1/mixer/experts_up/w" not in names  # stats sit on the MoE itself
  assert "quant/layers_1/mixer/experts_up_w" in {k.rsplit("_", 1)[0] for k in stats}
  # BF16 GEMMs (attention, latent projections) are not quantised, so carry no statistics.
  assert not any("q_proj" in k or "latent" in k for k in stats)
  values = np.array(list(stats.values()))
  assert ((values >= 0) & (values <= 1)).all() and values.max() > 0
