"""The training loop behind train.py: data, steps, logging, checkpoints, final report."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from nemotron_jax import data as data_lib
from nemotron_jax import hf, sharding
from nemotron_jax.checkpoint import Checkpointer
from nemotron_jax.generate import generate
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer, TrainState


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss or gradient."""


class _IteratorSnapshot:
  """A data-iterator state frozen at save time, so an asynchronous save cannot see later batches."""

  def __init__(self, iterator):
    self._state = json.dumps(iterator.get_state()).encode()

  def get_state(self) -> bytes:
    return self._state


class MetricsLog:
  """metrics.jsonl (one JSON object per logged step) and TensorBoard events, on process 0."""

  def __init__(self, workdir: str, resume_step: int):
    self.active = jax.process_index() == 0
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.writer = None
    if not self.active:
      return
    if os.path.exists(self.path):
      # Steps past the restored checkpoint are replayed, so their old lines go.
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
      with open(self.path, "w") as f:
        f.writelines(kept)
    from tensorboardX import SummaryWriter
    self.writer = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.active:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self.writer.add_scalar(key, value, record["step"])

  def close(self) -> None:
    if self.writer is not None:
      self.writer.close()


def _finite(metrics: dict) -> bool:
  """Loss, gradient norm and every updated parameter are finite."""
  return (all(math.isfinite(float(metrics[k])) for k in ("loss", "grad_norm"))
          and metrics["params_finite"] == 1.0)


def evaluate(trainer: Trainer, state, config, tokenizer, *, max_batches: int) -> dict:
  """Mean loss, perplexity and bits per byte on the held-out split."""
  it = data_lib.make_iterator(config, split="heldout", global_batch_size=config.train.batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count())
  nll, tokens, nbytes = 0.0, 0.0, 0
  for i, batch in enumerate(it):
    if i >= max_batches:
      break
    out = jax.device_get(trainer.eval_step(state, trainer.shard_batch(batch)))
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
    nbytes += data_lib.count_bytes(tokenizer, batch)
  # Byte counts are per process; the losses are already global.
  nbytes = int(np.sum(jax.experimental.multihost_utils.process_allgather(np.array(nbytes))))
  if not tokens:
    return {}
  loss = nll / tokens
  return {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0)),
          "eval_bpb": nll / math.log(2) / max(nbytes, 1)}


def state_from_hub(trainer: Trainer, config) -> TrainState:
  """Step 0 with a fresh optimiser around the weights of `config.init.hf_checkpoint`, loaded
  sharded on the trainer's mesh."""
  _, variables = hf.load_checkpoint(config.init.hf_checkpoint, mesh=trainer.mesh,
                                    config=config.copy_and_resolve_references())
  shardings = trainer.state_shardings
  params = variables["params"]
  with jax.set_mesh(trainer.mesh):
    opt_state = jax.jit(trainer.tx.init, out_shardings=shardings.opt_state)(params)
    step, rng = jax.jit(lambda: (jnp.zeros((), jnp.int32),
                                 jax.random.split(jax.random.PRNGKey(config.seed))[1]),
                        out_shardings=(shardings.step, shardings.rng))()
  return TrainState(step=step, params=params, opt_state=opt_state,
                    moe_state=variables.get("moe_state", {}), rng=rng)


def run(config, workdir: str, overrides: dict | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir, else starting from
  `config.init.hf_checkpoint` or a random init); returns a summary dict. `overrides` are the
  command line's config fields, checked against the hub checkpoint (`hf.init_config`)."""
  import jax.experimental.multihost_utils  # noqa: F401  (used by evaluate)
  from_hub = "init" in config and config.init.hf_checkpoint
  if from_hub:
    config = hf.init_config(config, overrides)
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  model = build_model(config)
  trainer = Trainer(config, model, mesh)
  if t.batch_size % math.prod(mesh.shape[a] for a in sharding.BATCH_AXES):
    raise ValueError(f"train.batch_size = {t.batch_size} must be divisible by the batch axes "
                     f"data x fsdp x expert = {[mesh.shape[a] for a in sharding.BATCH_AXES]}")
  tokenizer = data_lib.make_tokenizer(config.data) if config.data.source in ("stdlib", "text") else None
  train_iter = data_lib.make_iterator(config, split="train", global_batch_size=t.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  if ckpt.latest_step() is not None:
    state = ckpt.restore(trainer.abstract_state(), train_iter)
    print(f"resumed from step {int(state.step)} in {ckpt.directory}")
  elif from_hub:
    state = state_from_hub(trainer, config)
    print(f"started from the weights of {config.init.hf_checkpoint}")
  else:
    state = trainer.init_state(config.seed)
  start = int(state.step)
  log = MetricsLog(workdir, start)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))

  history, interrupted = [], False
  last_time, last_step = time.time(), start
  bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=jax.process_index() != 0,
             desc="train")
  try:
    for step in bar:
      batch = trainer.shard_batch(next(train_iter))
      state, metrics = trainer.train_step(state, batch, step)
      done = step + 1
      save_now = done == t.steps or (config.checkpoint.every and done % config.checkpoint.every == 0)
      if done % t.log_every == 0 or save_now or done == start + 1:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not _finite(values):
          raise NonFiniteLossError(
              f"step {done}: loss = {values['loss']}, grad_norm = {values['grad_norm']}, "
              f"parameters finite = {bool(values['params_finite'])}; "
              f"stopping without saving this state (the last checkpoint, if any, is intact). "
              f"Try a lower train.lr (now {t.lr}) or train.grad_clip.")
        now = time.time()
        values["tokens_per_s"] = (done - last_step) * t.batch_size * config.data.seq_len / max(
            now - last_time, 1e-9)
        last_time, last_step = now, done
        if trainer.quantized:
          values.update({k: float(v) for k, v in jax.device_get(
              trainer.quant_stats(state, batch)).items()})
        record = {"step": done, **values}
        history.append(record)
        log.write(record)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
      if save_now:
        ckpt.save(done, state, _IteratorSnapshot(train_iter))
  except NonFiniteLossError as err:
    print(f"error: {err}")
    interrupted = True
  finally:
    ckpt.wait()
    log.close()

  summary = {"steps": int(state.step), "interrupted": interrupted}
  if history:
    summary["first_loss"], summary["last_loss"] = history[0]["loss"], history[-1]["loss"]
  if not interrupted:
    summary.update(evaluate(trainer, state, config, tokenizer, max_batches=t.eval_batches)
                   if tokenizer is not None else {})
    if tokenizer is not None and t.sample_tokens and jax.process_index() == 0:
      variables = jax.device_get({"params": state.params, "moe_state": state.moe_state})
      prompt = tokenizer.encode("def ")
      out = generate(model, variables, [prompt], t.sample_tokens, greedy=False, temperature=0.8,
                     top_k=40, rng=jax.random.PRNGKey(0))
      summary["sample"] = tokenizer.decode(np.concatenate([prompt, out.to_lists()[0]]))
  ckpt.close()
  if jax.process_index() == 0:
    report = {k: v for k, v in summary.items() if k != "sample"}
    print(json.dumps(report))
    if "first_loss" in summary:
      print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} "
            f"over steps {start + 1}..{summary['steps']}")
    if "sample" in summary:
      print("sample:\n" + summary["sample"])
  return summary
