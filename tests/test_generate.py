"""Cached generation against the uncached model: prefill + decode logits, greedy, speculative
decoding, sampling filters and the reasoning budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nemotron_jax as nj
from nemotron_jax import generate as gen
from conftest import tiny_config

DEPTHS = 2
# Prompts of different lengths, so left padding differs per row.
PROMPTS = [[5, 9, 2, 33, 7, 1, 60, 12, 8, 3, 44], [17, 4], [1, 2, 3, 4, 5, 6, 7]]
MAX_NEW = 12
THINK = dict(think_budget=4, think_end=[62, 63], eos_id=50)


@pytest.fixture(scope="module")
def hybrid():
  """All four mixer types and a 2-depth MTP head; init_std 0.1 gives logits of order 1."""
  c = tiny_config("M*-EM", {"init_std": 0.1, "mtp.num_depths": DEPTHS})
  model = nj.build_model(c)
  return model, jax.jit(lambda: nj.init_variables(model, jax.random.PRNGKey(0)))()


@pytest.fixture(scope="module")
def apply(hybrid):
  return jax.jit(hybrid[0].apply)


def bigram_variables(model, variables, noise: float):
  """Every mixer writes zeros, so the model is a bigram table: logits = head(norm(embed(x_t))).

  The MTP block then sees only enorm(embed(token t + k)) through eh_proj = [I; 0] + noise,
  so its drafts are (up to the noise) exactly the main model's next tokens.
  """
  silent = ("out_proj", "o_proj", "down_proj", "experts_down", "fc2_latent_proj")

  def edit(path, x):
    names = [getattr(p, "key", "") for p in path]
    if any(name in silent for name in names):
      return jnp.zeros_like(x)
    if "eh_proj" in names:
      d = x.shape[1]
      eye = jnp.concatenate([jnp.eye(d), jnp.zeros((d, d))], 0)
      return eye + noise * jax.random.normal(jax.random.PRNGKey(1), x.shape)
    return x

  return {**variables, "params": jax.tree_util.tree_map_with_path(edit, variables["params"])}


def reference(apply, variables, prompts, max_new, *, think_budget, think_end, eos_id):
  """Greedy decoding with the full uncached forward over a fixed buffer, one row at a time."""
  length = max(len(p) for p in prompts) + max_new
  rows = []
  for prompt in prompts:
    seq, out, thinking, force = list(prompt), [], True, []
    for i in range(max_new):
      buffer = jnp.asarray([seq + [0] * (length - len(seq))], jnp.int32)
      token = int(jnp.argmax(apply(variables, buffer)[0, len(seq) - 1]))
      if thinking and not force and i >= think_budget:
        force = list(think_end)
      if force:
        token = force.pop(0)
        thinking = bool(force)
      out.append(token)
      seq.append(token)
      if thinking and out[-len(think_end):] == list(think_end):
        thinking = False
      if token == eos_id:
        break
    rows.append(out)
  return rows


def check_prefill_then_decode(model, variables, apply):
  """Left-padded prompts, prefill, then 7 tokens as 1 + 3 + 1 + 1 + 1: logits of every position
  equal the full forward's."""
  rng = np.random.default_rng(0)
  seqs = [rng.integers(0, 64, n) for n in (13, 9, 20)]
  new = 7
  tokens, start = gen.left_pad([s[:-new] for s in seqs], pad_to=8)
  prefill = jax.jit(gen.prefill, static_argnums=(0, 4))
  decode = jax.jit(gen.decode, static_argnums=(0,))
  hidden, cache = prefill(model, variables, jnp.asarray(tokens), jnp.asarray(start), 32)
  pieces, offset = [hidden], tokens.shape[1]
  for size in (1, 3, 1, 1, 1):
    cols = [s[len(s) - new + offset - tokens.shape[1] + np.arange(size)] for s in seqs]
    h, cache = decode(model, variables, cache, jnp.asarray(np.stack(cols), jnp.int32))
    pieces.append(h)
    offset += size
  logits = gen.logits_of(model, variables, jnp.concatenate(pieces, 1))
  assert (np.asarray(cache.length) == tokens.shape[1] + new).all()
  # Right padding leaves each row's own positions unchanged (causality).
  full = np.asarray(apply(variables, jnp.asarray(gen.left_pad(
      [s[::-1] for s in seqs], pad_to=1)[0][:, ::-1].copy())))
  assert np.abs(full).max() > 1.0
  for row, s in enumerate(seqs):
    # fp32 throughout: chunked vs token-by-token SSD differ only by rounding.
    np.testing.assert_allclose(logits[row, start[row]:], full[row, :len(s)], atol=2e-5, rtol=0)


def test_prefill_then_decode_matches_full_forward(hybrid, apply):
  check_prefill_then_decode(*hybrid, apply)


def test_rope_and_sliding_window_decode_match_full_forward():
  # Cached positions are slot - start; the window counts slots back from each query.
  c = tiny_config("*", {"init_std": 0.1, "attention.pos_emb": "rope",
                        "attention.sliding_window": 6})
  model = nj.build_model(c)
  variables = jax.jit(lambda: nj.init_variables(model, jax.random.PRNGKey(0)))()
  check_prefill_then_decode(model, variables, jax.jit(model.apply))


def test_greedy_budget_and_eos_match_uncached_reference(hybrid, apply):
  model, variables = hybrid
  for v in (variables, bigram_variables(model, variables, 0.0)):
    out = gen.generate(model, v, PROMPTS, MAX_NEW, **THINK)
    expected = reference(apply, v, PROMPTS, MAX_NEW, **THINK)
    assert out.to_lists() == expected
    assert out.acceptance_length == 1.0
    # The cases are live: the marker is forced at the budget, and rows end early at EOS or not.
    assert all(row[4:6] == [62, 63] for row in expected if len(row) > 5)
    np.testing.assert_array_equal(out.tokens[out.lengths < MAX_NEW][:, -1], 0)
  # The bigram model (last) never emits EOS (50); the random model ends every row early with it.
  assert [len(row) for row in expected] == [MAX_NEW] * 3
  assert sorted(gen.generate(model, variables, PROMPTS, MAX_NEW, **THINK).lengths) == [2, 7, 7]


def test_speculative_decoding_gives_the_greedy_tokens(hybrid):
  model, variables = hybrid
  # Random drafts (None) are rarely right; exact drafts (0.0) are all kept except where the
  # budget or the length limit cuts a step short; noisy drafts (0.06) are kept now and then.
  for noise, lo, hi in ((None, 1.0, 1.2), (0.0, 2.0, 3.0), (0.06, 1.05, 1.9)):
    v = variables if noise is None else bigram_variables(model, variables, noise)
    plain = gen.generate(model, v, PROMPTS, MAX_NEW, **THINK)
    spec = gen.generate(model, v, PROMPTS, MAX_NEW, speculative=True, **THINK)
    assert spec.to_lists() == plain.to_lists()
    assert lo <= spec.acceptance_length <= hi, (noise, spec.acceptance_length)
    if noise is not None:
      assert spec.forward_passes < plain.forward_passes


def test_sampling_filters_reduce_to_greedy(hybrid):
  model, variables = hybrid
  greedy = gen.generate(model, variables, PROMPTS, MAX_NEW, **THINK)
  narrow = gen.generate(model, variables, PROMPTS, MAX_NEW, greedy=False, temperature=0.7,
                        top_k=3, top_p=1e-6, rng=jax.random.PRNGKey(3), **THINK)
  assert narrow.to_lists() == greedy.to_lists()


def test_sample_logits_draws_from_the_kept_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 4000))
  keys = jax.random.PRNGKey(0)
  base = dict(max_new_tokens=1, greedy=False, temperature=1.0, draft_length=0, eos_id=None,
              think_budget=None, think_end=())
  top_p = gen.sample_logits(logits, keys, gen.Sampling(top_k=0, top_p=0.7, **base))
  assert set(np.unique(top_p).tolist()) == {0, 1}  # 0.5 alone is short of 0.7; 0.5 + 0.3 is not
  assert abs(float(jnp.mean(top_p == 0)) - 0.5 / 0.8) < 0.03
  top_k = gen.sample_logits(logits, keys, gen.Sampling(top_k=3, top_p=1.0, **base))
  assert set(np.unique(top_k).tolist()) == {0, 1, 2}
  hot = gen.sample_logits(logits, keys,
                          gen.Sampling(top_k=0, top_p=1.0, **{**base, "temperature": 100.0}))
  assert abs(float(jnp.mean(hot == 3)) - 0.25) < 0.03  # a high temperature flattens it


def test_constrain_forces_the_marker_once():
  s = gen.Sampling(1, True, 1.0, 0, 1.0, 0, None, 2, (62, 63))
  think = gen.think_start(2, s)
  # Row 0 writes the marker itself at steps 0-1; row 1 reaches the budget and gets it forced.
  proposed = [[62, 5], [63, 6], [7, 7], [8, 8], [9, 9]]
  out = []
  for i, tokens in enumerate(proposed):
    token, think = gen.constrain(jnp.asarray(tokens), jnp.full((2,), i), think, s)
    out.append(np.asarray(token).tolist())
  assert [o[0] for o in out] == [62, 63, 7, 8, 9]
  assert [o[1] for o in out] == [5, 6, 62, 63, 9]
  np.testing.assert_array_equal(think.mode, [-1, -1])


def test_left_pad_accepts_lists_arrays_and_lengths():
  tokens, start = gen.left_pad([[1, 2, 3], [4]], pad_to=4)
  np.testing.assert_array_equal(tokens, [[0, 1, 2, 3], [0, 0, 0, 4]])
  np.testing.assert_array_equal(start, [1, 3])
  same = gen.left_pad((np.array([[1, 2, 3], [4, 9, 9]]), np.array([3, 1])), pad_to=4)
  np.testing.assert_array_equal(same[0], tokens)
  tokens, start = gen.left_pad(np.arange(1, 4), pad_to=2, min_length=6)
  assert tokens.shape == (1, 6) and start.tolist() == [3]
  with pytest.raises(ValueError, match="non-empty"):
    gen.left_pad([[1], []])


def test_invalid_options_name_the_problem(hybrid):
  model, variables = hybrid
  plain = nj.build_model(tiny_config("M*"))
  with pytest.raises(ValueError, match="mtp.num_depths = 0"):
    gen.generate(plain, None, PROMPTS, 4, speculative=True)
  with pytest.raises(ValueError, match="greedy=True"):
    gen.generate(model, variables, PROMPTS, 4, speculative=True, greedy=False)
  unshared = nj.build_model(tiny_config("M*", {"mtp.num_depths": 2, "mtp.share_weights": False}))
  with pytest.raises(ValueError, match="draft_length = 3"):
    gen.generate(unshared, None, PROMPTS, 4, speculative=True, draft_length=3)
  with pytest.raises(ValueError, match="top_p"):
    gen.generate(model, variables, PROMPTS, 4, greedy=False, top_p=0.0)
  with pytest.raises(ValueError, match="think_end"):
    gen.generate(model, variables, PROMPTS, 4, think_budget=3)
  with pytest.raises(ValueError, match="outside"):
    gen.generate(model, variables, [[70]], 4)
