"""Every invalid config value names its field, the value, and what is valid."""

import pytest

from nemotron_jax import ConfigError, build_model, load_config
from nemotron_jax import config as config_lib
from conftest import tiny_config

CASES = [
    ("pattern", "M*X-", "model.pattern", "unknown layer character"),
    ("pattern", "", "model.pattern", "non-empty"),
    ("d_model", 0, "model.d_model", "positive integer"),
    ("compute_dtype", "fp8", "model.compute_dtype", "float32"),
    ("attention.num_kv_heads", 3, "model.attention.num_kv_heads", "divisible"),
    ("attention.pos_emb", "alibi", "model.attention.pos_emb", "rope"),
    ("attention.sliding_window", -1, "model.attention.sliding_window", "window"),
    ("mamba.n_groups", 3, "model.mamba.n_groups", "divisible"),
    ("mamba.dt_min", 0.5, "model.mamba.dt_min", "dt_max"),
    ("mamba.dt_limit", (0.1, 0.01), "model.mamba.dt_limit", "low <= high"),
    ("mamba.A_init_range", (0.0, 16.0), "model.mamba.A_init_range", "> 0"),
    ("mamba.ssd_impl", "cuda", "model.mamba.ssd_impl", "pallas"),
    ("mamba.chunk_size", 0, "model.mamba.chunk_size", "positive integer"),
    ("mamba.kernel.block_p", 24, "model.mamba.kernel.block_p", "power of two >= 16"),
    ("mamba.kernel.block_t_bwd", 8, "model.mamba.kernel.block_t_bwd", "power of two >= 16"),
    ("mamba.kernel.num_warps", 3, "model.mamba.kernel.num_warps", "1, 2, 4, 8"),
    ("mamba.kernel.num_stages", 0, "model.mamba.kernel.num_stages", "positive integer"),
    ("mamba.kernel.precision", "fp16", "model.mamba.kernel.precision", "tf32"),
    ("mamba.kernel.interpret", None, "model.mamba.kernel.interpret", "True or False"),
    ("moe.top_k", 9, "model.moe.top_k", "num_experts"),
    ("moe.n_group", 3, "model.moe.n_group", "divisible"),
    ("moe.topk_group", 3, "model.moe.topk_group", "n_group"),
    ("moe.latent_size", -4, "model.moe.latent_size", "positive integer"),
    ("moe.impl", "loop", "model.moe.impl", "ragged"),
    ("moe.routed_scaling", 0.0, "model.moe.routed_scaling", "positive"),
    ("mlp.d_ff", 0, "model.mlp.d_ff", "positive integer"),
]


@pytest.mark.parametrize("key,value,field,hint", CASES, ids=[c[0] for c in CASES])
def test_invalid_field_is_named(key, value, field, hint):
  overrides = {"moe.n_group": 2} if key == "moe.topk_group" else {}
  c = tiny_config("M*-E", {**overrides, key: value})
  with pytest.raises(ConfigError) as err:
    build_model(c)
  message = str(err.value)
  assert f"'{field}'" in message and repr(value) in message and hint in message, message


def test_group_limited_top_k_must_fit_kept_groups():
  c = tiny_config("E", {"moe.n_group": 4, "moe.topk_group": 1, "moe.top_k": 3})
  with pytest.raises(ConfigError, match="'model.moe.top_k'.*topk_group"):
    build_model(c)


def test_unused_sections_are_not_checked():
  # A pure-attention pattern ignores Mamba settings, so they cannot make it invalid.
  build_model(tiny_config("*-", {"mamba.n_groups": 3}))


def test_default_config_and_presets_are_valid(tmp_path):
  config_lib.validate(config_lib.default_config())
  with pytest.raises(ConfigError, match="does not exist"):
    load_config(str(tmp_path / "missing.py"))
  preset = tmp_path / "broken.py"
  preset.write_text("def nothing():\n  pass\n")
  with pytest.raises(ConfigError, match="get_config"):
    load_config(str(preset))


def test_init_section_is_validated(tmp_path):
  c = config_lib.default_config()
  assert c.init.hf_checkpoint is None and c.init.dt_limit == "checkpoint"
  c.init.hf_checkpoint = str(tmp_path)
  with pytest.raises(ConfigError, match="'init.hf_checkpoint' .* Hugging Face checkpoint folder"):
    config_lib.validate(c)
  c.init.hf_checkpoint = None
  c.init.dt_limit = "nvidia"
  with pytest.raises(ConfigError, match="'init.dt_limit' = 'nvidia'.*transformers"):
    config_lib.validate(c)
