"""Logit parity with transformers' NemotronHForCausalLM (torch, CPU, float32) and checkpoint I/O."""

import glob
import json
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from safetensors.numpy import load_file, save_file  # noqa: E402

from nemotron_jax import build_model, hf, sharding, summary  # noqa: E402

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


def build_reference(case: str, path: str, dt_shift: float = 0.0, **overrides):
  """A random transformers model whose every parameter matters, saved with save_pretrained.

  `dt_shift` is added to every dt_bias, to push dt below time_step_min.
  """
  kw = {**BASE, **CASES[case], **overrides}
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
      if hasattr(layer.mixer, "dt_bias"):
        layer.mixer.dt_bias.add_(dt_shift)
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
  config, variables = hf.load_checkpoint(path, dt_limit="transformers")
  assert config.model.mamba.dt_limit[0] == config.model.mamba.dt_min  # transformers' clamp
  logits = jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32))
  assert np.abs(expected).max() > 1.0  # logits large enough for the comparison to mean something
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_saved_checkpoint_loads_in_transformers(reference, tmp_path):
  case, path, tokens, expected = reference
  config, variables = hf.load_checkpoint(path, dt_limit="transformers")
  out = str(tmp_path / "export")
  hf.save_checkpoint(config, variables, out, **({"max_shard_bytes": 40_000} if case == "moe" else {}))
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == (case == "moe")
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  assert written["hybrid_override_pattern"] == config.model.pattern
  assert written["time_step_limit"] == [config.model.mamba.dt_min, math.inf]
  model = transformers.NemotronHForCausalLM.from_pretrained(out).eval()
  with torch.no_grad():
    logits = model(torch.as_tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=0)
  _, again = hf.load_checkpoint(out, dt_limit="transformers")
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
  header = load_file(os.path.join(out, "model.safetensors"))
  assert str(header["backbone.embeddings.weight"].dtype) == "bfloat16"
  _, low = hf.load_checkpoint(out)
  rounded = jax.tree.map(lambda a: np.asarray(jnp.asarray(a).astype(jnp.bfloat16), np.float32),
                         variables)
  jax.tree.map(np.testing.assert_array_equal, low, rounded)


def test_mismatched_checkpoint_lists_every_problem(tmp_path):
  src = str(tmp_path / "good")
  build_reference("moe", src)
  tensors = load_file(os.path.join(src, "model.safetensors"))
  del tensors["backbone.layers.1.mixer.experts.3.up_proj.weight"]
  tensors["backbone.layers.9.mixer.extra.weight"] = np.zeros((2,), np.float32)
  tensors["backbone.layers.0.mixer.A_log"] = np.zeros((5,), np.float32)
  bad = str(tmp_path / "bad")
  os.makedirs(bad)
  shutil.copy(os.path.join(src, "config.json"), bad)
  save_file(tensors, os.path.join(bad, "model.safetensors"), metadata={"format": "pt"})
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


def test_dt_limit_checkpoint_is_nvidia_semantics_and_transformers_is_the_clamp(tmp_path):
  # time_step_min 0.05 and dt_bias shifted down: most dt values fall below the clamp.
  path = str(tmp_path / "dt")
  model = build_reference("dense", path, dt_shift=-4.0, time_step_min=0.05, time_step_max=0.1)
  tokens = np.random.default_rng(1).integers(0, 96, (2, 19))
  with torch.no_grad():
    clamped = model(torch.as_tensor(tokens)).logits.numpy()
    for layer in model.model.layers:
      if hasattr(layer.mixer, "time_step_limit"):
        layer.mixer.time_step_limit = (0.0, float("inf"))
    unclamped = model(torch.as_tensor(tokens)).logits.numpy()
  assert np.abs(clamped - unclamped).max() > 1e-2  # the two semantics differ measurably

  config, variables = hf.load_checkpoint(path)
  assert tuple(config.model.mamba.dt_limit) == (0.0, math.inf)
  ours = np.asarray(jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32)))
  assert np.abs(ours - unclamped).max() <= 1e-4
  config, variables = hf.load_checkpoint(path, dt_limit="transformers")
  assert tuple(config.model.mamba.dt_limit) == (0.05, math.inf)
  ours = np.asarray(jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32)))
  assert np.abs(ours - clamped).max() <= 1e-4
  with pytest.raises(hf.CheckpointError, match="dt_limit = 'nvidia' is invalid"):
    hf.load_checkpoint(path, dt_limit="nvidia")


REAL_HUB = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..",
                        "shared", "real_hub")
# Published (total, active, active without the input embedding) in billions, None where not
# published, with the rounding of the published figure (NEMOTRON.md section 3,
# ../shared/real_hub/README.md), and the dt limit each file declares (absent: (0, inf)).
NANO = ((31.6, None, 3.2), 0.1)
PUBLISHED = {
    "nemotron-3-nano-30b-a3b-bf16.config.json": NANO,
    "nemotron-3-nano-30b-a3b-bf16.config.aiconfigurator.json": NANO,
    "nemotron-3-nano-30b-a3b-nvfp4.config.json": NANO,
    "nemotron-3.5-lightning-30b-a3b-nvfp4.config.json": NANO,
    "nemotron-h-56b-base-8k.config.json": ((56, None, None), 1.0),
    "nemotron-3-super-120b-a12b-fp8.config.aiconfigurator.json": ((120.6, 12.7, None), 0.1),
    "nemotron-3-super-120b-a12b-nvfp4.config.minus-quantization_config.txt": (
        (120.6, 12.7, None), 0.1),
    "nemotron-3-ultra-550b-a55b-bf16.config.json": ((550, 55, None), 0.03),  # "about": 3%
}
LIMITS = {"nemotron-h-56b-base-8k.config.json": [0.0, math.inf],  # a bare JSON Infinity
          "nemotron-3-super-120b-a12b-fp8.config.aiconfigurator.json": [0.0, math.inf],
          "nemotron-3-ultra-550b-a55b-bf16.config.json": [0.0, 1e308]}


@pytest.mark.skipif(not os.path.isdir(REAL_HUB), reason="../shared/real_hub is not present")
def test_real_hub_configs_load_with_published_counts_and_their_dt_limit():
  found = sorted(os.path.basename(f) for f in glob.glob(os.path.join(REAL_HUB, "*config*"))
                 if "quant_config" not in f)
  assert found == sorted(PUBLISHED)
  counted = {}  # several files describe the same model: trace each model once
  for name, (counts, tol) in PUBLISHED.items():
    with open(os.path.join(REAL_HUB, name)) as f:
      text = f.read()
    # The Super transcription has its quantization_config replaced by a bare QUANT.
    hub = json.loads(text.replace(": QUANT", ": null"))
    assert hub.get("time_step_limit") == LIMITS.get(name), name
    config = hf.config_from_hf(hub)
    # Every file declares (0, inf) or nothing; Ultra's 1e308 is inf in the float32 clamp.
    assert tuple(config.model.mamba.dt_limit) == (0.0, math.inf), name
    clamp = hf.config_from_hf(hub, dt_limit="transformers").model.mamba.dt_limit
    assert tuple(clamp) == (hub["time_step_min"], math.inf)
    key = config.model.to_json()
    n = counted[key] = counted.get(key) or summary.count_params(config)
    for published, ours in zip(counts, (n["total"], n["active"], n["active_no_embedding"])):
      if published is not None:
        bound = tol * published if tol < 0.05 else tol
        assert abs(ours / 1e9 - published) <= bound, (name, ours, published)


def test_param_dtype_is_separate_from_compute_dtype(tmp_path):
  path = str(tmp_path / "m")
  build_reference("moe", path)
  config, variables = hf.load_checkpoint(path)
  assert config.model.param_dtype == "float32" and config.model.compute_dtype == "float32"
  assert {a.dtype for a in jax.tree.leaves(variables["params"])} == {np.dtype(np.float32)}
  config, low = hf.load_checkpoint(path, param_dtype="bfloat16")
  assert config.model.param_dtype == "bfloat16" and config.model.compute_dtype == "float32"
  # Matrices in bfloat16; the SSM vectors, the router and its bias stay float32 by design.
  jax.tree.map(lambda a, s: a.dtype == s.dtype or pytest.fail(str(a.dtype)), low,
               hf.variable_shapes(config))
  assert low["params"]["layers_1"]["mixer"]["experts_up"].dtype == jnp.bfloat16
  assert low["params"]["lm_head"]["kernel"].dtype == jnp.bfloat16
  with pytest.raises(hf.CheckpointError, match="param_dtype = 'fp8' is invalid"):
    hf.load_checkpoint(path, param_dtype="fp8")


def test_sharded_load_splits_matrices_and_equals_unsharded(tmp_path):
  path = str(tmp_path / "m")
  build_reference("latent", path)
  _, plain = hf.load_checkpoint(path)
  config = hf.read_config(path)
  config.mesh.data, config.mesh.fsdp = 1, 8
  mesh = sharding.make_mesh(config.mesh)
  _, sharded = hf.load_checkpoint(path, mesh=mesh)
  expected = hf.variable_shardings(config, mesh)
  for (path_, a), b, s in zip(jax.tree_util.tree_leaves_with_path(sharded),
                              jax.tree.leaves(plain), jax.tree.leaves(expected)):
    assert a.sharding == s, path_
    assert {sh.data.shape for sh in a.addressable_shards} == {s.shard_shape(a.shape)}, path_
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Matrices with a dimension along `embed` are split 8 ways.
  for leaf in (sharded["params"]["embedding"], sharded["params"]["layers_0"]["mixer"]["in_proj_x"]["kernel"]):
    assert leaf.addressable_shards[0].data.size == leaf.size // 8


def test_export_time_is_linear_in_the_expert_count(tmp_path):
  # bfloat16 parameters written as float32: a save that converted the whole stacked expert
  # tensor once per expert took 4.1x as long with 128 narrow experts as with 16 wide ones.
  from conftest import tiny_config
  times = {}
  for experts, width in ((128, 64), (16, 512)):
    c = tiny_config("E", {"d_model": 512, "moe.num_experts": experts, "moe.d_ff": width,
                          "moe.shared_d_ff": 64, "param_dtype": "bfloat16"})
    variables = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), hf.variable_shapes(c))
    out = str(tmp_path / str(experts))
    hf.save_checkpoint(c, variables, out, dtype="float32")
    runs = []
    for _ in range(3):
      start = time.perf_counter()
      hf.save_checkpoint(c, variables, out, dtype="float32")
      runs.append(time.perf_counter() - start)
    times[experts] = min(runs)
  assert times[128] <= 2.5 * times[16], times


def test_two_processes_read_only_their_slices_and_export_together(tmp_path):
  import socket
  import subprocess
  import sys
  from conftest import TEST_XLA_FLAGS
  path = str(tmp_path / "m")
  build_reference("moe", path)
  config, variables = hf.load_checkpoint(path)
  tokens = np.random.default_rng(0).integers(0, config.model.vocab_size, (3, 21))
  expected = np.asarray(jax.jit(build_model(config).apply)(variables, jnp.asarray(tokens, jnp.int32)))
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = dict(os.environ, XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count=2")
  worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf_load_worker.py")
  procs = [subprocess.Popen([sys.executable, worker, path, str(tmp_path), address, "2", str(i)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  reads = []
  for i in range(2):
    with open(tmp_path / f"process_{i}.json") as f:
      reads.append(json.load(f)["bytes_read"])
  total = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
  # Matrices are split over the 4 devices, so each process reads about half of the file;
  # only the small replicated vectors are read by both.
  for n in reads:
    assert 0.4 * total < n < 0.6 * total, (reads, total)
  np.testing.assert_allclose(np.load(tmp_path / "logits.npy"), expected, atol=1e-5, rtol=0)
  # The export of variables that span both processes holds the original tensors.
  exported = {}
  for f in glob.glob(str(tmp_path / "export" / "*.safetensors")):
    exported.update(load_file(f))
  assert len(glob.glob(str(tmp_path / "export" / "*.safetensors"))) > 1
  original = load_file(os.path.join(path, "model.safetensors"))
  assert exported.keys() == original.keys()
  for name, value in original.items():
    np.testing.assert_array_equal(exported[name], value, err_msg=name)


def test_float8_tensors_load_cast_once(tmp_path):
  # The safetensors library cannot hand float8 to numpy; those tensors are read via the header.
  from safetensors.torch import load_file as load_torch, save_file as save_torch
  path = str(tmp_path / "m")
  build_reference("dense", path)
  tensors = load_torch(os.path.join(path, "model.safetensors"))
  name = "backbone.layers.1.mixer.up_proj.weight"
  tensors[name] = tensors[name].to(torch.float8_e4m3fn)
  save_torch(tensors, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
  _, variables = hf.load_checkpoint(path)
  expected = tensors[name].to(torch.float32).numpy().T
  np.testing.assert_array_equal(np.asarray(variables["params"]["layers_1"]["mixer"]["up_proj"]["kernel"]),
                                expected)
