"""Evaluate a train.py workdir or a Hugging Face checkpoint folder.

  python eval.py --checkpoint=runs/tiny                       # held-out bpb/ppl + a sample
  python eval.py --checkpoint=runs/tiny --speculative --throughput --output=eval.json
  python eval.py --checkpoint=runs/mqar --mqar                # MQAR recall accuracy
  python eval.py --cache_report                               # Nano / Super cache sizes

--checkpoint is a train.py workdir (config.json and the latest orbax
checkpoint under checkpoints/) or a folder with config.json and safetensors
in the Hugging Face layout. --config.mesh.* lays the parameters out over the
devices by the rules table (default: every device on `data`, replicated). Sections: held-out bits per byte and perplexity
(--eval), a generated sample (--prompt, --max_new_tokens; --think_budget),
MQAR accuracy (--mqar), throughput (--throughput: prefill and decode tokens/s,
decode latency per token against context), speculative decoding with the MTP
head (--speculative) and the inference cache per sequence (--cache_report).
Results are printed and, with --output, written as JSON.
"""

import json
import os
import types

import jax
import numpy as np
import ml_collections
from absl import flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from nemotron_jax import config as config_lib
from nemotron_jax import data as data_lib
from nemotron_jax import cli, export, hf, sharding, train_loop
from nemotron_jax.generate import cache_bytes, cache_dtypes, generate
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer

flags.DEFINE_string("checkpoint", None, "A train.py workdir or a Hugging Face checkpoint folder.")
flags.DEFINE_bool("eval", True, "Bits per byte and perplexity on the held-out split.")
flags.DEFINE_integer("eval_batches", None, "Held-out batches (default: train.eval_batches).")
flags.DEFINE_string("data_source", None, "Override data.source for --eval (stdlib, text, tokens).")
flags.DEFINE_string("data_path", None, "Override data.path for --eval.")
flags.DEFINE_string("prompt", "def ", "Prompt of the generated sample ('' for none).")
flags.DEFINE_integer("max_new_tokens", 100, "Length of the sample and of speculative runs.")
flags.DEFINE_float("temperature", 0.0, "0: greedy; else sampling temperature.")
flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this probability.")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("think_budget", None, "Reasoning budget of the sample, in tokens.")
flags.DEFINE_string("think_end", "</think>", "End-of-thinking marker (text).")
flags.DEFINE_list("think_end_ids", None, "End-of-thinking marker as token ids (overrides text).")
flags.DEFINE_bool("mqar", False, "Multi-query associative recall accuracy (data.source=mqar).")
flags.DEFINE_integer("mqar_batches", 8, "Held-out MQAR batches.")
flags.DEFINE_bool("throughput", False, "Prefill / decode tokens per second and decode latency.")
flags.DEFINE_list("contexts", ["256", "1024", "4096"], "Prompt lengths for --throughput.")
flags.DEFINE_integer("batch", 1, "Sequences per batch for --throughput.")
flags.DEFINE_integer("decode_tokens", 64, "Decoded tokens timed per context.")
flags.DEFINE_bool("speculative", False, "MTP speculative decoding: acceptance length, speedup.")
flags.DEFINE_integer("draft_length", None, "Drafted tokens per step (default mtp.num_depths).")
flags.DEFINE_integer("spec_prompts", 4, "Held-out prompts for --speculative.")
flags.DEFINE_bool("cache_report", False, "Cache bytes per sequence: Nano, Super, this model.")
flags.DEFINE_list("cache_contexts", ["8192", "131072", "1048576"], "Contexts of the cache report.")
flags.DEFINE_string("cache_dtype", "bfloat16", "Keys/values and conv state dtype of the report.")
flags.DEFINE_string("output", None, "Write the results here as JSON.")
config_flags.DEFINE_config_dict(
    "config", ml_collections.ConfigDict({"mesh": config_lib.mesh_config()}),
    "The device mesh, e.g. --config.mesh.data=1 --config.mesh.fsdp=8 to shard the parameters "
    "(default: replicated on every device).")
FLAGS = flags.FLAGS

ROOT = os.path.dirname(os.path.abspath(__file__))


class EvalError(ValueError):
  """A checkpoint path or option eval.py cannot use."""


# --- loading ---------------------------------------------------------------------------------


def checkpoint_kind(path: str) -> str:
  """'workdir' or 'hf'; raises EvalError naming what the folder lacks."""
  if not path or not os.path.isdir(path):
    raise EvalError(f"--checkpoint={path!r} is not a folder; expected a train.py workdir or a "
                    "Hugging Face checkpoint folder")
  cfg = os.path.join(path, "config.json")
  saved = config_lib.read_json(cfg) if os.path.isfile(cfg) else None
  if os.path.isdir(os.path.join(path, "checkpoints")) or (saved and "model" in saved):
    return "workdir"
  weights = ("model.safetensors", "model.safetensors.index.json")
  if saved and any(os.path.isfile(os.path.join(path, w)) for w in weights):
    return "hf"
  raise EvalError(f"{path!r} is neither a train.py workdir (config.json with a 'model' section and "
                  "checkpoints/) nor a Hugging Face checkpoint folder (config.json with "
                  "model.safetensors or model.safetensors.index.json)")


def load(path: str, mesh_config=None):
  """-> (config, model, trainer, state): state has params and moe_state sharded over the mesh
  of `mesh_config` (default: every device on `data`, i.e. replicated) by the rules table."""
  kind = checkpoint_kind(path)
  mesh_config = config_lib.mesh_config() if mesh_config is None else mesh_config
  config_lib.validate_mesh(mesh_config)
  mesh = sharding.make_mesh(mesh_config)
  if kind == "workdir":
    try:
      config, variables, step = export.load_workdir(path, mesh=mesh)
    except export.ExportError as err:
      raise EvalError(str(err)) from err
    print(f"loaded step {step} of {path}")
  else:
    config, variables = hf.load_checkpoint(path, mesh=mesh)
    tokenizer = os.path.join(path, "tokenizer.json")
    if os.path.isfile(tokenizer):
      config.data.tokenizer = tokenizer
  config.mesh = type(config.mesh)(mesh_config.to_dict())
  model = build_model(config)
  trainer = Trainer(config, model, mesh)
  return config, model, trainer, types.SimpleNamespace(
      params=variables["params"], moe_state=variables.get("moe_state", {}))


# --- sections --------------------------------------------------------------------------------


def variables_of(state):
  """The model's variables, left sharded where they lie."""
  return {"params": state.params, "moe_state": state.moe_state}


def shard_count(variables) -> int:
  """The most distinct shards any parameter is split into."""
  return max(len({str(s.index) for s in a.addressable_shards}) for a in jax.tree.leaves(variables))


def tokenizer_of(config):
  if config.data.source not in ("stdlib", "text"):
    return None
  tokenizer = data_lib.make_tokenizer(config.data)
  return tokenizer if tokenizer.vocab_size <= config.model.vocab_size else None


def held_out(config, trainer, state, batches: int) -> dict:
  if FLAGS.data_source:
    config.data.source = FLAGS.data_source
  if FLAGS.data_path:
    config.data.path = FLAGS.data_path
  tokenizer = tokenizer_of(config)
  if tokenizer is None:
    return {"skipped": f"data.source={config.data.source!r} has no text to count bytes of"}
  return train_loop.evaluate(trainer, state, config, tokenizer, max_batches=batches)


def sample(config, model, variables) -> dict:
  tokenizer = tokenizer_of(config)
  if tokenizer is None:
    return {"skipped": "no tokenizer for this data source"}
  prompt = tokenizer.encode(FLAGS.prompt)
  think = {}
  if FLAGS.think_budget is not None:
    marker = ([int(t) for t in FLAGS.think_end_ids] if FLAGS.think_end_ids else FLAGS.think_end)
    think = dict(think_budget=FLAGS.think_budget, think_end=marker, tokenizer=tokenizer)
  out = generate(model, variables, [prompt], FLAGS.max_new_tokens,
                 greedy=FLAGS.temperature == 0, temperature=FLAGS.temperature or 1.0,
                 top_k=FLAGS.top_k, top_p=FLAGS.top_p, rng=jax.random.PRNGKey(FLAGS.seed), **think)
  tokens = out.to_lists()[0]
  text = tokenizer.decode(np.concatenate([prompt, tokens]))
  print("sample:\n" + text)
  return {"prompt": FLAGS.prompt, "text": text, "tokens": tokens}


def mqar(config, model, variables) -> dict:
  config.data.source = "mqar"
  it = data_lib.make_iterator(config, split="heldout", global_batch_size=config.train.batch_size)
  apply = jax.jit(model.apply)
  hits = total = 0
  for i, batch in enumerate(tqdm(it, total=FLAGS.mqar_batches, desc="mqar")):
    if i >= FLAGS.mqar_batches:
      break
    logits = apply(variables, batch["inputs"], batch["segment_ids"])
    mask = batch["loss_mask"] > 0
    hits += int(np.sum((np.argmax(np.asarray(logits), -1) == batch["targets"]) & mask))
    total += int(mask.sum())
  return {"accuracy": hits / max(total, 1), "queries": total,
          "num_kv_pairs": config.data.mqar.num_kv_pairs}


def timed(fn, repeats: int = 3):
  """The Generation with the least total time over `repeats` runs, after one to compile."""
  fn()
  runs = [fn() for _ in range(repeats)]
  return min(runs, key=lambda g: g.prefill_seconds + g.decode_seconds)


def throughput(config, model, variables) -> dict:
  """Prefill and decode speed of the jitted generation at each context length."""
  rng = np.random.default_rng(0)
  rows, n = [], FLAGS.decode_tokens
  for context in tqdm([int(c) for c in FLAGS.contexts], desc="throughput"):
    prompts = rng.integers(0, config.model.vocab_size, (FLAGS.batch, context))
    # n + 1 tokens: the first comes with the prefill, then n decoding steps.
    out = timed(lambda: generate(model, variables, (prompts, np.full(FLAGS.batch, context)),
                                 n + 1, pad_to=1))
    rows.append({"context": context,
                 "prefill_tokens_per_s": FLAGS.batch * context / out.prefill_seconds,
                 "decode_tokens_per_s": FLAGS.batch * n / out.decode_seconds,
                 "decode_ms_per_token": 1e3 * out.decode_seconds / n})
  print(f"{'context':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'ms/token':>9}")
  for r in rows:
    print(f"{r['context']:>8} {r['prefill_tokens_per_s']:>14.0f} {r['decode_tokens_per_s']:>13.1f} "
          f"{r['decode_ms_per_token']:>9.3f}")
  return {"batch": FLAGS.batch, "decode_tokens": n, "rows": rows}


def speculative(config, model, variables) -> dict:
  """Greedy decoding with and without MTP drafts on held-out prompts: same tokens, fewer steps."""
  if not config.model.mtp.num_depths:
    return {"skipped": "the model has no MTP head (model.mtp.num_depths = 0)"}
  it = data_lib.make_iterator(config, split="heldout", global_batch_size=FLAGS.spec_prompts)
  batch = next(it)
  prompts = [row[:64] for row in batch["inputs"]]
  new = FLAGS.max_new_tokens
  plain = timed(lambda: generate(model, variables, prompts, new), repeats=2)
  spec = timed(lambda: generate(model, variables, prompts, new, speculative=True,
                                draft_length=FLAGS.draft_length), repeats=2)
  # Equal in float32; in lower precision the multi-token verify may round differently.
  same = spec.to_lists() == plain.to_lists()
  plain_s, spec_s = plain.decode_seconds, spec.decode_seconds
  result = {"draft_length": FLAGS.draft_length or config.model.mtp.num_depths,
            "acceptance_length": spec.acceptance_length,
            "main_forward_passes": spec.forward_passes,
            "plain_forward_passes": plain.forward_passes,
            "same_tokens_as_greedy": same, "plain_decode_seconds": plain_s,
            "speculative_decode_seconds": spec_s, "speedup": plain_s / spec_s}
  print(f"speculative: acceptance length {spec.acceptance_length:.2f} tokens per main forward "
        f"(draft {result['draft_length']}), {spec.forward_passes} vs {plain.forward_passes} "
        f"forwards, {result['speedup']:.2f}x decode speed, "
        + ("tokens identical to greedy" if same else "TOKENS DIFFER from greedy"))
  return result


def all_attention_bytes(m, context: int) -> int:
  """The cache if every sequence-mixing layer (M or *) were this model's GQA attention."""
  a = m.attention
  layers = m.pattern.count("M") + m.pattern.count("*")
  return layers * 2 * context * a.num_kv_heads * a.head_dim * np.dtype(cache_dtypes(m)[0]).itemsize


def cache_report(models: dict) -> dict:
  contexts = [int(c) for c in FLAGS.cache_contexts]
  out = {}
  gib = lambda b: b / 2 ** 30
  print(f"cache bytes per sequence (keys/values and conv state in {FLAGS.cache_dtype}, "
        "SSM state in float32); all-attention: every M or * layer as the model's GQA attention")
  print(f"{'model':>8} {'context':>9} {'attention':>11} {'mamba':>10} {'hybrid':>10} "
        f"{'all-attn':>10} {'ratio':>7}")
  for name, m in models.items():
    m = m.copy_and_resolve_references()
    m.generation.cache_dtype = FLAGS.cache_dtype
    rows = []
    for context in contexts:
      ours = cache_bytes(m, context)
      full = all_attention_bytes(m, context)
      rows.append({"context": context, **ours, "all_attention": full,
                   "ratio": full / ours["total"]})
      print(f"{name:>8} {context:>9} {gib(ours['attention']):>9.3f}Gi {gib(ours['mamba']):>8.3f}Gi "
            f"{gib(ours['total']):>8.3f}Gi {gib(full):>8.3f}Gi {full / ours['total']:>6.1f}x")
    out[name] = rows
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  results = {}
  try:
    if FLAGS.checkpoint is None and not FLAGS.cache_report:
      raise EvalError("nothing to do: pass --checkpoint=PATH (a workdir or a Hugging Face folder) "
                      "or --cache_report")
    if FLAGS.checkpoint is not None:
      config, model, trainer, state = load(FLAGS.checkpoint, FLAGS.config.mesh)
      variables = variables_of(state)
      results["checkpoint"] = os.path.abspath(FLAGS.checkpoint)
      results["parameters_sharded_over"] = shard_count(variables)
      if FLAGS.eval:
        batches = FLAGS.eval_batches or config.train.eval_batches
        results["heldout"] = held_out(config.copy_and_resolve_references(), trainer, state, batches)
        print("held-out:", json.dumps(results["heldout"]))
      if FLAGS.prompt and FLAGS.max_new_tokens:
        results["sample"] = sample(config, model, variables)
      if FLAGS.mqar:
        results["mqar"] = mqar(config.copy_and_resolve_references(), model, variables)
        print("mqar:", json.dumps(results["mqar"]))
      if FLAGS.speculative:
        results["speculative"] = speculative(config, model, variables)
      if FLAGS.throughput:
        results["throughput"] = throughput(config, model, variables)
    if FLAGS.cache_report:
      models = {name: config_lib.load_config(os.path.join(ROOT, "configs", f"{name}.py")).model
                for name in ("nano", "super")}
      if FLAGS.checkpoint is not None:
        models["this"] = config.model
      results["cache_report"] = cache_report(models)
  except (EvalError, config_lib.ConfigError, hf.CheckpointError) as err:
    cli.fail(str(err))
  if FLAGS.output:
    with open(FLAGS.output, "w") as f:
      json.dump(results, f, indent=2)
    print(f"wrote {FLAGS.output}")


if __name__ == "__main__":
  cli.run(main)
