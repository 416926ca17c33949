"""The model with the Pallas SSD equals the XLA path, and its train step lowers for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nemotron_jax import build_model, init_variables
from nemotron_jax.kernels.ssd import UnsupportedPlatformError
from nemotron_jax.train_lib import Trainer
from conftest import tiny_config
from test_ssd_pallas import CUDA_EXPORT, KERNELS, triton_kernel_names


def test_pallas_logits_match_xla():
  c = tiny_config("M*M", {"mamba.ssd_impl": "pallas", "mamba.kernel.interpret": True})
  pallas = build_model(c)
  c.model.mamba.ssd_impl = "xla"
  xla = build_model(c)
  variables = init_variables(xla, jax.random.PRNGKey(0))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 21), 0, 64, jnp.int32)
  segments = jnp.asarray(np.repeat([[1] * 9 + [2] * 12], 2, axis=0))
  # One jitted program per model: eager interpretation dispatches every kernel op on its own.
  pallas_apply, xla_apply = jax.jit(pallas.apply), jax.jit(xla.apply)
  for seg in (None, segments):
    np.testing.assert_allclose(pallas_apply(variables, tokens, seg),
                               xla_apply(variables, tokens, seg), atol=1e-5, rtol=1e-5)


def test_train_step_with_pallas_lowers_for_cuda():
  # head_dim 12 and d_state 24 are not powers of two: the kernels pad their tiles.
  c = tiny_config("ME*M", {"mamba.ssd_impl": "pallas", "mamba.head_dim": 12, "mamba.d_state": 24,
                           "mamba.kernel.precision": "bf16"})
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
      jax.jit(functools.partial(trainer._train_step, model=trainer.model)), **CUDA_EXPORT)(state, batch)
  # Forward and backward kernels of both Mamba layers reach the CUDA module as Triton calls.
  kernels = triton_kernel_names(exported.mlir_module())
  assert set(kernels) == KERNELS
  assert len(kernels) >= 2 * len(KERNELS)
  assert exported.platforms == ("cuda",)


def test_pallas_on_tpu_names_the_platform():
  c = tiny_config("M", {"mamba.ssd_impl": "pallas"})
  model = build_model(c)
  variables = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0)))
  tokens = jax.ShapeDtypeStruct((1, 16), jnp.int32)
  with pytest.raises(UnsupportedPlatformError, match=r"\['tpu'\].*kernel.interpret=True"):
    jax.export.export(jax.jit(model.apply), platforms=("tpu",))(variables, tokens)
