"""Decoding benchmark: our jitted cached generation against transformers, latency against
context, and the MTP acceptance length of a briefly trained tiny model.

Part 1 builds a tiny hybrid NemotronHForCausalLM (Mamba, attention, MLP, MoE),
saves it with save_pretrained, loads the same weights with hf.load_checkpoint
and times greedy decoding of both on CPU: transformers' generate() with its
cache against our jitted loop, leaving the prefill out of both: ours times
its decoding loop, transformers' is generate(1 + N) - generate(1).
Part 2 times decode latency per token against context length for an
all-Mamba, a hybrid and an all-attention model: Mamba's state does not grow,
attention reads a cache that does.
Part 3 trains the tiny preset with a 2-depth MTP head (train_loop.run on the
stdlib corpus; reused if --mtp-workdir already holds a checkpoint) and
reports the acceptance length of MTP speculative decoding per draft length,
checking the tokens equal greedy decoding.

Usage: python benchmarks/bench_decode.py [--new-tokens 128] [--mtp-steps 300] [--skip-train]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from nemotron_jax import build_model, hf, hostmem, init_variables  # noqa: E402
from nemotron_jax.config import default_config  # noqa: E402
from nemotron_jax.generate import generate  # noqa: E402

HF_TINY = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
               head_dim=16, intermediate_size=128, mamba_num_heads=4, mamba_head_dim=16,
               ssm_state_size=16, n_groups=2, chunk_size=16, n_routed_experts=8,
               num_experts_per_tok=2, moe_intermediate_size=32,
               moe_shared_expert_intermediate_size=64)
HF_PATTERN = "M*-EM*-EM"
HF_TYPES = {"M": "mamba", "*": "attention", "-": "mlp", "E": "moe"}


def best_of(fn, repeats: int) -> float:
  """Least wall time of fn() over `repeats` runs, after one run to compile and warm up."""
  fn()
  best = math.inf
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def our_decode_seconds(run, repeats: int) -> float:
  """Least decoding-loop time (prefill excluded) of our generate over `repeats` runs."""
  run()
  return min(run().decode_seconds for _ in range(repeats))


def versus_transformers(args) -> None:
  import torch
  import transformers
  torch.manual_seed(0)
  # One thread is torch's fastest setting for a model this small; more threads spin against
  # each other (and against other jobs) on a small machine.
  torch.set_num_threads(1)
  cfg = transformers.NemotronHConfig(layers_block_type=[HF_TYPES[c] for c in HF_PATTERN],
                                     initializer_range=0.1, **HF_TINY)
  reference = transformers.NemotronHForCausalLM(cfg).eval()
  # No EOS, so both run the full length; the mask below keeps token 0 from counting as padding.
  reference.generation_config.eos_token_id = None
  prompt = np.random.default_rng(0).integers(0, 256, (1, args.prompt_len))
  with tempfile.TemporaryDirectory() as path:
    reference.save_pretrained(path)
    # transformers' dt clamp, so the greedy tokens are comparable.
    config, variables = hf.load_checkpoint(path, dt_limit="transformers")
  model = build_model(config)

  def theirs(new):
    tokens = torch.as_tensor(prompt)
    with torch.no_grad():
      return reference.generate(tokens, attention_mask=torch.ones_like(tokens), max_new_tokens=new,
                                do_sample=False, use_cache=True).numpy()

  def ours(new):
    return generate(model, variables, prompt, new, pad_to=1)

  n = args.new_tokens
  hf_tokens = theirs(n + 1)[0, args.prompt_len:]
  our_tokens = np.asarray(ours(n + 1).tokens[0])
  same = int(np.argmax(hf_tokens != our_tokens)) if (hf_tokens != our_tokens).any() else n + 1
  # transformers: generate(1 + n) minus generate(1) leaves out its prefill.
  hf_s = best_of(lambda: theirs(n + 1), args.repeats) - best_of(lambda: theirs(1), args.repeats)
  our_s = our_decode_seconds(lambda: ours(n + 1), args.repeats)
  print(f"\n[1] greedy decode, pattern {HF_PATTERN}, d_model {HF_TINY['hidden_size']}, "
        f"prompt {args.prompt_len}, {n} new tokens, batch 1, CPU")
  print(f"  transformers generate(): {n / hf_s:9.1f} tokens/s ({1e3 * hf_s / n:.2f} ms/token)")
  print(f"  nemotron_jax generate(): {n / our_s:9.1f} tokens/s ({1e3 * our_s / n:.3f} ms/token)")
  print(f"  speedup {hf_s / our_s:.1f}x; greedy tokens agree on the first {same} of {n + 1}")


def latency_vs_context(args) -> None:
  print(f"\n[2] decode latency per token (ms) against context, batch 1, "
        f"{args.latency_tokens} tokens")
  contexts = [int(c) for c in args.contexts.split(",")]
  print(f"  {'pattern':>10} " + " ".join(f"{c:>8}" for c in contexts))
  for pattern in ("MMMM", "M*M*", "****"):
    c = default_config()
    m = c.model
    m.pattern, m.d_model, m.vocab_size = pattern, 64, 256
    m.mamba.num_heads, m.mamba.head_dim, m.mamba.d_state, m.mamba.n_groups = 4, 16, 16, 2
    m.attention.num_heads, m.attention.num_kv_heads, m.attention.head_dim = 4, 2, 16
    model = build_model(c)
    variables = init_variables(model, jax.random.PRNGKey(0))
    row = []
    for context in contexts:
      prompt = np.random.default_rng(0).integers(0, 256, (1, context))
      run = lambda: generate(model, variables, prompt, args.latency_tokens + 1, pad_to=1)
      row.append(1e3 * our_decode_seconds(run, args.repeats) / args.latency_tokens)
    print(f"  {pattern:>10} " + " ".join(f"{t:>8.3f}" for t in row))


def mtp_acceptance(args) -> None:
  sys.path.insert(0, ROOT)
  import eval as eval_cli
  from nemotron_jax import config as config_lib
  from nemotron_jax import data as data_lib
  from nemotron_jax import train_loop
  from nemotron_jax.checkpoint import Checkpointer
  workdir = args.mtp_workdir
  if Checkpointer(workdir, keep=1, async_save=False).latest_step() is None:
    if args.skip_train:
      sys.exit(f"--skip-train: {workdir} holds no checkpoint")
    config = config_lib.load_config(os.path.join(ROOT, "configs", "tiny.py"))
    config.model.mtp.num_depths = 2
    config.data.seq_len = 128
    config.train.steps = args.mtp_steps
    config.train.sample_tokens = 0
    config.checkpoint.every = 0
    train_loop.run(config, workdir)
  config, model, _, state = eval_cli.load(workdir)
  variables = eval_cli.variables_of(state)
  batch = next(data_lib.make_iterator(config, split="heldout", global_batch_size=8))
  prompts = [row[:64] for row in batch["inputs"]]
  plain = generate(model, variables, prompts, args.new_tokens)
  print(f"\n[3] MTP speculative decoding, tiny preset ({config.model.pattern}) + MTP "
        f"{config.model.mtp.pattern} x{config.model.mtp.num_depths} shared, trained "
        f"{config.train.steps} steps; 8 held-out prompts of 64 bytes, {args.new_tokens} new tokens")
  for draft in (1, 2, 3):
    spec = generate(model, variables, prompts, args.new_tokens, speculative=True,
                    draft_length=draft)
    assert spec.to_lists() == plain.to_lists(), "speculative decoding changed the greedy tokens"
    print(f"  draft {draft}: acceptance length {spec.acceptance_length:.2f} tokens per main "
          f"forward, {spec.forward_passes} vs {plain.forward_passes} forwards, tokens identical")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--new-tokens", type=int, default=128)
  parser.add_argument("--prompt-len", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--contexts", default="256,1024,4096,16384")
  parser.add_argument("--latency-tokens", type=int, default=64)
  parser.add_argument("--mtp-workdir", default=os.path.join(tempfile.gettempdir(), "bench_mtp"))
  parser.add_argument("--mtp-steps", type=int, default=300)
  parser.add_argument("--skip-train", action="store_true", help="only reuse --mtp-workdir")
  parser.add_argument("--parts", default="1,2,3", help="which parts to run")
  args = parser.parse_args()
  parts = set(args.parts.split(","))
  if "1" in parts:
    versus_transformers(args)
  if "2" in parts:
    latency_vs_context(args)
  if "3" in parts:
    mtp_acceptance(args)


if __name__ == "__main__":
  hostmem.reexec_with_huge_pages()  # malloc on huge pages: see nemotron_jax/hostmem.py
  main()
