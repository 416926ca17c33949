"""Multi-token prediction: what each depth reads, the training loss, gradients, checkpoints."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

import nemotron_jax as nj
from nemotron_jax import config as config_lib
from nemotron_jax import data, hf, sharding
from nemotron_jax.train_lib import Trainer
from conftest import tiny_config

DEPTHS = 2


@pytest.fixture(scope="module")
def trainer():
  c = tiny_config("*-", {"init_std": 0.1, "mtp.num_depths": DEPTHS})
  c.train.grad_clip = 0.0
  model = nj.build_model(c)
  trainer = Trainer(c, model, sharding.make_mesh(c.mesh, devices=jax.devices()[:1]))
  return trainer, trainer.init_state(0)


def packed_batch(seq_len: int = 12):
  """Row 0: two documents packed; row 1: one document, then padding (segment 0)."""
  rng = np.random.default_rng(0)
  rows = [(rng.integers(1, 64, seq_len + 1), np.repeat([1, 2], [5, seq_len - 4])),
          (rng.integers(1, 64, seq_len + 1), np.repeat([1, 0], [9, seq_len - 8]))]
  examples = [data._row_example(row, seg) for row, seg in rows]
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def reference_mtp(logits, batch, depth):
  """(mean NLL, accuracy) of depth k: position t predicts stream token t + k + 1, kept only
  when that token is real and in t's document (the stream is inputs plus the last target)."""
  nll, hits, count = 0.0, 0, 0
  b, l = batch["inputs"].shape
  for row in range(b):
    stream = np.append(batch["inputs"][row], batch["targets"][row, -1])
    seg = batch["segment_ids"][row]
    # Token j's document: the input segment, or for the last target, whether it is scored.
    doc = np.append(seg, seg[-1] if batch["loss_mask"][row, -1] else -1)
    for t in range(l):
      j = t + depth + 1
      if j <= l and seg[t] > 0 and doc[j] == seg[t]:
        logp = logits[row, t] - np.log(np.sum(np.exp(logits[row, t])))
        nll -= float(logp[stream[j]])
        hits += int(np.argmax(logits[row, t]) == stream[j])
        count += 1
  return nll / count, hits / count


def test_depth_k_reads_tokens_up_to_t_plus_k(trainer):
  tr, state = trainer
  apply = jax.jit(lambda p, t: tr.model.apply({"params": p, "moe_state": state.moe_state}, t,
                                              mtp=True))
  tokens = jnp.asarray(packed_batch()["inputs"][:1])
  _, base = apply(state.params, tokens)
  for k, logits in enumerate(base, start=1):
    changed = apply(state.params, tokens.at[0, 6].set((tokens[0, 6] + 1) % 64))[1][k - 1]
    diff = np.abs(np.asarray(changed - logits)).max(-1)[0]
    # Position t reads tokens up to t + k: a change at 6 reaches positions 6 - k and later.
    assert (diff[:6 - k] == 0).all() and diff[6 - k] > 1e-4, (k, diff)


def test_loss_is_main_plus_scaled_mtp_losses(trainer):
  tr, state = trainer
  batch = packed_batch()
  variables = {"params": state.params, "moe_state": state.moe_state}
  _, mtp_logits = jax.jit(lambda v, x, s: tr.model.apply(v, x, s, mtp=True))(
      variables, batch["inputs"], batch["segment_ids"])
  expected = [reference_mtp(np.asarray(lg), batch, k) for k, lg in enumerate(mtp_logits, 1)]
  # The step donates its input state: give it a copy, the fixture's state is shared.
  _, metrics = tr.train_step(jax.tree.map(jnp.copy, state), tr.shard_batch(batch))
  metrics = jax.device_get(metrics)
  for k, (ce, acc) in enumerate(expected, start=1):
    np.testing.assert_allclose(metrics[f"mtp_ce_{k}"], ce, rtol=1e-5)
    np.testing.assert_allclose(metrics[f"mtp_acc_{k}"], acc, rtol=1e-6)
  # The main pattern "*-" has no MoE, but the MTP block "*E" does.
  scaled = 0.3 / DEPTHS * (expected[0][0] + expected[1][0])
  np.testing.assert_allclose(metrics["mtp_loss"], scaled, rtol=1e-5)
  np.testing.assert_allclose(
      metrics["loss"], metrics["ce"] + scaled + 1e-4 * metrics["balance_loss"], rtol=1e-6)
  assert metrics["balance_loss"] > 0  # the MTP block's MoE reports its balance loss
  assert 3.0 < expected[0][0] < 6.0  # near ln(64) = 4.16 for an untrained model


def test_mtp_gradients_reach_the_shared_weights(trainer):
  tr, state = trainer
  batch = {k: jnp.asarray(v) for k, v in packed_batch().items()}

  def mtp_loss(params, depth):
    d = tr._forward(params, state.moe_state, batch, mtp=True).depths[depth - 1]
    return d.nll / d.count

  grads = jax.jit(lambda p: [jax.grad(mtp_loss)(p, k) for k in (1, 2)])(state.params)
  norms = lambda tree: {jax.tree_util.keystr(p): float(jnp.abs(x).max())
                        for p, x in jax.tree_util.tree_leaves_with_path(tree)}
  for depth in (1, 2):
    g = norms(grads[depth - 1])
    for name in ("['embedding']", "['lm_head']['kernel']", "['mtp_0']['eh_proj']['kernel']",
                 "['mtp_0']['layers_0']['mixer']['q_proj']['kernel']",
                 "['mtp_0']['layers_1']['mixer']['experts_up']",
                 "['mtp_0']['final_layernorm']['weight']",
                 "['layers_0']['mixer']['k_proj']['kernel']"):
      assert g[name] > 0, (depth, name)
    # The main model's final norm feeds depth 1 directly and depth 2 through depth 1.
    assert g["['norm_f']['weight']"] > 0


def test_mtp_weights_round_trip_through_the_hub_layout(tmp_path):
  for shared in (True, False):
    c = tiny_config("M*E", {"mtp.num_depths": DEPTHS, "mtp.share_weights": shared,
                            "mtp.pattern": "*E"})
    rng = np.random.default_rng(1)
    variables = jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                             hf.variable_shapes(c))
    path = str(tmp_path / str(shared))
    hf.save_checkpoint(c, variables, path)
    tensors = load_file(f"{path}/model.safetensors")
    assert tensors["mtp.layers.0.eh_proj.weight"].shape == (32, 64)
    last = 1 if shared else 3
    assert f"mtp.layers.{last}.final_layernorm.weight" in tensors
    assert f"mtp.layers.{last}.mixer.gate.e_score_correction_bias" in tensors
    assert f"mtp.layers.{last + 1}.norm.weight" not in tensors
    config, loaded = hf.load_checkpoint(path)
    assert (config.model.mtp.num_depths, config.model.mtp.share_weights) == (DEPTHS, shared)
    jax.tree.map(np.testing.assert_array_equal, loaded, variables)


def test_mtp_config_errors_name_the_field():
  with pytest.raises(config_lib.ConfigError, match="model.mtp.pattern"):
    nj.build_model(tiny_config("M*", {"mtp.num_depths": 1, "mtp.pattern": "*X"}))
  with pytest.raises(config_lib.ConfigError, match="model.mtp.num_depths"):
    nj.build_model(tiny_config("M*", {"mtp.num_depths": -1}))
  # A Mamba layer only in the MTP block still gets its section checked.
  with pytest.raises(config_lib.ConfigError, match="mamba.n_groups"):
    nj.build_model(tiny_config("*", {"mtp.num_depths": 1, "mtp.pattern": "M",
                                     "mamba.num_heads": 3}))
  with pytest.raises(config_lib.ConfigError, match="generation.cache_dtype"):
    nj.build_model(tiny_config("*", {"generation.cache_dtype": "int8"}))
  assert math.isclose(config_lib.default_config().model.mtp.loss_scale, 0.3)
