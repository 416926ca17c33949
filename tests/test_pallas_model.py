"""The model with the Pallas SSD equals the XLA path, and its train step lowers for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax import build_model, init_variables
from nemotron_jax.train_lib import Trainer
from conftest import tiny_config


def test_pallas_logits_match_xla():
  c = tiny_config("M*M", {"mamba.ssd_impl": "pallas", "mamba.kernel.interpret": True})
  pallas = build_model(c)
  c.model.mamba.ssd_impl = "xla"
  xla = build_model(c)
  variables = init_variables(xla, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, 64, jnp.int32)
  segments = jnp.asarray(np.repeat([[1] * 9 + [2] * 12], 2, axis=0))
  for seg in (None, segments):
    np.testing.assert_allclose(pallas.apply(variables, tokens, seg),
                               xla.apply(variables, tokens, seg), atol=1e-5, rtol=1e-5)


def test_train_step_with_pallas_lowers_for_cuda():
  c = tiny_config("ME*M", {"mamba.ssd_impl": "pallas"})
  c.data.source = "mqar"
  c.mesh.data = 1
  mesh = jax.make_mesh((1, 1, 1, 1), ("data", "fsdp", "tensor", "expert"), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,) * 4)
  trainer = Trainer(c, build_model(c), mesh)
  state = jax.eval_shape(lambda: trainer._init_fn(jax.random.PRNGKey(0)))
  spec = jax.ShapeDtypeStruct((2, 16), jnp.int32)
  batch = {"inputs": spec, "targets": spec, "segment_ids": spec,
           "loss_mask": jax.ShapeDtypeStruct((2, 16), jnp.float32)}
  exported = jax.export.export(
      jax.jit(functools.partial(trainer._train_step, model=trainer.model)), platforms=("cuda",),
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
  )(state, batch)
  text = exported.mlir_module()
  # Forward and backward kernels both reach the CUDA module as Triton calls.
  assert text.count("__gpu$xla.gpu.triton") >= 5
  assert exported.platforms == ("cuda",)
