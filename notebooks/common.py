"""Helpers the ablation notebooks share: the quick/full switch, CPU-sized presets, short runs.

NEMOTRON_QUICK=1 (the default, and what tests/test_notebooks.py sets) is a smoke
test of 30-70 s of CPU time per notebook: widths shrunk 4x, one layer of each
kind, short sequences, a few steps. NEMOTRON_QUICK=0 trains the presets as
written, at batch 8 for 200-300 steps: from half a minute to about half an
hour per notebook on 2 CPU cores (the README lists each).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

QUICK = os.environ.get("NEMOTRON_QUICK", "1") != "0"
# Quick runs are dominated by compiling small programs, which LLVM's level 0
# makes about three times faster; notebooks that time code set
# NEMOTRON_FAST_COMPILE=0 before importing this module. Must precede jax's first use.
FAST_COMPILE = QUICK and os.environ.get("NEMOTRON_FAST_COMPILE", "1") != "0"
if FAST_COMPILE and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

os.environ.setdefault("TQDM_MININTERVAL", "10")  # train_loop's progress bar: a few lines, not one per step

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from nemotron_jax import config as config_lib
from nemotron_jax import data as data_lib
from nemotron_jax import sharding, summary, train_loop
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)  # `kernels/` is a top-level folder of the repository, not installed
# Full-mode figures are committed; quick mode's smoke-test figures go to an ignored subfolder
# so that running the tests never overwrites them.
FIGURES = os.path.join(ROOT, "notebooks", "figures", *(["quick"] if QUICK else []))


STARTED = time.time()


def finished() -> str:
  """The line each notebook ends with: its mode and wall-clock time since this module loaded."""
  return (f"{'quick' if QUICK else 'full'} mode: {(time.time() - STARTED) / 60:.1f} min on "
          f"{os.cpu_count()} CPU cores")


def quick_pattern(pattern: str) -> str:
  """One layer of each kind the pattern uses, in order of first appearance: "MEM*EM-" -> "ME*-"."""
  return "".join(dict.fromkeys(pattern))


def load(preset: str, *, steps: int, seq_len: int, batch_size: int = 8):
  """configs/<preset>.py for a short run; quick mode shrinks it to compile in seconds.

  Quick mode divides every width by 4 and keeps one layer of each kind
  (`quick_pattern`): compiling, not running, dominates a few steps on CPU, and
  compile time grows with the number of layers. Its comparisons are smoke tests.
  """
  c = config_lib.load_config(os.path.join(ROOT, "configs", preset + ".py"))
  if QUICK:
    m = c.model
    m.pattern = quick_pattern(m.pattern)
    m.d_model //= 4
    m.mamba.head_dim //= 4
    m.mamba.d_state //= 2
    m.mamba.chunk_size = 16
    m.attention.head_dim //= 4
    m.mlp.d_ff //= 4
    m.moe.d_ff //= 4
    m.moe.shared_d_ff //= 4
    if m.moe.latent_size:
      m.moe.latent_size //= 4
  c.data.seq_len = seq_len
  t = c.train
  t.steps, t.batch_size = steps, batch_size
  t.warmup_steps = max(1, steps // 10)
  t.log_every = 1
  t.eval_batches = 2 if QUICK else 8
  t.sample_tokens = 0
  c.checkpoint.every, c.checkpoint.async_save = 0, False
  return c


def params(config) -> dict:
  """Total and active parameter counts (summary.count_params)."""
  counts = summary.count_params(config)
  return {"total": counts["total"], "active": counts["active"]}


def run_train_loop(config) -> tuple[dict, list[int], list[float]]:
  """train_loop.run in a fresh temporary workdir: (summary, logged steps, their losses)."""
  with tempfile.TemporaryDirectory() as workdir:
    result = train_loop.run(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f if line.strip()]
  return result, [r["step"] for r in records], [r["loss"] for r in records]


class Experiment:
  """One model (its Trainer, initial state and held-out metric) trained on several datasets.

  The model, the optimiser and the step count decide the compiled programs, so
  runs that differ only in `data` reuse them. Shorter sequences than the
  config's data.seq_len are padded to it at the end (loss_mask 0, segment 0):
  the models are causal, so the padding changes nothing before it, and one
  compile serves every length.
  """

  def __init__(self, config, init_state=None):
    self.config = config
    self.mesh = sharding.make_mesh(config.mesh)
    self.model = build_model(config)
    self.trainer = Trainer(config, self.model, self.mesh)
    self.state0 = self.trainer.init_state(config.seed) if init_state is None else init_state
    self.state = None  # the last trained state, for `evaluate` and `train(resume=True)`
    self._heldout = jax.jit(self._heldout_sums, static_argnums=0)

  def _heldout_sums(self, late, params, moe_state, batch):
    # After precision.bf16_from_step the run trains, so is evaluated, with plain GEMMs.
    model = self.trainer.late_model if late else self.model
    with nn.logical_axis_rules(self.trainer.rules):
      logits, _ = model.apply({"params": params, "moe_state": moe_state}, batch["inputs"],
                                   batch["segment_ids"], mutable=["moe_stats"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    hit = (jnp.argmax(logits, -1) == batch["targets"]).astype(jnp.float32)
    mask = batch["loss_mask"]
    return jnp.sum(nll * mask), jnp.sum(hit * mask), jnp.sum(mask)

  def _with_data(self, data: dict | None):
    """The config with `data` overrides, and the function padding its batches to the compiled
    length."""
    config = self.config.copy_and_resolve_references()
    for key, value in (data or {}).items():
      node = config.data
      *path, leaf = key.split(".")
      for name in path:
        node = node[name]
      node[leaf] = value
    width = self.config.data.seq_len
    if config.data.seq_len > width:
      raise ValueError(f"data.seq_len = {config.data.seq_len} is invalid: expected at most the "
                       f"compiled length {width}")
    pad = lambda batch: self.trainer.shard_batch(
        {k: np.pad(v, ((0, 0), (0, width - v.shape[1]))) for k, v in batch.items()})
    return config, pad

  def train(self, data: dict | None = None, *, heldout: bool = True, resume: bool = False,
            steps: int | None = None) -> dict:
    """Trains from the initial state with `data` overrides such as {"mqar.num_kv_pairs": 4}.

    Returns {"steps", "loss", "seconds"} and with `heldout` (one more compile)
    "eval_loss" and "accuracy": the argmax accuracy at the loss_mask positions
    of held-out batches, which for MQAR are the query positions. The trained
    state stays in `self.state` for `evaluate`. `steps` (default
    config.train.steps) is how many steps this call trains. With `resume`,
    training goes on from `self.state` (a curriculum), with the optimiser state
    and the step count, so the learning-rate schedule, where the last run left them.
    """
    config, pad = self._with_data(data)
    trainer, start = self.trainer, time.time()
    if resume and self.state is None:
      raise ValueError("Experiment.train(resume=True) needs a state trained by train(); expected "
                       "a first call without resume")
    # The step donates its input state.
    state = jax.tree.map(jnp.copy, self.state if resume else self.state0)
    first = int(jax.device_get(state.step))
    it = data_lib.make_iterator(config, split="train", global_batch_size=config.train.batch_size)
    losses = []
    for step in range(first, first + (config.train.steps if steps is None else steps)):
      state, metrics = trainer.train_step(state, pad(next(it)), step)
      losses.append(metrics["loss"])
    losses = [float(x) for x in jax.device_get(losses)]
    self.state = state
    out = {"steps": list(range(first + 1, first + len(losses) + 1)), "loss": losses}
    if heldout:
      out.update(self.evaluate(data))
    out["seconds"] = time.time() - start
    return out

  def evaluate(self, data: dict | None = None) -> dict:
    """{"eval_loss", "accuracy"} of the last trained state on held-out batches of `data`
    (overrides as in `train`), e.g. MQAR with another number of pairs."""
    config, pad = self._with_data(data)
    state = self.state
    nll = hits = count = 0.0
    late = self.trainer.in_late_phase(state)
    eval_it = data_lib.make_iterator(config, split="heldout",
                                     global_batch_size=config.train.batch_size)
    with jax.set_mesh(self.mesh):
      for i, batch in enumerate(eval_it):
        if i >= config.train.eval_batches:
          break
        sums = self._heldout(late, state.params, state.moe_state, pad(batch))
        n, h, c = (float(v) for v in sums)
        nll, hits, count = nll + n, hits + h, count + c
    return {"eval_loss": nll / max(count, 1.0), "accuracy": hits / max(count, 1.0)}


def save(fig, name: str) -> str:
  """Writes the figure to notebooks/figures/<name>.png (quick mode: figures/quick/) and returns
  the path."""
  os.makedirs(FIGURES, exist_ok=True)
  path = os.path.join(FIGURES, name + ".png")
  fig.savefig(path, dpi=100, bbox_inches="tight")
  return os.path.relpath(path, ROOT)


def timed(fn, *args, repeats: int = 3) -> float:
  """Best wall-clock seconds of `fn(*args)` after one compiling call."""
  jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def mean_last(values, n: int = 3) -> float:
  return float(np.mean(values[-n:]))


def smooth(values, window: int = 20) -> list[float]:
  """Trailing moving average (shorter at the start): per-batch losses on the corpus are noisy."""
  values = np.asarray(values, np.float64)
  sums = np.cumsum(np.concatenate([[0.0], values]))
  idx = np.arange(1, len(values) + 1)
  lo = np.maximum(idx - window, 0)
  return list((sums[idx] - sums[lo]) / (idx - lo))
