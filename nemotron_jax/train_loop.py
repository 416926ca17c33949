"""The training loop behind train.py: data, steps, logging, checkpoints, final report."""

from __future__ import annotations

import json
import math
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from nemotron_jax import data as data_lib
from nemotron_jax import hf, sharding
from nemotron_jax.checkpoint import Checkpointer
from nemotron_jax.generate import generate
from nemotron_jax.model import build_model
from nemotron_jax.train_lib import Trainer, TrainState, lr_schedule

# The train fields that decide the learning rate at each step.
SCHEDULE_FIELDS = ("steps", "schedule", "lr", "warmup_steps", "decay_fraction", "decay_shape",
                   "min_lr_ratio")


class NonFiniteLossError(RuntimeError):
  """Training produced a NaN or infinite loss or gradient."""


class StopRequest:
  """SIGTERM / SIGINT become a request to stop after the current step, save and exit.

  One process: both signals set a flag read after every step. Several
  processes must stop at the same step to save together: SIGTERM is left to
  JAX's preemption notifier, whose sync point orbax's `reached_preemption`
  reports after every step, and SIGINT sets a flag the processes agree on at
  the next host sync.
  """

  def __init__(self, manager):
    self.manager = manager
    self.signal_name = None
    self.multi = jax.process_count() > 1
    signals = (signal.SIGINT,) if self.multi else (signal.SIGTERM, signal.SIGINT)
    # Python takes signal handlers only in the main thread; elsewhere signals act as before.
    if threading.current_thread() is not threading.main_thread():
      signals = ()
    self._previous = {sig: signal.signal(sig, self._handle) for sig in signals}

  def _handle(self, signum, frame):
    del frame
    self.signal_name = signal.Signals(signum).name

  def __call__(self, step: int, sync: bool) -> bool:
    """Whether every process stops after `step`; `sync` marks steps where processes meet anyway."""
    if not self.multi:
      return self.signal_name is not None
    if self.manager.reached_preemption(step):
      self.signal_name = self.signal_name or "SIGTERM"
      return True
    if sync:
      flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
      if np.any(flags):
        self.signal_name = self.signal_name or "SIGINT"
        return True
    return False

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


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


def evaluate(trainer: Trainer, state, config, tokenizer, *, max_batches: int) -> dict:
  """Mean loss, perplexity and (with a tokenizer) bits per byte on the held-out split.

  Stops after `max_batches`, at the end of the split, or at the first batch with no target
  in any process (how packed text on several processes ends: every process sees the same
  global count, so all stop together).
  """
  it = data_lib.make_iterator(config, split="heldout", global_batch_size=config.train.batch_size,
                              process_index=jax.process_index(), process_count=jax.process_count())
  nll, tokens, nbytes = 0.0, 0.0, 0
  for i, batch in enumerate(it):
    if i >= max_batches:
      break
    out = jax.device_get(trainer.eval_step(state, trainer.shard_batch(batch)))
    if not float(out["tokens"]):
      break
    nll += float(out["nll_sum"])
    tokens += float(out["tokens"])
    if tokenizer is not None:
      nbytes += data_lib.count_bytes(tokenizer, batch)
  if not tokens:
    return {}
  loss = nll / tokens
  result = {"eval_loss": loss, "eval_ppl": math.exp(min(loss, 50.0))}
  if tokenizer is not None:
    # Byte counts are per process; the losses are already global.
    nbytes = int(np.sum(multihost_utils.process_allgather(np.array(nbytes))))
    result["eval_bpb"] = nll / math.log(2) / max(nbytes, 1)
  return result


def _schedule_changes(previous: dict, t) -> list[str]:
  """'train.X a -> b' for each schedule field the previous start's config set differently."""
  old = previous.get("train", {})
  return [f"train.{k} {old[k]!r} -> {t[k]!r}" for k in SCHEDULE_FIELDS if k in old and old[k] != t[k]]


def record_config(config, workdir: str, start: int) -> None:
  """Writes config.json (the latest start's, which eval.py reads) and config.from_step_N.json
  beside those of earlier starts; warns when a resume changes the learning-rate schedule."""
  if jax.process_index() != 0:
    return
  text = config.to_json_best_effort(indent=2)
  latest = os.path.join(workdir, "config.json")
  if start and os.path.isfile(latest):
    try:
      with open(latest) as f:
        previous = json.load(f)
    except (OSError, json.JSONDecodeError):
      previous = {}
    changes = _schedule_changes(previous, config.train)
    if changes:
      old = type(config.train)(config.train.to_dict())
      for k in SCHEDULE_FIELDS:
        if k in previous["train"]:
          old[k] = type(config.train[k])(previous["train"][k])
      lr_old, lr_new = (float(lr_schedule(x)(start)) for x in (old, config.train))
      print(f"warning: resuming at step {start} with a changed learning-rate schedule: "
            f"{'; '.join(changes)} (lr at step {start}: {lr_old:.4g} -> {lr_new:.4g})", flush=True)
  name = os.path.join(workdir, f"config.from_step_{start}.json")
  n = 1
  while os.path.exists(name):
    with open(name) as f:
      if f.read() == text:
        break
    n += 1
    name = os.path.join(workdir, f"config.from_step_{start}.{n}.json")
  for path in (name, latest):
    with open(path, "w") as f:
      f.write(text)


def gather_variables(state) -> dict:
  """Params and MoE state as host arrays on every process, even when they span processes
  (every process must call this)."""
  return multihost_utils.process_allgather({"params": state.params, "moe_state": state.moe_state},
                                           tiled=True)


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


def global_data_state(iterator) -> dict:
  """The training iterator's state of the whole stream, to checkpoint. Packed text holds only
  this process's slots, so the processes' states are gathered and merged: a collective, which
  every process calls at the same step (each save)."""
  state = iterator.get_state()
  if jax.process_count() == 1 or "slots" not in state:
    return state
  # int32 on the wire (JAX without x64): document counts per slot and offsets fit it.
  slots = np.asarray(state["slots"], np.int64)
  if slots.max() >= 2 ** 31:
    raise OverflowError(f"a packed-text slot position {slots.max()} does not fit int32")
  gathered = multihost_utils.process_allgather(slots.astype(np.int32))
  return data_lib.merge_states([{"slots": s.tolist()} for s in np.asarray(gathered)])


def run(config, workdir: str, overrides: dict | None = None) -> dict:
  """Trains (resuming from the latest checkpoint in workdir, else starting from
  `config.init.hf_checkpoint` or a random init); returns a summary dict. `overrides` are the
  command line's config fields, checked against the hub checkpoint (`hf.init_config`).

  Stops early, saving first, on SIGTERM / SIGINT (summary["preempted"]); stops
  without saving at the first host sync after a non-finite step
  (summary["interrupted"]); such a step never changed the state.
  """
  from_hub = "init" in config and config.init.hf_checkpoint
  if from_hub:
    config = hf.init_config(config, overrides)
  t = config.train
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(t.batch_size, mesh, t.grad_accum_steps)
  sharding.process_rows(mesh, t.batch_size)
  model = build_model(config)
  trainer = Trainer(config, model, mesh)
  tokenizer = data_lib.make_tokenizer(config.data) if config.data.source in ("stdlib", "text") else None
  train_iter = data_lib.make_iterator(config, split="train", global_batch_size=t.batch_size,
                                      process_index=jax.process_index(),
                                      process_count=jax.process_count())
  ckpt = Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
  if ckpt.latest_step() is not None:
    state, data_state = ckpt.restore(trainer.abstract_state())
    train_iter.set_state(data_state)
    if jax.process_index() == 0:
      print(f"resumed from step {int(state.step)} in {ckpt.directory}", flush=True)
  elif from_hub:
    state = state_from_hub(trainer, config)
    print(f"started from the weights of {config.init.hf_checkpoint}")
  else:
    state = trainer.init_state(config.seed)
  start = int(state.step)
  record_config(config, workdir, start)
  log = MetricsLog(workdir, start)

  history, interrupted, saved = [], False, start
  last_eval = None
  nonfinite = None  # device-side count of skipped steps since the last host sync
  last_time, last_step = time.time(), start
  bar = tqdm(range(start, t.steps), initial=start, total=t.steps, disable=jax.process_index() != 0,
             desc="train")
  stop = StopRequest(ckpt.manager)
  try:
    for step in bar:
      batch = trainer.shard_batch(next(train_iter))
      state, metrics = trainer.train_step(state, batch, step)
      nonfinite = metrics["nonfinite"] if nonfinite is None else nonfinite + metrics["nonfinite"]
      done = step + 1
      save_now = done == t.steps or (config.checkpoint.every and done % config.checkpoint.every == 0)
      eval_now = bool(t.eval_every) and done % t.eval_every == 0
      sync = done % t.log_every == 0 or save_now or eval_now or done == start + 1
      if sync:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        skipped = int(jax.device_get(nonfinite))
        nonfinite = None
        if skipped:
          raise NonFiniteLossError(
              f"{skipped} step(s) up to step {done} had a non-finite loss, gradient or update "
              f"and were skipped, so the state is that of step {int(state.step)}; at step {done} "
              f"loss = {values['loss']}, grad_norm = {values['grad_norm']}, parameters finite = "
              f"{bool(values['params_finite'])}; stopping without saving this state (the last "
              f"checkpoint, if any, is intact). Try a lower train.lr (now {t.lr}) or "
              "train.grad_clip.")
        del values["nonfinite"]
        now = time.time()
        values["tokens_per_s"] = (done - last_step) * t.batch_size * config.data.seq_len / max(
            now - last_time, 1e-9)
        last_time, last_step = now, done
        if trainer.quantized:
          values.update({k: float(v) for k, v in jax.device_get(
              trainer.quant_stats(state, batch)).items()})
        if eval_now:
          last_eval = (done, evaluate(trainer, state, config, tokenizer, max_batches=t.eval_batches))
          values.update(last_eval[1])
        record = {"step": done, **values}
        history.append(record)
        log.write(record)
        bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{values['lr']:.2e}")
      if save_now:
        ckpt.save(done, state, global_data_state(train_iter))
        saved = done
      if done < t.steps and stop(done, sync):
        if saved != done:
          ckpt.save(done, state, global_data_state(train_iter))
        ckpt.wait()
        if jax.process_index() == 0:
          print(f"stopped by {stop.signal_name} after step {done}; saved checkpoint {done} in "
                f"{ckpt.directory}; rerun the same command to resume", flush=True)
        break
  except NonFiniteLossError as err:
    print(f"error: {err}")
    interrupted = True
  finally:
    stop.restore()
    ckpt.wait()
    log.close()

  preempted = stop.signal_name is not None and int(state.step) < t.steps and not interrupted
  summary = {"steps": int(state.step), "interrupted": interrupted, "preempted": preempted}
  if history:
    summary["first_loss"], summary["last_loss"] = history[0]["loss"], history[-1]["loss"]
  if not interrupted and not preempted and (tokenizer is not None or t.eval_every):
    if last_eval is not None and last_eval[0] == int(state.step):
      summary.update(last_eval[1])
    else:
      summary.update(evaluate(trainer, state, config, tokenizer, max_batches=t.eval_batches))
    if tokenizer is not None and t.sample_tokens:
      variables = gather_variables(state)
      if jax.process_index() == 0:
        prompt = tokenizer.encode("def ")
        out = generate(model, variables, [prompt], t.sample_tokens, greedy=False,
                       temperature=0.8, top_k=40, rng=jax.random.PRNGKey(0))
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
