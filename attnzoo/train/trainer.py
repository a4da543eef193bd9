"""The train loop: one jitted, donated train step; periodic evaluation; early stop; orbax
checkpoints; resuming from the last complete checkpoint of a workdir.

The batch at step s is a function of (seed, s) and the step is deterministic, so a run killed
at any point and restarted finishes with the same parameters and the same logged losses.
"""
from __future__ import annotations

import json
import math
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from attnzoo.config import ConfigError
from attnzoo.models import DecoderLM
from attnzoo.tasks.mqar import MQAR, Segment
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.logging import MetricsLogger
from attnzoo.train.optim import make_optimizer


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss is not finite)."""


def compute_dtype(name: str):
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  if name not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"train.compute_dtype must be auto, float32, bfloat16 or float16; "
                      f"got {name!r}")
  return jnp.dtype(name)


def build_task(config):
  if config.task != "mqar":
    raise ConfigError(f"unknown task {config.task!r}; known: mqar")
  d = config.data
  segments = lambda specs: [Segment(*map(int, s)) for s in specs]
  return MQAR(vocab_size=d.vocab_size, train_segments=segments(d.train_segments),
              test_segments=segments(d.test_segments), seed=config.seed,
              power_a=d.power_a, random_non_queries=d.random_non_queries)


def build_model(config) -> DecoderLM:
  m = config.model
  mixers = tuple(n.strip() for n in m.mixer.split("+"))
  kwargs = m.mixer_kwargs.to_dict() if hasattr(m.mixer_kwargs, "to_dict") else dict(m.mixer_kwargs)
  return DecoderLM(vocab_size=config.data.vocab_size, d_model=m.d_model,
                   num_layers=m.num_layers, mixers=mixers, mixer_kwargs=kwargs,
                   state_mixer=m.state_mixer, mlp_ratio=m.mlp_ratio, norm=m.norm,
                   position_embedding=m.position_embedding, max_positions=m.max_positions,
                   dtype=compute_dtype(config.train.compute_dtype))


def query_loss(logits, targets):
  """Mean cross-entropy over the query positions and per-example accuracy."""
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  per_example_accuracy = (jnp.argmax(logits, -1) == targets).mean(-1)
  return loss, per_example_accuracy


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _prepare_workdir(workdir, config) -> pathlib.Path:
  workdir = pathlib.Path(workdir)
  try:
    workdir.mkdir(parents=True, exist_ok=True)
    probe = workdir / ".write_test"
    probe.write_text("")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"cannot write to workdir {str(workdir)!r}: {e.strerror}") from None
  saved = workdir / "config.json"
  text = config.to_json(indent=2, sort_keys=True)
  if saved.exists() and json.loads(saved.read_text()) != json.loads(text):
    raise ConfigError(f"workdir {str(workdir)!r} holds a run with a different config; "
                      f"use a new workdir (or the same config to resume)")
  saved.write_text(text)
  return workdir


class Experiment:
  """Task, model, optimiser and the jitted steps for one config."""

  def __init__(self, config):
    self.config = config
    self.task = build_task(config)
    self.model = build_model(config)
    self.num_steps = config.train.num_steps
    self.optimizer = make_optimizer(config.train, self.num_steps)
    devices = np.array(jax.devices())
    self.mesh = Mesh(devices, ("data",))
    for segment in self.task.train_segments:
      if segment.batch_size % devices.size:
        raise ConfigError(f"batch_size {segment.batch_size} of segment {segment.name} is not "
                          f"divisible by the {devices.size} devices")
    replicated = NamedSharding(self.mesh, P())
    data = NamedSharding(self.mesh, P("data"))
    self.train_step = jax.jit(self._train_step, in_shardings=(replicated, data),
                              out_shardings=(replicated, replicated), donate_argnums=0)
    self.eval_step = jax.jit(self._eval_step)

  def init_state(self):
    batch = self.task.train_batch(0)
    params = jax.jit(self.model.init)(jax.random.key(self.config.seed),
                                      jnp.asarray(batch["inputs"][:1]))["params"]
    return {"step": jnp.zeros((), jnp.int32), "params": params,
            "opt_state": self.optimizer.init(params)}

  def _loss(self, params, batch):
    logits = self.model.apply({"params": params}, batch["inputs"],
                              logits_at=batch["target_positions"])
    return query_loss(logits, batch["targets"])

  def _train_step(self, state, batch):
    (loss, accuracy), grads = jax.value_and_grad(self._loss, has_aux=True)(state["params"], batch)
    updates, opt_state = self.optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"train/loss": loss, "train/accuracy": accuracy.mean(),
               "train/grad_norm": optax.tree.norm(grads)}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def _eval_step(self, params, batch):
    loss, accuracy = self._loss(params, batch)
    return loss, accuracy

  def evaluate(self, params) -> dict:
    """eval/accuracy (mean over all test examples), per segment, and eval/loss."""
    out, all_accuracies, losses = {}, [], []
    for name, batches in self.task.test_batches().items():
      accuracies = []
      for batch in batches:
        loss, accuracy = self.eval_step(params, batch)
        accuracies.append(np.asarray(accuracy))
        losses.append(float(loss) * len(batch["inputs"]))
      accuracies = np.concatenate(accuracies)
      out[f"eval/accuracy/{name}"] = float(accuracies.mean())
      all_accuracies.append(accuracies)
    all_accuracies = np.concatenate(all_accuracies)
    out["eval/accuracy"] = float(all_accuracies.mean())
    out["eval/loss"] = float(sum(losses) / all_accuracies.size)
    return out


def train(config: ml_collections.ConfigDict, workdir, *, quiet: bool = False) -> dict:
  """Trains (or resumes) the run in workdir; returns the summary also saved as summary.json."""
  workdir = _prepare_workdir(workdir, config)
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    return json.loads(summary_path.read_text())
  tc = config.train
  if tc.checkpoint_every % tc.log_every:
    raise ConfigError("train.checkpoint_every must be a multiple of train.log_every")
  exp = Experiment(config)
  state = exp.init_state()
  checkpoints = Checkpoints(workdir / "checkpoints", tc.max_checkpoints)
  if checkpoints.latest_step() is not None:
    state = checkpoints.restore(state)
  start = int(state["step"])
  logger = MetricsLogger(workdir, exp.num_steps, start, quiet)
  started = time.time()
  window, window_tokens, window_start = [], 0, time.time()
  status, eval_metrics = "completed", {}

  def flush(step):
    nonlocal window, window_tokens, window_start
    if not window:
      return
    values = jax.device_get(window)
    mean = {k: float(np.mean([v[k] for v in values])) for k in values[0]}
    if not all(math.isfinite(v) for v in mean.values()):
      last = checkpoints.latest_step()
      raise TrainingError(f"training loss is not finite (NaN/inf) between steps "
                          f"{step - len(window) + 1} and {step}; the last good checkpoint "
                          f"(step {last}) is kept in {workdir / 'checkpoints'}")
    mean["throughput/tokens_per_s"] = window_tokens / max(time.time() - window_start, 1e-9)
    logger.write(step, mean)
    window, window_tokens, window_start = [], 0, time.time()

  try:
    for step in range(start, exp.num_steps):
      batch = exp.task.train_batch(step)
      state, metrics = exp.train_step(state, batch)
      window.append(metrics)
      window_tokens += batch["inputs"].size
      done = step + 1
      logger.advance(1)
      if done % tc.log_every == 0:
        flush(done)
      stop = False
      if done % tc.eval_every == 0 or done == exp.num_steps:
        flush(done)
        eval_metrics = exp.evaluate(state["params"])
        logger.write(done, eval_metrics)
        stop = eval_metrics["eval/accuracy"] >= tc.early_stop_accuracy
      if done % tc.checkpoint_every == 0 or done == exp.num_steps or stop:
        flush(done)
        checkpoints.save(done, state)
      if stop:
        status = "early_stopped"
        break
  finally:
    checkpoints.close()
    logger.close()
  if not eval_metrics:
    eval_metrics = exp.evaluate(state["params"])
  summary = {"status": status, "step": int(state["step"]),
             "params": count_params(state["params"]),
             "state_size": exp.model.state_size(max(s.seq_len for s in exp.task.test_segments)),
             "wall_time_s": time.time() - started, **eval_metrics}
  summary_path.write_text(json.dumps(summary, indent=2))
  return summary


def load_run(workdir):
  """(config, Experiment, params) of the latest checkpoint in workdir."""
  workdir = pathlib.Path(workdir)
  if not (workdir / "config.json").exists():
    raise ConfigError(f"{str(workdir)!r} holds no run (no config.json)")
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  exp = Experiment(config)
  checkpoints = Checkpoints(workdir / "checkpoints", config.train.max_checkpoints)
  if checkpoints.latest_step() is None:
    raise ConfigError(f"{str(workdir)!r} holds no complete checkpoint")
  state = checkpoints.restore(exp.init_state())
  checkpoints.close()
  return config, exp, state


def evaluate(workdir) -> dict:
  _, exp, state = load_run(workdir)
  return {"step": int(state["step"]), **exp.evaluate(state["params"])}
