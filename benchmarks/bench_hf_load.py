"""Host memory of a sharded hub-checkpoint load: peak RSS against the arrays and files.

  python benchmarks/bench_hf_load.py [--dir=/tmp/hf_bench] [--baseline=OLD_HF_MODULE.py]

Writes a ~0.5 GB bfloat16 checkpoint with transformers' save_pretrained (random
weights, once per --dir), then in a fresh process with 8 simulated CPU devices
loads it with `hf.load_checkpoint(path, mesh=fsdp 8)` and reports the peak
resident-set increase (VmHWM, reset just before the load) against the loaded
arrays' bytes (every device's shards) and the safetensors files' size, which
lie in the page cache once read and count as resident. It then checks that
every matrix of 1M entries or more is split across the devices and that the
values equal an unsharded load. --baseline names another hf.py to measure the
same way without a mesh (for a before/after comparison).
"""

import argparse
import glob
import json
import os
import subprocess
import sys

HIDDEN = dict(vocab_size=32768, hidden_size=1024, num_attention_heads=8, num_key_value_heads=2,
              head_dim=128, intermediate_size=4096, mamba_num_heads=32, mamba_head_dim=64,
              ssm_state_size=64, n_groups=8, chunk_size=64, n_routed_experts=32,
              num_experts_per_tok=4, moe_intermediate_size=512,
              moe_shared_expert_intermediate_size=1024)
PATTERN = "MEM*EME-ME"
TYPES = {"M": "linear_attention", "*": "full_attention", "-": "mlp", "E": "moe"}


def write_checkpoint(path: str) -> None:
  import torch
  import transformers
  cfg = transformers.NemotronHConfig(layers_block_type=[TYPES[c] for c in PATTERN], **HIDDEN)
  torch.manual_seed(0)
  model = transformers.NemotronHForCausalLM(cfg).to(torch.bfloat16)
  model.save_pretrained(path)


def _status(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) * 1024
  raise KeyError(field)


def measure(path: str, baseline: str | None) -> dict:
  """Runs in the child process: one load, its peak RSS increase and the checks."""
  import importlib.util
  import jax
  import numpy as np
  from nemotron_jax import hf, sharding
  if baseline:
    spec = importlib.util.spec_from_file_location("hf_baseline", baseline)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
  config = hf.read_config(path)
  config.mesh.data, config.mesh.fsdp = 1, 8
  mesh = sharding.make_mesh(config.mesh)
  hf.variable_shardings(config, mesh)  # trace the model once, outside the measurement
  jax.numpy.zeros(1).block_until_ready()
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
  before = _status("VmRSS")
  if baseline:
    _, variables = loader.load_checkpoint(path)
  else:
    _, variables = hf.load_checkpoint(path, mesh=mesh)
  jax.block_until_ready(variables)
  peak = _status("VmHWM")
  leaves = jax.tree.leaves(variables)
  arrays = sum(s.data.nbytes for a in leaves for s in a.addressable_shards)
  files = sum(os.path.getsize(f) for f in glob.glob(os.path.join(path, "*.safetensors")))
  out = {"peak_increase": peak - before, "arrays_bytes": arrays, "files_bytes": files,
         "ratio": (peak - before) / (arrays + files),
         "devices_holding_data": len({s.device for a in leaves for s in a.addressable_shards})}
  if not baseline:
    unsplit = [jax.tree_util.keystr(p) for p, a in jax.tree_util.tree_leaves_with_path(variables)
               if a.size >= 2 ** 20 and a.addressable_shards[0].data.size == a.size]
    _, plain = hf.load_checkpoint(path)
    equal = all(np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(leaves, jax.tree.leaves(plain)))
    out.update(large_matrices_not_split=unsplit, equals_unsharded_load=equal)
  return out


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--dir", default="/tmp/hf_bench")
  parser.add_argument("--baseline", default=None)
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(measure(args.dir, args.baseline)))
    return
  if not os.path.isfile(os.path.join(args.dir, "config.json")):
    write_checkpoint(args.dir)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
  for baseline in ([None, args.baseline] if args.baseline else [None]):
    cmd = [sys.executable, os.path.abspath(__file__), "--child", f"--dir={args.dir}"]
    if baseline:
      cmd.append(f"--baseline={baseline}")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
      sys.exit(proc.stderr[-3000:])
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    mb = lambda b: f"{b / 2 ** 20:.0f} MB"
    print(f"{'baseline ' + baseline if baseline else 'sharded load, fsdp=8'}: peak RSS increase "
          f"{mb(r['peak_increase'])}, arrays {mb(r['arrays_bytes'])} on "
          f"{r['devices_holding_data']} devices, files {mb(r['files_bytes'])}: "
          f"{r['ratio']:.2f}x (arrays + files)")
    if not baseline:
      print(f"  large matrices not split: {r['large_matrices_not_split'] or 'none'}; "
            f"equal to an unsharded load: {r['equals_unsharded_load']}")


if __name__ == "__main__":
  main()
