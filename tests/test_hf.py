"""Logit parity with transformers' NemotronHForCausalLM (torch, CPU, float32) and checkpoint I/O."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from nemotron_jax import build_model, hf  # noqa: E402

BASE = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=48, mamba_num_heads=4, mamba_head_dim=8,
            ssm_state_size=16, n_groups=2, chunk_size=8, n_routed_experts=8,
            num_experts_per_tok=2, moe_intermediate_size=16,
            moe_shared_expert_intermediate_size=24, initializer_range=0.2)
TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}
CASES = {
    # Nemotron-H: Mamba, attention and dense MLP layers.
    "dense": dict(pattern="M-M*-M", n_groups=4),
    # Nemotron 3 Nano: MoE with group-limited routing and a routed scale.
    "moe": dict(pattern="MEM*EM", n_group=4, topk_group=2, routed_scaling_factor=2.5),
    # Nemotron 3 Super: LatentMoE with more experts in a smaller latent.
    "latent": dict(pattern="ME*EM", moe_latent_size=16, n_routed_experts=16,
                   num_experts_per_tok=4, n_group=2, topk_group=1, routed_scaling_factor=5.0),
}


def build_reference(case: str, path: str):
  """A random transformers model whose every parameter matters, saved with save_pretrained."""
  kw = {**BASE, **CASES[case]}
  pattern = kw.pop("pattern")
  cfg = transformers.NemotronHConfig(layers_block_type=[TYPES[c] for c in pattern], **kw)
  torch.manual_seed(len(case))
  model = transformers.NemotronHForCausalLM(cfg).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      leaf = name.split(".")[-1]
      if leaf in ("A_log", "D", "dt_bias") or "norm" in name:
        p.add_(torch.randn_like(p) * 0.5)
    for layer in model.model.layers:
      if hasattr(layer.mixer, "gate"):
        layer.mixer.gate.e_score_correction_bias.normal_(0.0, 0.2)
  model.save_pretrained(path)
  return model


@pytest.fixture(scope="module", params=list(CASES))
def reference(request, tmp_path_factory):
  path = str(tmp_path_factory.mktemp(request.param))
  model = build_reference(request.param, path)
  tokens = np.random.default_rng(0).integers(0, 96, (3, 21))  # 21 is not a multiple of 8
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.numpy()
  return request.param, path, tokens, logits


def test_logits_match_transformers(reference):
  _, path, tokens, expected = reference
  config, variables = hf.load_checkpoint(path)
  assert config.model.mamba.dt_limit[0] == config.model.mamba.dt_min  # transformers' clamp
  logits = jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32))
  assert np.abs(expected).max() > 1.0  # logits large enough for the comparison to mean something
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_saved_checkpoint_loads_in_transformers(reference, tmp_path):
  case, path, tokens, expected = reference
  config, variables = hf.load_checkpoint(path)
  out = str(tmp_path / "export")
  hf.save_checkpoint(config, variables, out, max_shard_bytes=40_000 if case == "moe" else None)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (case == "moe")
  model = transformers.NemotronHForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
  _, again = hf.load_checkpoint(out)
  jax.tree.map(np.testing.assert_array_equal, again, variables)


def test_hybrid_override_pattern_and_legacy_names(tmp_path):
  path = str(tmp_path / "legacy")
  build_reference("dense", path)
  with open(os.path.join(path, "config.json")) as f:
    cfg = json.load(f)
  del cfg["layers_block_type"]
  cfg["hybrid_override_pattern"] = CASES["dense"]["pattern"]
  cfg["mamba_n_groups"] = cfg.pop("n_groups")
  cfg["mamba_d_conv"] = cfg.pop("conv_kernel")
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)
  config, _ = hf.load_checkpoint(path)
  assert config.model.pattern == "M-M*-M"
  assert config.model.mamba.n_groups == 4 and config.model.mamba.conv_kernel == 4


def test_bfloat16_checkpoint(tmp_path):
  src = str(tmp_path / "f32")
  build_reference("dense", src)
  config, variables = hf.load_checkpoint(src)
  out = str(tmp_path / "bf16")
  hf.save_checkpoint(config, variables, out, dtype="bfloat16")
  header = hf.read_safetensors(os.path.join(out, "model.safetensors"))
  assert str(header["backbone.embeddings.weight"].dtype) == "bfloat16"
  _, low = hf.load_checkpoint(out)
  rounded = jax.tree.map(lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float32),
                         variables)
  jax.tree.map(np.testing.assert_array_equal, low, rounded)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
  src = str(tmp_path / "good")
  build_reference("moe", src)
  tensors = dict(hf.read_safetensors(os.path.join(src, "model.safetensors")))
  del tensors["backbone.layers.1.mixer.experts.3.up_proj.weight"]
  tensors["backbone.layers.9.mixer.extra.weight"] = np.zeros((2,), np.float32)
  tensors["backbone.layers.0.mixer.A_log"] = np.zeros((5,), np.float32)
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  shutil.copy(os.path.join(src, "config.json"), bad)
  hf.write_safetensors(os.path.join(bad, "model.safetensors"), tensors)
  with pytest.raises(hf.CheckpointError) as err:
    hf.load_checkpoint(bad)
  message = str(err.value)
  assert "missing (1): backbone.layers.1.mixer.experts.3.up_proj.weight" in message
  assert "unexpected (1): backbone.layers.9.mixer.extra.weight" in message
  assert "backbone.layers.0.mixer.A_log: file (5,), expected (4,)" in message
  with pytest.raises(hf.CheckpointError, match="no config.json"):
    hf.load_checkpoint(str(tmp_path))


def test_unexportable_settings_are_refused():
  from conftest import tiny_config
  c = tiny_config("M*", {"attention.pos_emb": "rope"})
  with pytest.raises(hf.CheckpointError, match="pos_emb"):
    hf.config_to_hf(c)
