"""Mixture of experts with a sigmoid router, group-limited top-k, and optional LatentMoE.

Router (float32): scores = sigmoid(x W_r); experts are *selected* by top-k of
scores + bias (the aux-loss-free correction bias, model state in the
"moe_state" collection, never touched by an optimiser), optionally limited to
the `topk_group` best of `n_group` groups (a group scores the sum of its best
two). The chosen experts are *weighted* by their unbiased scores, normalised
to sum to one when `norm_topk_prob`, times `routed_scaling`.

Experts are relu^2 MLPs run dropless: token copies sorted by expert and
multiplied group by group (`moe.impl`): "ragged" with `jax.lax.ragged_dot`,
"blocked" by padding each expert's rows to whole blocks and running one
batched matmul (XLA:CPU's ragged_dot computes every group for every row, so
this is several times faster there), "auto" picks blocked on CPU and ragged
elsewhere. `dense_experts` is the one-hot reference that runs every expert on
every token. LatentMoE projects d -> latent_size
before the routed experts and back after combining; router and shared expert
see the full-width input.

Under a mesh, routing, experts and statistics run inside one `shard_map` on
each device's own tokens (`routed_moe`): weights are gathered over fsdp at
its boundary, the expert width stays split over tensor (partial outputs
summed), and with an expert axis the token copies travel by all-to-all with
capacity-bounded buffers (`expert_parallel_experts`).

Per layer, `moe_stats` receives the per-expert load (token copies routed to
each expert), the balancing loss sum_i f_i P_i (f_i: load share times the
number of experts over top_k; P_i: mean normalised score), both over the
global batch, and the token copies routed and dropped for want of
expert-parallel capacity.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from jax.sharding import PartitionSpec as P

from nemotron_jax import sharding
from nemotron_jax.layers import basic
from nemotron_jax.layers.mlp import MLP, relu2


def route(logits, bias, *, top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
          routed_scaling: float):
  """logits [t e] float32, bias [e] -> (weights [t k], experts [t k] int32, scores [t e])."""
  scores = jax.nn.sigmoid(logits)
  choice = scores + bias
  t, e = choice.shape
  if n_group > 1:
    grouped = choice.reshape(t, n_group, e // n_group)
    group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)
    _, best_groups = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.zeros((t, n_group), bool).at[jnp.arange(t)[:, None], best_groups].set(True)
    keep = jnp.repeat(keep, e // n_group, axis=1)
    choice = jnp.where(keep, choice, -jnp.inf)
  _, experts = jax.lax.top_k(choice, top_k)
  weights = jnp.take_along_axis(scores, experts, axis=-1)
  if norm_topk_prob:
    weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
  return weights * routed_scaling, experts.astype(jnp.int32), scores


def expert_load(experts, num_experts: int):
  """Token copies routed to each expert: [t k] -> [e] float32."""
  return jnp.zeros((num_experts,), jnp.float32).at[experts.reshape(-1)].add(1.0)


def balance_loss(scores, load, top_k: int):
  """sum_i f_i P_i with f_i = e * load_i / (k t) and P_i = mean_t(s_i / sum_j s_j)."""
  share = jnp.sum(scores / scores.sum(-1, keepdims=True), axis=0)
  return balance_loss_from_sums(share, load, scores.shape[0], top_k)


def balance_loss_from_sums(share, load, num_tokens: int, top_k: int):
  """`balance_loss` from its token sums: share [e] = sum_t s_i / sum_j s_j, load [e]."""
  e = load.shape[0]
  return jnp.sum(load * e / (top_k * num_tokens) * share / num_tokens)


# Weights gathered for one step of `blocked_dot`; past this it loops over chunks of blocks.
GATHER_BYTES = 64 * 2 ** 20


def blocked_dot(x, w, group_sizes, block: int = 128, gather_bytes: int = GATHER_BYTES,
                precision=None, preferred_element_type=None):
  """`jax.lax.ragged_dot` semantics (x [m k], w [g k n], rows sorted by group) as batched
  matmuls: each group's rows are padded to whole blocks of `block` rows, and each block
  multiplies its group's weight. Rows past sum(group_sizes) give zeros.

  Each block needs its own copy of a [k n] weight. While those copies fit in
  `gather_bytes` they are gathered at once and one batched matmul runs; beyond
  that a scan runs chunks of blocks, rematerialised, so memory holds one chunk's
  copies (forward and backward) instead of a weight per block. precision and
  preferred_element_type: of the batched matmuls, as in jnp.einsum.
  """
  m, k = x.shape
  g, _, n = w.shape
  blocks = -(-m // block) + g  # room for every group's partial last block
  aligned = -(-group_sizes // block) * block
  ends = jnp.cumsum(group_sizes)
  start, start_aligned = ends - group_sizes, jnp.cumsum(aligned) - aligned
  group = jnp.searchsorted(ends, jnp.arange(m), side="right")
  valid = group < g
  group = jnp.minimum(group, g - 1)
  dest = jnp.where(valid, jnp.arange(m) - start[group] + start_aligned[group], blocks * block)
  xa = jnp.zeros((blocks * block, k), x.dtype).at[dest].set(x, mode="drop")
  block_group = jnp.minimum(
      jnp.searchsorted(jnp.cumsum(aligned), jnp.arange(blocks) * block, side="right"), g - 1)
  xb = xa.reshape(blocks, block, k)
  chunk = max(1, min(blocks, gather_bytes // (k * n * w.dtype.itemsize)))
  if chunk == blocks:
    ya = jnp.einsum("bmk,bkn->bmn", xb, w[block_group], precision=precision,
                    preferred_element_type=preferred_element_type)
  else:
    steps = -(-blocks // chunk)
    pad = steps * chunk - blocks  # zero rows of group 0: zero outputs, zero weight gradient
    xs = jnp.pad(xb, ((0, pad), (0, 0), (0, 0))).reshape(steps, chunk, block, k)
    gs = jnp.pad(block_group, (0, pad)).reshape(steps, chunk)

    @jax.checkpoint
    def step(_, inputs):
      xc, gc = inputs
      return None, jnp.einsum("bmk,bkn->bmn", xc, w[gc], precision=precision,
                              preferred_element_type=preferred_element_type)

    ya = jax.lax.scan(step, None, (xs, gs))[1].reshape(steps * chunk, block, n)[:blocks]
  ya = ya.reshape(blocks * block, n)
  return jnp.where(valid[:, None], ya[jnp.minimum(dest, blocks * block - 1)], 0)


def resolve_impl(impl: str) -> str:
  """"auto" -> "blocked" on CPU, "ragged" on accelerators; other names unchanged."""
  if impl != "auto":
    return impl
  return "blocked" if jax.default_backend() == "cpu" else "ragged"


def plain_gmm(x, w, group_sizes, name=None, *, impl: str = "ragged"):
  """The grouped matmul of `impl` ("ragged" or "blocked"), with the signature of the
  low-precision `gmm` hook."""
  del name
  if impl == "blocked":
    return blocked_dot(x, w, group_sizes)
  return jax.lax.ragged_dot(x, w, group_sizes)


def ragged_experts(x, weights, experts, up, down, *, gmm: Callable = plain_gmm, first_expert=0):
  """Dropless experts. x [t d], weights/experts [t k], up [e d f], down [e f d] -> [t d] float32.

  `up` and `down` may hold a slice of the experts, from `first_expert` on (an
  int or a traced scalar); copies routed to experts outside it contribute zero.
  """
  t, k = experts.shape
  num_experts = up.shape[0]
  flat = experts.reshape(-1) - first_expert
  # Copies for other experts get the id `num_experts`: they sort last and no group counts them.
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  order = jnp.argsort(flat, stable=True)
  token = order // k
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  h = relu2(gmm(x[token], up, sizes, "up"))
  out = gmm(h.astype(x.dtype), down, sizes, "down").astype(jnp.float32)
  kept = flat[order] < num_experts
  out = out * jnp.where(kept, weights.reshape(-1)[order], 0.0)[:, None]
  return jnp.zeros((t, out.shape[-1]), jnp.float32).at[token].add(out)


def ep_capacity(copies: int, ep: int, capacity_factor: float | None) -> int:
  """Rows each shard sends each of `ep` destinations: ceil(factor * copies / ep), at most
  `copies` (None: `copies`, the worst case, so nothing is ever dropped)."""
  if capacity_factor is None:
    return copies
  return max(1, min(copies, math.ceil(capacity_factor * copies / ep)))


def emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                               recv_sizes, *, axis_name: str, max_rows: int):
  """`jax.lax.ragged_all_to_all` from a padded all-to-all of `max_rows` rows per peer (each
  send size at most that), for backends without the ragged collective and for tests."""
  ep = jax.lax.axis_size(axis_name)
  rows = jnp.arange(max_rows)
  take = jnp.minimum(input_offsets[:, None] + rows, operand.shape[0] - 1)
  chunks = jax.lax.all_to_all(operand[take], axis_name, 0, 0)  # [ep, max_rows, ...] by sender
  where = jax.lax.all_to_all(output_offsets, axis_name, 0, 0)  # where each sender writes here
  dest = jnp.where(rows < recv_sizes[:, None], where[:, None] + rows, output.shape[0])
  return output.at[dest.reshape(-1)].set(chunks.reshape(ep * max_rows, *operand.shape[1:]),
                                         mode="drop")


def expert_parallel_experts(x, weights, experts, up, down, *, axis: str, capacity: int,
                            gmm: Callable = plain_gmm, exchange: str = "auto"):
  """Inside `shard_map`: this shard's tokens through experts split over mesh axis `axis`.

  x [t d], weights/experts [t k] are this shard's; up [e/ep d f], down [e/ep f d] its
  experts. Token copies, sorted by expert, go to the shards holding their experts
  and come back after the local experts ran dropless on what arrived; each shard
  receives at most `capacity` rows from each other shard, so the receive buffer
  holds ep x capacity rows. `exchange`: "padded" sends every destination a full
  [capacity, d] block (all_to_all); "ragged" sends only the real rows
  (`ragged_all_to_all`, which XLA:CPU lacks); "emulated" runs the ragged
  exchange's offsets over a padded all-to-all; "auto" is padded on CPU and
  ragged elsewhere. -> (out [t d] float32, the number of copies dropped for want
  of capacity; their output is zero).
  """
  t, k = experts.shape
  ep = jax.lax.axis_size(axis)
  local_experts = up.shape[0]
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True)
  expert = flat[order]
  token = order // k
  dest = expert // local_experts
  counts = jnp.bincount(dest, length=ep).astype(jnp.int32)
  starts = jnp.cumsum(counts) - counts
  pos = jnp.arange(t * k) - starts[dest]
  kept = pos < capacity
  rows, ids = x[token], (expert % local_experts).astype(jnp.int32)

  def padded():
    slot = jnp.where(kept, pos, capacity)  # out of bounds: the scatters drop it
    send = jnp.zeros((ep, capacity, x.shape[-1]), x.dtype).at[dest, slot].set(rows, mode="drop")
    # Free rows carry the id `local_experts`, past every real group, so they sort last.
    send_id = jnp.full((ep, capacity), local_experts, jnp.int32).at[dest, slot].set(
        ids, mode="drop")
    got = jax.lax.all_to_all(send, axis, 0, 0).reshape(ep * capacity, -1)
    got_id = jax.lax.all_to_all(send_id, axis, 0, 0).reshape(-1)
    out = run(got, got_id)
    back = jax.lax.all_to_all(out.reshape(ep, capacity, -1), axis, 0, 0)
    return jnp.where(kept[:, None], back[dest, jnp.minimum(pos, capacity - 1)], 0)

  def ragged(collective):
    send = jnp.minimum(counts, capacity)
    recv = jax.lax.all_to_all(send, axis, 0, 0)
    here = jnp.full((ep,), jax.lax.axis_index(axis) * capacity, jnp.int32)
    slots = jnp.arange(ep, dtype=jnp.int32) * capacity
    # The received buffers vary over the mesh as the operands do (their initial values
    # alone would not): adding a zero row of the operand makes them so.
    exchange_ = lambda operand, output, *sizes: collective(
        operand, output + jnp.zeros_like(operand[:1]), *sizes, axis_name=axis)
    got = exchange_(rows, jnp.zeros((ep * capacity, x.shape[-1]), x.dtype), starts, send, here,
                    recv)
    got_id = exchange_(ids, jnp.full((ep * capacity,), local_experts, jnp.int32), starts, send,
                       here, recv)
    out = run(got, got_id)
    # Back to where each sender's rows started; dropped copies were never sent and stay zero.
    return exchange_(out, jnp.zeros((t * k, out.shape[-1]), out.dtype), slots, recv,
                     jax.lax.all_to_all(starts, axis, 0, 0), send)

  def run(got, got_id):
    by_expert = jnp.argsort(got_id, stable=True)
    sizes = jnp.bincount(got_id, length=local_experts).astype(jnp.int32)
    h = relu2(gmm(got[by_expert], up, sizes, "up"))
    out = gmm(h.astype(x.dtype), down, sizes, "down")
    return jnp.zeros_like(out).at[by_expert].set(out)

  emulated = functools.partial(emulated_ragged_all_to_all, max_rows=capacity)
  if exchange == "auto":
    back = jax.lax.platform_dependent(
        cpu=padded, default=functools.partial(ragged, jax.lax.ragged_all_to_all))
  else:
    back = {"padded": padded, "emulated": functools.partial(ragged, emulated),
            "ragged": functools.partial(ragged, jax.lax.ragged_all_to_all)}[exchange]()
  back = back.astype(jnp.float32) * jnp.where(kept, weights.reshape(-1)[order], 0.0)[:, None]
  routed = jnp.zeros((t, back.shape[-1]), jnp.float32).at[token].add(back)
  return routed, jnp.sum(~kept).astype(jnp.float32)


def routed_moe(x, h, router, bias, up, down, *, cfg, gmm: Callable = plain_gmm,
               token_axes: tuple = (), expert_axis: str | tuple | None = None,
               tensor_axes: tuple = (), capacity: int | None = None):
  """Routing, experts and statistics of one shard's tokens (the body of MoE's shard_map).

  x [t d] feeds the router, h [t w] the experts (w = latent_size for LatentMoE);
  router [d e] and bias [e] are whole, up [e' w f'] / down [e' f' w] this shard's
  experts (e' = e / expert) and expert width (f' = d_ff / tensor). token_axes:
  the mesh axes the tokens are split over (statistics are summed over them);
  expert_axis: the mesh axis, or axes (major first), the experts are split over,
  exchanging tokens by all-to-all with `capacity` rows per destination when the
  tokens are split over them too, or running the local experts on every
  (replicated) token and summing otherwise; tensor_axes:
  where the expert width is split (partial outputs summed).
  -> (routed [t w] float32, load [e], balance loss, dropped copies), the last
  three global.
  """
  num = lambda axes: math.prod(jax.lax.axis_size(a) for a in axes)
  psum = lambda v, axes: jax.lax.psum(v, axes) if axes else v
  logits = jnp.dot(x.astype(jnp.float32), router.astype(jnp.float32))
  weights, experts, scores = route(
      logits, bias, top_k=cfg.top_k, n_group=cfg.n_group, topk_group=cfg.topk_group,
      norm_topk_prob=cfg.norm_topk_prob, routed_scaling=cfg.routed_scaling)
  num_tokens = x.shape[0] * num(token_axes)
  load = psum(expert_load(experts, cfg.num_experts), token_axes)
  share = psum(jnp.sum(scores / scores.sum(-1, keepdims=True), axis=0), token_axes)
  balance = balance_loss_from_sums(share, load, num_tokens, cfg.top_k)
  dropped = jnp.zeros((), jnp.float32)
  if isinstance(expert_axis, str):
    expert_axis = (expert_axis,)
  if expert_axis is None:
    routed = ragged_experts(h, weights, experts, up, down, gmm=gmm)
  elif set(expert_axis) <= set(token_axes):
    routed, dropped = expert_parallel_experts(h, weights, experts, up, down, axis=expert_axis,
                                              capacity=capacity, gmm=gmm)
    dropped = psum(dropped, token_axes)
  else:
    first = jax.lax.axis_index(expert_axis) * up.shape[0]
    routed = jax.lax.psum(ragged_experts(h, weights, experts, up, down, gmm=gmm,
                                         first_expert=first), expert_axis)
  return psum(routed, tensor_axes), load, balance, dropped


def dense_experts(x, weights, experts, up, down):
  """Reference: every expert on every token, combined with one-hot weights. Same shapes."""
  combine = jnp.zeros((x.shape[0], up.shape[0]), jnp.float32)
  combine = combine.at[jnp.arange(x.shape[0])[:, None], experts].add(weights)
  h = relu2(jnp.einsum("td,edf->tef", x, up))
  out = jnp.einsum("tef,efd->ted", h.astype(x.dtype), down).astype(jnp.float32)
  return jnp.einsum("ted,te->td", out, combine)


class MoE(nn.Module):
  """MoE / LatentMoE mixer. __call__(x [b l d]) -> y [b l d]."""
  cfg: Any
  out_std: float
  linear: Any = basic.Linear
  # Low-precision hook: (module, h, up, down) -> gmm(x, w, group_sizes, name).
  gmm: Callable | None = None

  @nn.compact
  def __call__(self, x):
    m, e = self.cfg, self.cfg.moe
    dtype, pdtype = basic.dtype_of(m.compute_dtype), basic.dtype_of(m.param_dtype)
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])

    router = basic.param_with_axes(self, "router", nn.initializers.normal(m.init_std),
                                   (m.d_model, e.num_experts), jnp.float32, ("embed", "exp"))
    bias = self.variable("moe_state", "e_score_correction_bias",
                         lambda: jnp.zeros((e.num_experts,), jnp.float32))
    h = x2
    if e.latent_size is not None:
      h = self.linear(e.latent_size, ("embed", "latent"), m.init_std, dtype, pdtype,
                      name="fc1_latent_proj")(h)
    width = h.shape[-1]
    axis = "latent" if e.latent_size is not None else "embed"
    up = basic.param_with_axes(self, "experts_up", nn.initializers.normal(m.init_std),
                               (e.num_experts, width, e.d_ff), pdtype, ("exp", axis, "expert_mlp"))
    down = basic.param_with_axes(self, "experts_down", nn.initializers.normal(self.out_std),
                                 (e.num_experts, e.d_ff, width), pdtype, ("exp", "expert_mlp", axis))
    h, up, down = h.astype(dtype), up.astype(dtype), down.astype(dtype)
    impl = resolve_impl(e.impl)
    gmm = (self.gmm(self, h, up, down) if self.gmm
           else functools.partial(plain_gmm, impl=impl))
    if impl == "dense":
      weights, experts, scores = route(
          jnp.dot(x2.astype(jnp.float32), router.astype(jnp.float32)), bias.value,
          top_k=e.top_k, n_group=e.n_group, topk_group=e.topk_group,
          norm_topk_prob=e.norm_topk_prob, routed_scaling=e.routed_scaling)
      routed = dense_experts(h, weights, experts, up, down)
      load = expert_load(experts, e.num_experts)
      balance, dropped = balance_loss(scores, load, e.top_k), jnp.zeros((), jnp.float32)
    else:
      routed, load, balance, dropped = self._sharded(x2, h, router, bias.value, up, down, gmm)
    routed = routed.astype(dtype)
    if e.latent_size is not None:
      routed = self.linear(m.d_model, ("latent", "embed"), self.out_std, dtype, pdtype,
                           name="fc2_latent_proj")(routed)
    out = routed
    if e.shared_d_ff:
      out = out + MLP(m, e.shared_d_ff, self.out_std, self.linear, name="shared_experts")(x2)

    self.sow("moe_stats", "load", load)
    self.sow("moe_stats", "balance_loss", balance)
    self.sow("moe_stats", "dropped", dropped)
    self.sow("moe_stats", "copies", jnp.float32(x2.shape[0] * e.top_k))
    return out.reshape(shape)

  def _sharded(self, x, h, router, bias, up, down, gmm):
    """`routed_moe` on each device's own tokens under the mesh in context (directly without
    one). Specs come from the rules table: tokens split like the batch, experts and their
    width as the parameters are; every other weight axis is gathered at the boundary
    (for FSDP), so the gradients leave it reduce-scattered."""
    e = self.cfg.moe
    axis = "latent" if e.latent_size is not None else "embed"
    body = functools.partial(routed_moe, cfg=e, gmm=gmm)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
      return body(x, h, router, bias, up, down)
    rules = nn.get_logical_axis_rules() or sharding.RULES

    def spec(logical, keep=None):
      # Axes of size 1 are left out, so that values are not typed as varying over them.
      entries = [tuple(a for a in sharding.spec_axes(entry) if mesh.shape[a] > 1) or None
                 for entry in sharding.spec(logical, rules, keep)]
      return P(*entries)

    kept = ("exp", "expert_mlp")
    up_spec = spec(("exp", axis, "expert_mlp"), kept)
    down_spec = spec(("exp", "expert_mlp", axis), kept)
    expert_axes = sharding.spec_axes(up_spec[0])
    # Tokens split like the batch and, for the exchange, over any further axis the experts
    # split over (tensor, with moe.tensor_split = "experts"), where the tokens are
    # replicated: each device then routes and sends its own slice of them.
    token_axes = sharding.spec_axes(spec(("batch", None))[0])
    token_axes += tuple(a for a in expert_axes if a not in token_axes)
    size = lambda axes: math.prod(mesh.shape[a] for a in axes)
    if x.shape[0] % size(token_axes):
      # Too few tokens to split (decoding a small batch): every shard sees all of them.
      token_axes = ()
    tokens = P(token_axes or None, None)
    expert_axis = expert_axes or None
    capacity = None
    if expert_axis is not None and token_axes:
      copies = x.shape[0] // size(token_axes) * e.top_k
      capacity = ep_capacity(copies, size(expert_axes), e.ep_capacity_factor)
    body = functools.partial(body, token_axes=token_axes, expert_axis=expert_axis,
                             tensor_axes=sharding.spec_axes(up_spec[2]), capacity=capacity)
    if self.cfg.remat:
      # The block's remat does not reach inside a shard_map, which would otherwise keep
      # its residuals (token copies, expert activations) for every layer until the
      # backward pass; rematerialised here, it keeps only its inputs.
      body = jax.checkpoint(body)
    return jax.shard_map(body, in_specs=(tokens, tokens, P(), P(), up_spec, down_spec),
                         out_specs=(tokens, P(), P(), P()))(x, h, router, bias, up, down)
