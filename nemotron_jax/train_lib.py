"""The training library train.py calls: optimiser, schedules, loss, sharded state, steps.

The step is one `jax.jit` with explicit in/out shardings from the rules table
in `sharding.py`. MoE expert biases live in their own collection and change
only through the aux-loss-free update here, never through the optimiser.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

import flax.traverse_util
import ml_collections

from nemotron_jax import loss as loss_lib
from nemotron_jax import sharding
from nemotron_jax.layers import basic
from nemotron_jax.model import NemotronH, build_model
from nemotron_jax.quant import policy
from nemotron_jax.quant.formats import quant_stats


class Terms(NamedTuple):
  """Sums over one batch: the main head's and each MTP depth's HeadLoss, per-layer MoE loads
  {path: [experts]} and summed balance loss, dropped and routed copies (None without MoE),
  and the mutable collections of the forward (None once accumulated)."""
  main: loss_lib.HeadLoss
  depths: list
  loads: dict
  balance: jax.Array
  dropped: Any
  copies: Any
  cols: Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  moe_state: Any  # {"layers_i": {"mixer": {"e_score_correction_bias": [experts]}}}
  rng: jax.Array


def lr_schedule(t, steps: int | None = None) -> optax.Schedule:
  """Linear warmup, then warmup-stable-decay, cosine, or constant."""
  steps = steps or t.steps
  peak, floor = t.lr, t.lr * t.min_lr_ratio
  warmup = min(t.warmup_steps, steps)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (step + 1) / max(warmup, 1))
    if t.schedule == "constant":
      rest = jnp.asarray(peak)
    elif t.schedule == "cosine":
      frac = jnp.clip((step - warmup) / max(steps - warmup, 1), 0.0, 1.0)
      rest = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * frac))
    else:
      decay_steps = max(int(round(t.decay_fraction * steps)), 1)
      start = steps - decay_steps
      frac = jnp.clip((step - start) / decay_steps, 0.0, 1.0)
      if t.decay_shape == "linear":
        shape = 1.0 - frac
      elif t.decay_shape == "minus_sqrt":
        shape = 1.0 - jnp.sqrt(frac)
      else:
        shape = 0.5 * (1 + jnp.cos(math.pi * frac))
      rest = floor + (peak - floor) * shape
    return jnp.where(step < warmup, warm, rest)

  return schedule


def decay_mask(params):
  """Weight decay on matrices (kernels, embeddings, experts, conv taps), not on vectors."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(t) -> optax.GradientTransformation:
  parts = []
  if t.grad_clip:
    parts.append(optax.clip_by_global_norm(t.grad_clip))
  parts.append(optax.adamw(lr_schedule(t), b1=t.b1, b2=t.b2, eps=t.eps,
                           weight_decay=t.weight_decay, mask=decay_mask))
  return optax.chain(*parts)


def mtp_targets(batch, depth: int):
  """Targets and mask [b l] of MTP depth k: at position t, token t + k + 1 if in t's document."""
  targets, mask, seg = batch["targets"], batch["loss_mask"], batch["segment_ids"]
  shift = lambda x: jnp.pad(x[:, depth:], ((0, 0), (0, depth)))
  same_doc = shift(seg) == seg
  return shift(targets), shift(mask) * same_doc.astype(mask.dtype)


def _moe_layers(stats, path=()):
  """(path to a MoE block, its stats) in model order: main layers, then MTP blocks."""
  order = lambda name: (name.startswith("mtp"), int(name.split("_")[1]))
  for name in sorted((n for n in stats if n != "mixer"), key=order):
    sub = stats[name]
    if "mixer" in sub:
      yield path + (name,), sub["mixer"]
    else:
      yield from _moe_layers(sub, path + (name,))


def moe_stats_summary(stats) -> tuple[dict, jax.Array]:
  """Per-layer loads {path such as ("layers_3",) or ("mtp_0", "layers_1"): [experts]} and the
  summed balancing loss."""
  loads, balance = {}, jnp.zeros((), jnp.float32)
  for path, layer in _moe_layers(stats):
    loads[path] = sum(layer["load"])
    balance = balance + sum(layer["balance_loss"])
  return loads, balance


def moe_drop_counts(stats) -> tuple[jax.Array, jax.Array]:
  """(token copies dropped for want of expert-parallel capacity, all copies routed), summed
  over every MoE layer."""
  layers = [layer for _, layer in _moe_layers(stats)]
  dropped = sum(sum(layer["dropped"]) for layer in layers)
  return dropped, sum(sum(layer["copies"]) for layer in layers)


def update_expert_bias(moe_state, loads: dict, rate: float):
  """bias_i += rate * sign(mean load - load_i): under-loaded experts become likelier.

  loads: {path to a MoE block: its load [experts]}, as `moe_stats_summary` gives them.
  """
  new = jax.tree.map(lambda x: x, moe_state)
  for path, load in loads.items():
    old, dst = moe_state, new
    for name in path:
      old, dst = old[name], dst[name]
    bias = old["mixer"]["e_score_correction_bias"]
    dst["mixer"]["e_score_correction_bias"] = bias + rate * jnp.sign(jnp.mean(load) - load)
  return new


class Trainer:
  """Holds the model, optimiser and mesh; builds the sharded state and jitted steps."""

  def __init__(self, config, model: NemotronH, mesh: Mesh):
    self.config, self.model, self.mesh = config, model, mesh
    self.rules = sharding.rules(config.model, mesh)
    self.tx = make_optimizer(config.train)
    self.batch_sharding = sharding.batch_sharding(mesh)
    self.state_shardings = self._state_shardings()
    step = lambda model: jax.jit(
        functools.partial(self._train_step, model=model),
        in_shardings=(self.state_shardings, self.batch_sharding),
        out_shardings=(self.state_shardings, sharding.replicated(mesh)), donate_argnums=(0,))
    self._train_jit = step(model)
    p = config.model.precision
    self.quantized = p.recipe != "none"
    # Late in training the published recipe drops quantisation: same weights, plain GEMMs.
    self.late_step = p.bf16_from_step if self.quantized and p.bf16_from_step else None
    self.late_model = None
    if self.late_step:
      late = ml_collections.ConfigDict(config.to_dict())
      late.model.precision.recipe = "none"
      self.late_model = build_model(late)
      self._late_train_jit = step(self.late_model)
    self._stats_jit = jax.jit(self._quant_stats, in_shardings=(
        self.state_shardings.params, self.state_shardings.moe_state, self.batch_sharding),
        out_shardings=sharding.replicated(mesh))
    evaluate = lambda model: jax.jit(
        functools.partial(self._eval_step, model=model),
        in_shardings=(self.state_shardings.params, self.state_shardings.moe_state,
                      self.batch_sharding), out_shardings=sharding.replicated(mesh))
    self._eval_jit = evaluate(model)
    self._late_eval_jit = evaluate(self.late_model) if self.late_step else None

  def _boxed_init(self, rng):
    tokens = jnp.zeros((1, 8), jnp.int32)
    variables = self.model.init(rng, tokens)
    return {k: v for k, v in variables.items() if k != "moe_stats"}

  def _state_shardings(self) -> TrainState:
    boxed = jax.eval_shape(self._boxed_init, jax.random.PRNGKey(0))
    var_shardings = sharding.logical_to_sharding(boxed, self.mesh, self.rules)
    abstract = nn.meta.unbox(boxed)
    sharding.check_divisible(abstract, var_shardings, self.mesh)
    params_sh = var_shardings["params"]
    opt_abstract = jax.eval_shape(self.tx.init, abstract["params"])
    # Optimiser moments mirror their parameters; scalars (counts) are replicated.
    opt_sh = optax.tree_map_params(self.tx, lambda _, s: s, opt_abstract, params_sh,
                                   transform_non_params=lambda _: sharding.replicated(self.mesh))
    rep = sharding.replicated(self.mesh)
    return TrainState(step=rep, params=params_sh, opt_state=opt_sh,
                      moe_state=var_shardings.get("moe_state", {}), rng=rep)

  def train_step(self, state: TrainState, batch, step: int | None = None) -> tuple[TrainState, dict]:
    """One optimiser step; `step` (the state's step) selects the late plain-GEMM phase.

    When the loss, the gradient norm or any updated parameter is non-finite, the
    returned state is the input state unchanged and metrics["nonfinite"] is 1.
    """
    late = self.late_step is not None and step is not None and step >= self.late_step
    with jax.set_mesh(self.mesh):
      return (self._late_train_jit if late else self._train_jit)(state, batch)

  def quant_stats(self, state: TrainState, batch) -> dict:
    """Per quantised tensor: the fractions of values that underflow to zero and saturate."""
    with jax.set_mesh(self.mesh):
      return self._stats_jit(state.params, state.moe_state, batch)

  def in_late_phase(self, state: TrainState) -> bool:
    """Whether the state's last step ran the late plain-GEMM phase."""
    return self.late_step is not None and int(jax.device_get(state.step)) > self.late_step

  def eval_step(self, state: TrainState, batch) -> dict:
    """Held-out sums with the model the state was last trained with: plain GEMMs once the
    late phase has run."""
    late = self.in_late_phase(state)
    with jax.set_mesh(self.mesh):
      return (self._late_eval_jit if late else self._eval_jit)(state.params, state.moe_state, batch)

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, for restoring without allocating twice."""
    shapes = jax.eval_shape(lambda: self._init_fn(jax.random.PRNGKey(0)))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        shapes, self.state_shardings)

  def abstract_batch(self, batch_size: int | None = None, seq_len: int | None = None) -> dict:
    """Shapes, dtypes and shardings of a global training batch (default: the config's)."""
    shape = (batch_size or self.config.train.batch_size, seq_len or self.config.data.seq_len)
    sharding.check_batch(shape[0], self.mesh, self.config.train.grad_accum_steps)
    spec = lambda dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=self.batch_sharding)
    return {"inputs": spec(jnp.int32), "targets": spec(jnp.int32),
            "segment_ids": spec(jnp.int32), "loss_mask": spec(jnp.float32)}

  def compile_train_step(self):
    """The train step compiled for the abstract state and batch: nothing is allocated."""
    with jax.set_mesh(self.mesh):
      return self._train_jit.lower(self.abstract_state(), self.abstract_batch()).compile()

  def _init_fn(self, rng) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = nn.meta.unbox(self._boxed_init(init_rng))
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.tx.init(params),
                      moe_state=variables.get("moe_state", {}), rng=state_rng)

  def init_state(self, seed: int) -> TrainState:
    with jax.set_mesh(self.mesh):
      return jax.jit(self._init_fn, out_shardings=self.state_shardings)(jax.random.PRNGKey(seed))

  def _forward(self, params, moe_state, batch, *, mtp: bool = False, model=None, rngs=None,
               extra=None, mutable=("moe_stats",)) -> Terms:
    """The sums of one (micro)batch's loss terms; see `Terms`."""
    variables = {"params": params, "moe_state": moe_state, **(extra or {})}
    mtp = mtp and self.config.model.mtp.num_depths > 0
    model = model or self.model
    m = self.config.model
    head = functools.partial(loss_lib.head_loss, kernel=params["lm_head"]["kernel"],
                             dtype=basic.dtype_of(m.compute_dtype),
                             chunk=self.config.train.loss_chunk)
    with nn.logical_axis_rules(self.rules):
      (h, mtp_h), cols = model.apply(variables, batch["inputs"], batch["segment_ids"], mtp=mtp,
                                     mutable=list(mutable), rngs=rngs,
                                     method=NemotronH.hidden_states)
      main = head(h, targets=batch["targets"], mask=batch["loss_mask"])
      depths = []
      for k, hk in enumerate(mtp_h, start=1):
        targets, mask = mtp_targets(batch, k)
        depths.append(head(hk, targets=targets, mask=mask, hits=True))
    stats = cols.get("moe_stats", {})
    loads, balance = moe_stats_summary(stats)
    dropped, copies = moe_drop_counts(stats) if loads else (None, None)
    return Terms(main, depths, loads, balance, dropped, copies, cols)

  def _micro_loss(self, params, moe_state, batch, norm, *, model, rngs):
    """(this microbatch's share of the step's loss, its Terms without the collections).

    norm: the step's (main token count, [each MTP depth's token count], number of
    microbatches). Cross-entropy sums are divided by the whole step's counts, so the
    shares add up to the loss of the whole batch; the balance loss is their mean.
    """
    count, depth_counts, micro = norm
    terms = self._forward(params, moe_state, batch, mtp=True, model=model, rngs=rngs)
    t, coef = self.config.model.mtp, self.config.model.moe.balance_loss_coef
    loss = terms.main.nll / count + coef * terms.balance / micro
    if terms.depths:
      loss += t.loss_scale / t.num_depths * sum(
          d.nll / c for d, c in zip(terms.depths, depth_counts))
    return loss, terms._replace(cols=None)

  def _grads(self, state: TrainState, batch, *, model):
    """(loss, summed Terms, gradients) of the whole batch, in `train.grad_accum_steps`
    microbatches: each device's rows split into that many groups, one scan step each."""
    micro = self.config.train.grad_accum_steps
    sharding.check_batch(batch["inputs"].shape[0], self.mesh, micro)
    count = jnp.sum(batch["loss_mask"])
    depth_counts = [jnp.sum(mtp_targets(batch, k)[1])
                    for k in range(1, self.config.model.mtp.num_depths + 1)]
    norm = (jnp.maximum(count, 1.0), [jnp.maximum(c, 1.0) for c in depth_counts], micro)
    rng = jax.random.fold_in(state.rng, state.step)
    grad_fn = jax.value_and_grad(
        lambda p, b, r: self._micro_loss(p, state.moe_state, b, norm, model=model,
                                         rngs={"quant": r}), has_aux=True)
    if micro == 1:
      (loss, terms), grads = grad_fn(state.params, batch, rng)
      return loss, terms, grads
    # Row i of microbatch j is global row i * micro + j: each device keeps its own rows.
    spec = jax.sharding.PartitionSpec(None, sharding.BATCH_AXES)
    split = lambda x: jax.lax.with_sharding_constraint(
        jnp.swapaxes(x.reshape(-1, micro, *x.shape[1:]), 0, 1),
        jax.sharding.NamedSharding(self.mesh, spec))
    micro_batches = jax.tree.map(split, batch)

    def step(carry, xs):
      j, mb = xs
      out = grad_fn(state.params, mb, jax.random.fold_in(rng, j))
      return jax.tree.map(jnp.add, carry, out), None

    first = jax.tree.map(lambda x: x[0], micro_batches)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(grad_fn, state.params, first, rng))
    ((loss, terms), grads), _ = jax.lax.scan(step, zeros, (jnp.arange(micro), micro_batches))
    return loss, terms, grads

  def _train_step(self, state: TrainState, batch, *, model):
    loss, terms, grads = self._grads(state, batch, model=model)
    micro = self.config.train.grad_accum_steps
    count = terms.main.count
    ce = terms.main.nll / jnp.maximum(count, 1.0)
    balance = terms.balance / micro
    depths = [(d.nll / jnp.maximum(d.count, 1.0), d.hits / jnp.maximum(d.count, 1.0))
              for d in terms.depths]
    t = self.config.model.mtp
    mtp_loss = t.loss_scale / t.num_depths * sum(d[0] for d in depths) if depths else None
    loads = terms.loads
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    moe_state = update_expert_bias(state.moe_state, loads,
                                   self.config.model.moe.bias_update_rate)
    params_finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    grad_norm = optax.tree.norm(grads)
    finite = params_finite & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    metrics = {"loss": loss, "ce": ce, "tokens": count, "grad_norm": grad_norm,
               "lr": lr_schedule(self.config.train)(state.step), "balance_loss": balance,
               "params_finite": params_finite.astype(jnp.float32),
               "nonfinite": 1 - finite.astype(jnp.int32)}
    if depths:
      metrics["mtp_loss"] = mtp_loss
      for k, (depth_ce, depth_acc) in enumerate(depths, start=1):
        metrics[f"mtp_ce_{k}"], metrics[f"mtp_acc_{k}"] = depth_ce, depth_acc
    if loads:
      share = jnp.stack([load / jnp.sum(load) for load in loads.values()])  # [layers, experts]
      ideal = 1.0 / share.shape[-1]
      metrics["expert_load_max"] = jnp.max(share) / ideal
      metrics["expert_load_min"] = jnp.min(share) / ideal
      metrics["moe_dropped_fraction"] = terms.dropped / terms.copies
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              moe_state=moe_state, rng=jax.random.fold_in(state.rng, state.step))
    # A non-finite step never becomes the state: the whole state, step count included, stays.
    new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
    return new_state, metrics

  def _eval_step(self, params, moe_state, batch, model=None):
    main = self._forward(params, moe_state, batch, model=model).main
    return {"nll_sum": main.nll, "tokens": main.count}

  def _quant_stats(self, params, moe_state, batch):
    """Forward operands from the sown statistics; gradients (dy of every quantised linear
    layer) through zero perturbations of the layer outputs."""
    cols = self._forward(params, moe_state, batch,
                         mutable=("moe_stats", "quant_stats", "perturbations")).cols
    out = {}
    for path, values in flax.traverse_util.flatten_dict(cols.get("quant_stats", {})).items():
      out["quant/" + "/".join(path)] = jnp.mean(jnp.stack(values))
    perturbations = cols.get("perturbations")
    if not perturbations:
      return out
    def mean_nll(pert):
      main = self._forward(params, moe_state, batch, extra={"perturbations": pert}).main
      return main.nll / jnp.maximum(main.count, 1.0)
    grads = jax.grad(mean_nll)(perturbations)
    for path, dy in flax.traverse_util.flatten_dict(grads).items():
      fmt = policy.grad_format(self.config.model, path[:-1])
      if fmt is not None:
        stats = quant_stats(dy, fmt, axis=-1)
        prefix = "quant/" + "/".join(path[:-1])
        out[prefix + "/dy_underflow"] = stats["underflow"]
        out[prefix + "/dy_saturation"] = stats["saturation"]
    return out

  def shard_batch(self, batch: dict) -> dict:
    arrays = {k: np.asarray(v) for k, v in batch.items()}
    return sharding.local_batch_to_global(arrays, self.mesh)
