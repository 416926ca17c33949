"""Cached generation: prefill, cached decoding, MTP speculative decoding, reasoning budget.

Layout. Prompts are left-padded to one length P: row b's prompt fills slots
[start_b, P) and generated tokens follow from slot P. Every cache has S
slots (prompt, generated tokens, and room for drafts); `Cache.length` is
the next slot to fill. Attention layers keep keys/values per slot; Mamba
layers keep their conv and SSM state, whose size does not grow with S.

Prefill runs the whole padded prompt through the chunked SSD, with segment
ids that keep padding apart. Decoding appends T tokens per row (`extend`):
Mamba layers step through `ssd_decode_step` and return the state after each
token, so `commit` can keep any prefix (T = 1 for plain decoding, the draft
length + 1 for verifying drafts).

`generate` runs two jitted functions: prefill, then one `lax.while_loop`. Plain
decoding is the loop with no drafts. Speculative decoding drafts with the
MTP head (depth k proposes the token k ahead), verifies the pending token and
the drafts in one forward of the main model and keeps the longest prefix of
drafts that greedy decoding agrees with, plus the main model's next token;
so it yields exactly the greedy tokens.

The MTP drafts are those of training: depth k at slot t reads the depth
k - 1 output at t and token t + k. Each depth keeps its own cache. Its
entries at slot t depend on tokens up to t + k, so they are final only once
those tokens are accepted: every depth's cache is committed up to slot
n - draft_length (n: the main model's length), and each round recomputes the
slots after it, a window of at most 2 * draft_length + 1 slots.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nemotron_jax.layers import basic
from nemotron_jax.layers.attention import KVCache
from nemotron_jax.layers.mamba import MambaState
from nemotron_jax.model import NemotronH


class Cache(NamedTuple):
  """The inference state of a stack of blocks (the main model or one MTP depth)."""
  layers: tuple  # per block: KVCache (S slots), MambaState, or None
  start: jax.Array  # [b] int32: the first slot of the prompt; earlier slots are padding
  length: jax.Array  # [b] int32: slots filled; the next token goes to slot `length`


class Generation(NamedTuple):
  """Output of `generate`."""
  tokens: np.ndarray  # [b, max_new_tokens] int32; zeros after `lengths`
  lengths: np.ndarray  # [b] generated tokens per row (an EOS token included)
  # Tokens emitted per forward of the main model, averaged over rows and steps:
  # 1 for plain decoding, accepted drafts + 1 for speculative decoding.
  acceptance_length: float
  forward_passes: int  # decoding steps of the main model after prefill
  # Wall times of this call (a new shape or option also compiles): prefill with the first
  # token, then the decoding loop.
  prefill_seconds: float
  decode_seconds: float

  def to_lists(self) -> list[list[int]]:
    return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def cache_dtypes(m) -> tuple[Any, Any]:
  """(dtype of keys/values and conv states, dtype of SSM states) for a model section."""
  g = m.generation
  return basic.dtype_of(g.cache_dtype or m.compute_dtype), basic.dtype_of(g.ssm_state_dtype)


def cache_bytes(m, context: int) -> dict[str, int]:
  """Inference cache bytes of one sequence after `context` tokens, from the config alone.

  Attention layers keep keys and values of every token (a sliding window
  masks, but this cache does not shrink to it); Mamba layers keep the conv
  state (conv_kernel - 1 inputs of x, B, C) and the SSM state, whatever the
  context. `mtp_per_depth` is what each draft depth adds in speculative decoding.
  """
  kv_dtype, ssm_dtype = (np.dtype(d).itemsize for d in cache_dtypes(m))
  a, s = m.attention, m.mamba
  per = {"*": 2 * context * a.num_kv_heads * a.head_dim * kv_dtype,
         "M": ((s.conv_kernel - 1) * (s.num_heads * s.head_dim + 2 * s.n_groups * s.d_state)
               * kv_dtype + s.num_heads * s.head_dim * s.d_state * ssm_dtype)}
  out = {"attention": m.pattern.count("*") * per["*"], "mamba": m.pattern.count("M") * per["M"]}
  out["total"] = out["attention"] + out["mamba"]
  out["mtp_per_depth"] = (sum(per.get(ch, 0) for ch in m.mtp.pattern)
                          if m.mtp.num_depths else 0)
  return out


def _stored(m, layers, slots: int) -> tuple:
  """Layer caches as returned by a full-sequence forward -> cache dtypes, keys padded to `slots`."""
  kv_dtype, ssm_dtype = cache_dtypes(m)
  out = []
  for layer in layers:
    if isinstance(layer, KVCache):
      extra = slots - layer.k.shape[2]
      layer = KVCache(jnp.pad(layer.k.astype(kv_dtype), ((0, 0), (0, 0), (0, extra), (0, 0))),
                      jnp.pad(layer.v.astype(kv_dtype), ((0, 0), (0, 0), (0, 0), (0, extra))))
    elif isinstance(layer, MambaState):
      layer = MambaState(layer.conv.astype(kv_dtype), layer.ssm.astype(ssm_dtype))
    out.append(layer)
  return tuple(out)


def padding_segments(start: jax.Array, length: int) -> jax.Array:
  """Segment ids [b length]: 0 on left padding, 1 on the prompt."""
  return (jnp.arange(length)[None] >= start[:, None]).astype(jnp.int32)


def prefill(model: NemotronH, variables, tokens: jax.Array, start: jax.Array, slots: int):
  """Left-padded prompts tokens [b P] (start [b]) -> (hidden [b P d], Cache of `slots` slots)."""
  hidden, layers = model.apply(variables, tokens, padding_segments(start, tokens.shape[1]),
                               method=NemotronH.forward)
  length = jnp.full_like(start, tokens.shape[1])
  return hidden, Cache(_stored(model.cfg, layers, slots), start, length)


def commit(m, cache: Cache, staged: tuple, count: jax.Array) -> Cache:
  """Keeps the first count[b] of the tokens `extend` appended (0 <= count <= T).

  Attention slots past the kept tokens are ignored and later overwritten;
  Mamba layers keep the state after the last kept token.
  """
  kv_dtype, ssm_dtype = cache_dtypes(m)
  pick = jax.vmap(lambda states, i: states[jnp.maximum(i - 1, 0)])
  layers = []
  for old, new in zip(cache.layers, staged):
    if isinstance(new, MambaState):
      keep = lambda o, s, dtype: jnp.where(
          (count > 0).reshape((-1,) + (1,) * (o.ndim - 1)), pick(s, count).astype(dtype), o)
      new = MambaState(keep(old.conv, new.conv, kv_dtype), keep(old.ssm, new.ssm, ssm_dtype))
    layers.append(new)
  return Cache(tuple(layers), cache.start, cache.length + count)


def extend(model: NemotronH, variables, cache: Cache, tokens: jax.Array):
  """Runs tokens [b T] from slot cache.length -> (hidden [b T d], staged layers for `commit`)."""
  return model.apply(variables, tokens, None, cache.layers, cache.start, cache.length,
                     method=NemotronH.forward)


def decode(model: NemotronH, variables, cache: Cache, tokens: jax.Array):
  """Appends and keeps tokens [b T]: -> (hidden [b T d], Cache)."""
  hidden, staged = extend(model, variables, cache, tokens)
  count = jnp.full_like(cache.length, tokens.shape[1])
  return hidden, commit(model.cfg, cache, staged, count)


def logits_of(model: NemotronH, variables, hidden: jax.Array) -> jax.Array:
  """Hidden states [.. d] after the final norm -> logits [.. vocab] float32."""
  return model.apply(variables, hidden, method=NemotronH.head)


# --- sampling and constraints ----------------------------------------------------------------


class Sampling(NamedTuple):
  """Static decoding options (hashable, so one compile per setting)."""
  max_new_tokens: int
  greedy: bool
  temperature: float
  top_k: int
  top_p: float
  draft_length: int  # 0: plain decoding
  eos_id: int | None
  think_budget: int | None  # None: no reasoning budget
  think_end: tuple[int, ...]  # the end-of-thinking marker


def sample_logits(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """logits [b V] -> tokens [b] int32: argmax, or sampling with temperature, top-k, top-p."""
  if s.greedy:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / s.temperature
  if s.top_k:
    cutoff = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < cutoff, -jnp.inf, logits)
  if s.top_p < 1.0:
    # Keep the most likely tokens whose probabilities, before each, sum to less than top_p.
    order = jnp.argsort(-logits, axis=-1)
    sorted_logits = jnp.take_along_axis(logits, order, -1)
    probs = jax.nn.softmax(sorted_logits, -1)
    before = jnp.cumsum(probs, -1) - probs
    cut = jnp.where(before < s.top_p, sorted_logits, jnp.inf).min(-1, keepdims=True)
    logits = jnp.where(logits < cut, -jnp.inf, logits)
  return jax.random.categorical(key, logits).astype(jnp.int32)


class Think(NamedTuple):
  """Per-row reasoning-budget state."""
  mode: jax.Array  # [b] int32: 0 thinking, j >= 1 forcing marker token j - 1, -1 answering
  recent: jax.Array  # [b, len(marker)] the last tokens, to spot a marker the model wrote itself


def think_start(batch: int, s: Sampling) -> Think:
  mode = jnp.zeros((batch,), jnp.int32) if s.think_budget is not None else jnp.full((batch,), -1)
  return Think(mode.astype(jnp.int32), jnp.full((batch, max(len(s.think_end), 1)), -1, jnp.int32))


def constrain(token, index, think: Think, s: Sampling):
  """Applies the reasoning budget to the proposed token [b] at generated index [b].

  The generation starts inside a thinking segment. If the marker has not
  appeared within `think_budget` tokens, its tokens are forced, then the
  answer follows freely. Returns (token, Think).
  """
  if s.think_budget is None:
    return token, think
  marker = jnp.asarray(s.think_end, jnp.int32)
  mode = jnp.where((think.mode == 0) & (index >= s.think_budget), 1, think.mode)
  forcing = mode >= 1
  token = jnp.where(forcing, marker[jnp.clip(mode - 1, 0, len(s.think_end) - 1)], token)
  recent = jnp.concatenate([think.recent[:, 1:], token[:, None]], axis=1)
  wrote_marker = (mode == 0) & jnp.all(recent == marker, axis=1)
  mode = jnp.where(forcing, jnp.where(mode == len(s.think_end), -1, mode + 1),
                   jnp.where(wrote_marker, -1, mode))
  return token, Think(mode, recent)


# --- the loop --------------------------------------------------------------------------------


def _gather(x, index):
  """x [b L ...] at per-row positions index [b T] (clipped) -> [b T ...]."""
  index = jnp.clip(index, 0, x.shape[1] - 1)
  return jax.vmap(lambda row, i: row[i])(x, index)


def _write(x, values, index):
  """x [b L ...] with values [b T ...] written at per-row offsets index [b]."""
  return jax.vmap(lambda row, v, i: jax.lax.dynamic_update_slice_in_dim(row, v, i, 0))(
      x, values.astype(x.dtype), index)


class _Loop(NamedTuple):
  cache: Cache  # the main model; cache.length = n, the slot of the pending token
  mtp: tuple  # one Cache per draft depth; all share length f (committed slots)
  hidden: jax.Array  # [b W d] main-model hidden states of slots f .. f + W - 1
  seq: jax.Array  # [b slots] every token by slot: prompt, generated, current drafts
  out: jax.Array  # [b max_new + draft + 1] generated tokens
  count: jax.Array  # [b] generated tokens, the pending one included
  done: jax.Array  # [b] bool
  think: Think
  key: jax.Array
  steps: jax.Array  # main-model decoding steps
  emitted: jax.Array  # tokens emitted by active rows, summed over steps
  active: jax.Array  # active rows, summed over steps


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _start(model: NemotronH, variables, tokens, start, key, s: Sampling) -> _Loop:
  """Prefill of the main model (and the MTP depths) and the first token: the loop's state."""
  m = model.cfg
  b, p = tokens.shape
  depth = s.draft_length
  window = 2 * depth + 1
  slots = p + s.max_new_tokens + window + 1
  hidden, cache = prefill(model, variables, tokens, start, slots)
  key, sub = jax.random.split(key)
  first = sample_logits(logits_of(model, variables, hidden[:, -1]), sub, s)
  think = think_start(b, s)
  first, think = constrain(first, jnp.zeros((b,), jnp.int32), think, s)
  seq = jnp.zeros((b, slots + window), jnp.int32).at[:, :p].set(tokens).at[:, p].set(first)

  # MTP caches hold slots [0, p - depth) after prefill; p > depth by construction.
  mtp, frontier = [], p - depth
  h, seg = hidden[:, :frontier], padding_segments(start, frontier)
  for k in range(1, depth + 1):
    h, layers = model.apply(variables, k, h, tokens[:, k:frontier + k], seg,
                            method=NemotronH.mtp_depth)
    mtp.append(Cache(_stored(m, layers, slots), start, jnp.full_like(start, frontier)))
  buffer = jnp.zeros((b, window, hidden.shape[-1]), hidden.dtype).at[:, :depth].set(
      hidden[:, frontier:])

  out = jnp.zeros((b, s.max_new_tokens + depth + 1), jnp.int32).at[:, 0].set(first)
  done = jnp.full((b,), s.max_new_tokens <= 1)
  if s.eos_id is not None:
    done |= first == s.eos_id
  zero = jnp.zeros((), jnp.int32)
  return _Loop(cache, tuple(mtp), buffer, seq, out, jnp.ones((b,), jnp.int32), done, think, key,
               zero, zero, zero)


@functools.partial(jax.jit, static_argnames=("model", "s"))
def _decode(model: NemotronH, variables, state: _Loop, s: Sampling):
  """The decoding loop: one step per forward of the main model until every row is done."""
  m = model.cfg
  b = state.count.shape[0]
  depth = s.draft_length
  window = 2 * depth + 1

  def draft(st: _Loop):
    """Drafts [b depth] from the MTP head; commits the MTP caches up to slot n - depth."""
    n, f = st.cache.length, st.mtp[0].length
    at = (n - 1 - f)[:, None]
    commit_count = jnp.maximum(n - depth - f, 0)
    window_slots = f[:, None] + jnp.arange(window)[None]
    h, seq, caches, drafts = st.hidden, st.seq, [], []
    for k in range(1, depth + 1):
      nxt = _gather(seq, window_slots + k)
      h, staged = model.apply(variables, k, h, nxt, None, st.mtp[k - 1].layers,
                              st.mtp[k - 1].start, f, method=NemotronH.mtp_depth)
      logits = logits_of(model, variables, _gather(h, at)[:, 0])
      token = jnp.argmax(logits, -1).astype(jnp.int32)
      seq = _write(seq, token[:, None], n + k)
      drafts.append(token)
      caches.append(commit(m, st.mtp[k - 1], staged, commit_count))
    hidden = _gather(st.hidden, commit_count[:, None] + jnp.arange(window)[None])
    return jnp.stack(drafts, 1), tuple(caches), hidden, seq

  def step(st: _Loop) -> _Loop:
    n = st.cache.length
    if depth:
      drafts, mtp, hidden, seq = draft(st)
    else:
      drafts, mtp, hidden, seq = jnp.zeros((b, 0), jnp.int32), st.mtp, st.hidden, st.seq
    pending = _gather(seq, n[:, None])
    h, staged = extend(model, variables, st.cache, jnp.concatenate([pending, drafts], 1))
    key, sub = jax.random.split(st.key)
    if s.greedy:
      proposed = jnp.argmax(logits_of(model, variables, h), -1).astype(jnp.int32)
    else:
      proposed = sample_logits(logits_of(model, variables, h[:, 0]), sub, s)[:, None]
    # Accepted drafts: the leading ones the main model would have produced itself.
    agree = jnp.cumprod((drafts == proposed[:, :depth]).astype(jnp.int32), axis=1).sum(1)

    # Emit proposed tokens 0..agree in order until EOS, the length limit, or a forced token.
    think, going = st.think, ~st.done
    emitted, tokens_out = jnp.zeros((b,), jnp.int32), []
    for j in range(depth + 1):
      live = going & (j <= agree)
      token, new_think = constrain(proposed[:, j], st.count + j, think, s)
      think = jax.tree.map(lambda a, c: jnp.where(live.reshape((-1,) + (1,) * (a.ndim - 1)), a, c),
                           new_think, think)
      tokens_out.append(token)
      emitted += live
      stop = (token != proposed[:, j]) | (st.count + j + 1 >= s.max_new_tokens)
      if s.eos_id is not None:
        stop |= token == s.eos_id
      going = live & ~stop
    tokens_out = jnp.stack(tokens_out, 1)
    out = _write(st.out, tokens_out, st.count)
    seq = _write(seq, tokens_out, n + 1)
    last = _gather(tokens_out, jnp.maximum(emitted - 1, 0)[:, None])[:, 0]
    done = st.done | (st.count + emitted >= s.max_new_tokens)
    if s.eos_id is not None:
      done |= (emitted > 0) & (last == s.eos_id)

    cache = commit(m, st.cache, staged, emitted)
    if depth:
      hidden = _write(hidden, h, n - mtp[0].length)
    active = (~st.done).astype(jnp.int32)
    return _Loop(cache, mtp, hidden, seq, out, st.count + emitted, done, think, key,
                 st.steps + 1, st.emitted + emitted.sum(), st.active + active.sum())

  final = jax.lax.while_loop(lambda st: ~jnp.all(st.done), step, state)
  return final.out[:, :s.max_new_tokens], final.count, final.steps, final.emitted, final.active


# --- the public API --------------------------------------------------------------------------


def left_pad(prompts, *, pad_to: int = 16, min_length: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Prompts -> (tokens [b P] int32 left-padded with zeros, start [b]).

  `prompts` is a list of token lists (or 1-D arrays), one 1-D array (one
  prompt), or a pair (tokens [b L], lengths [b]) of right-padded prompts.
  P is the longest prompt rounded up to a multiple of `pad_to` (fewer
  compiles across calls) and at least `min_length`.
  """
  if isinstance(prompts, tuple) and len(prompts) == 2:
    array, lengths = np.asarray(prompts[0]), np.asarray(prompts[1])
    if array.ndim != 2 or lengths.shape != (array.shape[0],):
      raise ValueError(f"prompts = (tokens, lengths) needs tokens [b, L] and lengths [b]; got "
                       f"shapes {array.shape} and {lengths.shape}")
    if lengths.min(initial=1) < 1 or lengths.max(initial=0) > array.shape[1]:
      raise ValueError(f"prompt lengths {lengths.tolist()} must lie in [1, {array.shape[1]}]")
    rows = [array[i, :n] for i, n in enumerate(lengths)]
  elif isinstance(prompts, (np.ndarray, jax.Array)) and np.ndim(prompts) == 1:
    rows = [np.asarray(prompts)]
  else:
    rows = [np.asarray(r) for r in prompts]
  if not rows or any(r.ndim != 1 or r.size == 0 for r in rows):
    raise ValueError("prompts must hold at least one prompt, each a non-empty 1-D token sequence")
  longest = max(len(r) for r in rows)
  length = max(-(-longest // pad_to) * pad_to, min_length)
  tokens = np.zeros((len(rows), length), np.int32)
  start = np.zeros((len(rows),), np.int32)
  for i, r in enumerate(rows):
    tokens[i, length - len(r):] = r
    start[i] = length - len(r)
  return tokens, start


def generate(model: NemotronH, variables, prompts, max_new_tokens: int, *, greedy: bool = True,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             rng: jax.Array | None = None, speculative: bool = False,
             draft_length: int | None = None, eos_id: int | None = None,
             think_budget: int | None = None, think_end: str | Sequence[int] | None = None,
             tokenizer=None, pad_to: int = 16) -> Generation:
  """Generates up to `max_new_tokens` per prompt with the caches, in one jitted loop.

  prompts: a list of token lists, one 1-D array, or (tokens [b L] right-padded, lengths [b]).
  greedy: argmax; else sampling at `temperature`, limited to the `top_k` most likely
    tokens (0: all) and the smallest set whose probability reaches `top_p`, with `rng`.
  speculative: draft `draft_length` tokens (default model.mtp.num_depths) per step with
    the MTP head and verify them in one forward; greedy only, and gives the greedy tokens
    (in float32; in lower precision the multi-token verify can round differently).
  eos_id: a row stops after emitting it.
  think_budget, think_end: reasoning budget. The prompt is taken to end inside a thinking
    segment; if the marker `think_end` (token ids, or a string with `tokenizer`) has not
    been generated after `think_budget` tokens, it is inserted and the answer follows.
  Returns a Generation: tokens [b max_new_tokens] (zeros past each row's length), lengths,
  the acceptance length, and the prefill and decoding wall times.
  """
  m = model.cfg
  if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens = {max_new_tokens!r} is invalid: expected a positive integer")
  if not greedy:
    if not temperature > 0:
      raise ValueError(f"temperature = {temperature} is invalid: expected > 0 (or greedy=True)")
    if not 0 < top_p <= 1:
      raise ValueError(f"top_p = {top_p} is invalid: expected 0 < top_p <= 1")
    if not isinstance(top_k, int) or not 0 <= top_k <= m.vocab_size:
      raise ValueError(f"top_k = {top_k!r} is invalid: expected 0 (off) to "
                       f"vocab_size = {m.vocab_size}")
  depth = 0
  if speculative:
    if not m.mtp.num_depths:
      raise ValueError("speculative=True drafts with the MTP head, but model.mtp.num_depths = 0")
    if not greedy:
      raise ValueError("speculative=True verifies drafts greedily: use greedy=True")
    depth = m.mtp.num_depths if draft_length is None else draft_length
    limit = None if m.mtp.share_weights else m.mtp.num_depths
    if not isinstance(depth, int) or depth < 1 or (limit and depth > limit):
      raise ValueError(f"draft_length = {depth!r} is invalid: expected 1 to "
                       + (f"model.mtp.num_depths = {limit} (unshared MTP blocks)" if limit
                          else "any positive integer (the MTP block is shared across depths)"))
  marker = ()
  if think_budget is not None:
    if not isinstance(think_budget, int) or think_budget < 0:
      raise ValueError(f"think_budget = {think_budget!r} is invalid: expected a token count >= 0")
    if isinstance(think_end, str):
      if tokenizer is None:
        raise ValueError(f"think_end = {think_end!r} is a string: pass the tokenizer to encode it")
      think_end = tokenizer.encode(think_end)
    marker = tuple(int(t) for t in (think_end if think_end is not None else ()))
    if not marker or not all(0 <= t < m.vocab_size for t in marker):
      raise ValueError(f"think_end = {think_end!r} is invalid: expected the end-of-thinking marker "
                       f"as token ids in [0, {m.vocab_size}) or a string")
  if eos_id is not None and not 0 <= eos_id < m.vocab_size:
    raise ValueError(f"eos_id = {eos_id} is invalid: expected a token id in [0, {m.vocab_size})")

  tokens, start = left_pad(prompts, pad_to=pad_to, min_length=depth + 1)
  if tokens.max() >= m.vocab_size or tokens.min() < 0:
    raise ValueError(f"prompts hold token ids outside [0, vocab_size = {m.vocab_size})")
  if greedy:  # the sampling options do not apply: one compile for every greedy call
    temperature, top_k, top_p = 1.0, 0, 1.0
  s = Sampling(max_new_tokens, greedy, float(temperature), top_k, float(top_p), depth, eos_id,
               think_budget, marker)
  key = jax.random.PRNGKey(0) if rng is None else rng
  begin = time.perf_counter()
  state = jax.block_until_ready(
      _start(model, variables, jnp.asarray(tokens), jnp.asarray(start), key, s))
  middle = time.perf_counter()
  out, count, steps, emitted, active = jax.device_get(_decode(model, variables, state, s))
  end = time.perf_counter()
  out = np.where(np.arange(max_new_tokens)[None] < count[:, None], out, 0)
  return Generation(out, count, float(emitted) / max(float(active), 1.0), int(steps),
                    middle - begin, end - middle)
