"""The precision policy: which GEMM runs under which low-precision recipe.

`model.precision.recipe` names the recipe of every linear layer and of the MoE
expert GEMMs; the published per-layer overrides keep some in BF16:
  - the first / last `bf16_first_layers` / `bf16_last_layers` blocks,
  - attention QKV and output projections (`bf16_attention`),
  - LatentMoE's latent projections (`bf16_latent`),
  - MTP blocks (`bf16_mtp`),
  - Mamba's out_proj in its own recipe (`mamba_out_proj`, e.g. "mxfp8").
Embeddings, the LM head, norms and the router never come here: they stay in
the compute dtype (router in float32).

Hooks: `linear_dot` is `basic.Linear.dot`, `expert_gmm` is `MoE.gmm`. Both
draw stochastic-rounding keys from the "quant" RNG stream when the caller
provides one (Flax folds in the module path, so no two GEMMs share noise),
and sow forward-operand statistics into "quant_stats" when that collection
is mutable. With the "perturbations" collection supplied, each linear
output's gradient can be read back for gradient statistics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from nemotron_jax.layers import moe as moe_lib
from nemotron_jax.quant import dot as qdot_lib
from nemotron_jax.quant.formats import quant_stats

LATENT_PROJECTIONS = ("fc1_latent_proj", "fc2_latent_proj")


def layer_recipe(m, layer: int | None, kind: str) -> str | None:
  """Recipe of a block's GEMMs before per-projection overrides; None: not quantised.

  `layer` is the block index in the pattern, None for an MTP block.
  """
  p = m.precision
  if p.recipe == "none":
    return None
  if layer is None:
    return "bf16" if p.bf16_mtp else p.recipe
  if layer < p.bf16_first_layers or layer >= len(m.pattern) - p.bf16_last_layers:
    return "bf16"
  if kind == "*" and p.bf16_attention:
    return "bf16"
  return p.recipe


def projection_recipe(m, layer: int | None, kind: str, name: str) -> str | None:
  """Recipe of one projection (by its module name) inside a block."""
  recipe = layer_recipe(m, layer, kind)
  if recipe is None or recipe == "bf16":
    return recipe
  p = m.precision
  if name in LATENT_PROJECTIONS and p.bf16_latent:
    return "bf16"
  if kind == "M" and name == "out_proj" and p.mamba_out_proj:
    return p.mamba_out_proj
  return recipe


def _options(p, recipe: str, key) -> dict:
  """qdot keyword options for a recipe: grad format, stochastic rounding, Hadamard."""
  opts = {}
  if recipe == "fp8_tensorwise":
    opts["grad_fmt"] = p.grad_fmt
  if recipe == "nvfp4":
    opts["rht"] = p.hadamard
    # Without a key (evaluation) gradients are not taken, so rounding mode is moot.
    opts["stochastic_rounding"] = p.stochastic_rounding and key is not None
    opts["forward_sr"] = p.stochastic_rounding_forward and key is not None
  return opts


def _key(module):
  return module.make_rng("quant") if module.has_rng("quant") else None


def _sow_stats(module, name: str, x, fmt, **kw):
  if fmt is None or not module.is_mutable_collection("quant_stats") or module.is_initializing():
    return
  stats = quant_stats(x, fmt, **kw)
  module.sow("quant_stats", f"{name}_underflow", stats["underflow"])
  module.sow("quant_stats", f"{name}_saturation", stats["saturation"])


def linear_dot(m, layer: int | None, kind: str):
  """The `dot` hook of basic.Linear for one block; None when nothing is quantised."""
  if layer_recipe(m, layer, kind) is None:
    return None
  p = m.precision

  def dot(module, x, kernel):
    recipe = projection_recipe(m, layer, kind, module.name)
    key = _key(module)
    r = qdot_lib.get_recipe(recipe, **{k: v for k, v in _options(p, recipe, None).items()
                                       if k != "stochastic_rounding"})
    _sow_stats(module, "x", x, r.act, axis=-1)
    _sow_stats(module, "w", kernel, r.weight, axis=0, two_d=r.weight_2d)
    y = qdot_lib.qdot(x, kernel, recipe, key=key, **_options(p, recipe, key))
    if not module.is_initializing():
      y = module.perturb("out", y)
    return y

  return dot


def expert_gmm(m, layer: int | None):
  """The `gmm` hook of the MoE: (module, h, up, down) -> gmm(x, w, group_sizes, name), or None.

  Statistics are taken here, outside any shard_map: each expert's up and down
  weights with its own tensor scale, and the tokens entering the experts
  (with one scale over all of them, where the GEMM scales per expert group).
  """
  recipe = layer_recipe(m, layer, "E")
  if recipe is None or not m.precision.quantize_experts:
    return None
  p = m.precision
  # The grouped products run as the unquantised MoE's do (moe.impl; "dense" has no groups).
  impl = "blocked" if moe_lib.resolve_impl(m.moe.impl) == "blocked" else "ragged"

  def make(module, h, up, down):
    key = _key(module)
    r = qdot_lib.get_recipe(recipe, **{k: v for k, v in _options(p, recipe, None).items()
                                       if k != "stochastic_rounding"})
    _sow_stats(module, "experts_x", h, r.act, axis=-1)
    for name, w in (("up", up), ("down", down)):
      amax = jnp.max(jnp.abs(w.astype(jnp.float32)), axis=(1, 2), keepdims=True)
      _sow_stats(module, f"experts_{name}_w", w, r.weight, axis=1, two_d=r.weight_2d, amax=amax)

    def gmm(x, w, group_sizes, name):
      k = None if key is None else jax.random.fold_in(key, {"up": 0, "down": 1}[name])
      return qdot_lib.qragged_dot(x, w, group_sizes, recipe, key=k, impl=impl,
                                  **_options(p, recipe, k))

    return gmm

  return make


def grad_format(m, path: tuple[str, ...]) -> tuple[str | None, int | None]:
  """(format of dy, block axis) for the linear layer at a module path like
  ("layers_3", "mixer", "in_proj_x"); None when that GEMM is not quantised."""
  layer = int(path[0].split("_")[1]) if path[0].startswith("layers_") else None
  kind = m.pattern[layer] if layer is not None else "*"
  recipe = projection_recipe(m, layer, kind, path[-1])
  if recipe is None:
    return None
  opts = _options(m.precision, recipe, None)
  opts.pop("stochastic_rounding", None)
  opts.pop("forward_sr", None)
  return qdot_lib.get_recipe(recipe, **opts).grad
