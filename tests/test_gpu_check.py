"""benchmarks/gpu_check.py, the prepared CUDA device check, runs end to end in its dry-run form."""

import importlib.util
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_check():
  spec = importlib.util.spec_from_file_location("gpu_check", os.path.join(ROOT, "benchmarks", "gpu_check.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_dry_run_passes(capsys):
  gpu_check = load_gpu_check()
  assert gpu_check.main(["--dry-run"]) == 0
  out = capsys.readouterr().out
  # Both dot precisions were checked against the XLA path and timed (bf16 inputs in the dry run).
  checks = re.findall(r"pallas/(\w+)\s.*max rel err \S+ \(\w+\)\s+ok", out)
  assert checks == ["float32", "bf16"], out
  for impl in ("xla", "pallas"):
    assert re.search(rf"ssd_impl={impl}\s+step\s+[\d.]+ ms", out), out
  assert "0 SSD value check(s) failed; pytest passed" in out


def test_test_selection_and_peaks():
  gpu_check = load_gpu_check()
  files = [os.path.basename(f) for f in gpu_check.torch_free_tests()]
  assert "test_hf.py" not in files and "test_ssd_pallas.py" in files and "test_gpu_check.py" in files
  assert gpu_check.bf16_peak("NVIDIA H200") == 989e12
  assert gpu_check.bf16_peak("NVIDIA H100 PCIe") == 756e12
  assert gpu_check.bf16_peak("cpu") is None
