"""The train loop: one jitted, donated train step; periodic evaluation; early stop; orbax
checkpoints; resuming from the last complete checkpoint of a workdir.

Task-agnostic: the registered task (attnzoo.tasks) gives the data, the model head, the loss and
the metrics. The mesh, the shardings of the state and the batch, and context parallelism come
from config.mesh (attnzoo.train.sharding); train.grad_accum splits each batch into
micro-batches. The batch at step s is a function of (seed, s) and the step is deterministic,
so a run killed at any point and restarted finishes with the same parameters and logged
losses.
"""

from __future__ import annotations

import json
import math
import pathlib
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from attnzoo.config import ConfigError, with_defaults
from attnzoo.models import build_model
from attnzoo.tasks import Task, build_task
from attnzoo.train import sharding
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.logging import MetricsLogger
from attnzoo.train.optim import make_optimizer


class TrainingError(RuntimeError):
  """Training cannot go on (e.g. the loss is not finite)."""


def compute_dtype(name: str):
  if name == "auto":
    return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
  if name not in ("float32", "bfloat16", "float16"):
    raise ConfigError(
      f"train.compute_dtype must be auto, float32, bfloat16 or float16; got {name!r}"
    )
  return jnp.dtype(name)


def check_train_config(tc) -> None:
  """One ConfigError naming the first impossible value of the `train` section."""

  def need(ok, key, what):
    if not ok:
      raise ConfigError(f"train.{key} must be {what}, got {tc[key]!r}")

  for key in ("num_steps", "log_every", "eval_every", "checkpoint_every", "max_checkpoints"):
    need(isinstance(tc[key], int) and tc[key] >= 1, key, "a positive integer")
  need(tc.lr > 0, "lr", "positive")
  need(tc.get("lr_step_every", 1) >= 1, "lr_step_every", ">= 1")
  need(tc.warmup_steps >= 0, "warmup_steps", ">= 0")
  need(0 <= tc.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
  need(tc.weight_decay >= 0, "weight_decay", ">= 0")
  need(0 <= tc.b1 < 1, "b1", "in [0, 1)")
  need(0 <= tc.b2 < 1, "b2", "in [0, 1)")
  need(tc.grad_clip is None or tc.grad_clip >= 0, "grad_clip", ">= 0 (0 or None: no clipping)")
  need(isinstance(tc.grad_accum, int) and tc.grad_accum >= 1, "grad_accum", "a positive integer")
  need(
    tc.checkpoint_every % tc.log_every == 0,
    "checkpoint_every",
    f"a multiple of train.log_every ({tc.log_every})",
  )


def model_for(config, task: Task):
  """The model the task's head needs, with the config's backbone options."""
  return build_model(
    task.model_kind, config.model, compute_dtype(config.train.compute_dtype), **task.model_kwargs()
  )


def count_params(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def _prepare_workdir(workdir, config) -> pathlib.Path:
  """Creates workdir and refuses one that holds a run of another config. The config itself is
  written by `train` only once the experiment is built: a config that fails leaves no
  config.json behind, so the corrected one can use the same workdir."""
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
  # the mesh may change between runs of one config (a checkpoint restores onto any mesh)
  same = lambda c: {k: v for k, v in c.items() if k != "mesh"}
  if saved.exists() and same(json.loads(saved.read_text())) != same(json.loads(text)):
    raise ConfigError(
      f"workdir {str(workdir)!r} holds a run with a different config; "
      f"use a new workdir (or the same config to resume)"
    )
  return workdir


class Experiment:
  """Task, model, optimiser and the jitted steps for one config."""

  def __init__(self, config, devices=None):
    self.config = config = with_defaults(config)
    check_train_config(config.train)
    self.task = build_task(config)
    self.model = model_for(config, self.task)
    self.num_steps = config.train.num_steps
    self.optimizer = make_optimizer(config.train, self.num_steps)
    self.mesh = sharding.make_mesh(config.mesh, devices)
    self.rules = sharding.rules(config.mesh)
    self.plan = sharding.context_plan(self.mesh, config.mesh)
    example = {k: v[:1] for k, v in self.task.train_batch(0).items()}
    self._example_inputs = self.task.model_inputs(example)
    abstract = jax.eval_shape(self._new_state, jax.random.key(0), self._example_inputs)
    self.state_shardings = sharding.state_shardings(
      abstract, self.mesh, self.rules, config.model.d_model
    )
    replicated = sharding.NamedSharding(self.mesh, sharding.P())
    # the batch arrives laid out by `shardable` (its shapes vary between tasks and segments)
    self.train_step = jax.jit(
      self._train_step,
      in_shardings=(self.state_shardings, None),
      out_shardings=(self.state_shardings, replicated),
      donate_argnums=0,
    )
    self.eval_step = jax.jit(
      self._eval_step,
      in_shardings=(self.state_shardings["params"], None),
      out_shardings=replicated,  # every host reads the metrics
    )

  def shardable(self, batch) -> dict:
    """The batch as global arrays: examples over data x fsdp (checked to split evenly),
    tokens over context."""
    sharding.check_batch(batch, self.mesh)
    return self._put(batch)

  def _put(self, batch) -> dict:
    return sharding.put_batch(batch, sharding.batch_shardings(batch, self.mesh, self.rules))

  def _new_state(self, rng, inputs):
    params = self.model.init(rng, **inputs)["params"]
    return {
      "step": jnp.zeros((), jnp.int32),
      "params": params,
      "opt_state": self.optimizer.init(params),
    }

  def init_state(self):
    """The step-0 train state, laid out by the mesh (parameters and optimizer state sharded
    by their logical axes)."""
    init = jax.jit(self._new_state, out_shardings=self.state_shardings)
    return init(jax.random.key(self.config.seed), self._example_inputs)

  def _outputs(self, params, batch, dropout_rng=None, **kwargs):
    rngs = {} if dropout_rng is None else {"dropout": dropout_rng}
    inputs = self.task.model_inputs(batch)
    return self.model.apply({"params": params}, **inputs, rngs=rngs, **kwargs)

  def _loss(self, params, batch, dropout_rng=None):
    """The task's loss plus the auxiliary losses the modules sow into "losses" (e.g. SSA's
    alignment, attnzoo.ops.ssa), logged as train/aux_loss."""
    outputs, sown = self._outputs(params, batch, dropout_rng, mutable=["losses"])
    loss, aux = self.task.loss(outputs, batch)
    extra = jax.tree.leaves(sown.get("losses", {}))
    if extra:
      aux_loss = sum(jnp.sum(x).astype(jnp.float32) for x in extra)
      loss, aux = loss + aux_loss, {**aux, "aux_loss": aux_loss}
    return loss, aux

  def _gradients(self, params, batch, dropout_rng):
    """((loss, aux), grads); with train.grad_accum = k, the mean over k equal micro-batches
    taken one after another (a lax.scan), each with its own dropout stream."""
    grad_fn = jax.value_and_grad(self._loss, has_aux=True)
    k = self.config.train.grad_accum
    if k == 1:
      return grad_fn(params, batch, dropout_rng)
    size = len(batch["inputs"])
    if size % k:
      raise ConfigError(f"a batch of {size} examples does not split into {k} micro-batches")
    micro = jax.tree.map(lambda x: x.reshape(k, size // k, *x.shape[1:]), batch)

    def one(total, inputs):
      i, mb = inputs
      out = grad_fn(params, mb, jax.random.fold_in(dropout_rng, i))
      return jax.tree.map(jnp.add, total, out), None

    first = jax.tree.map(lambda x: x[0], micro)
    shapes = jax.eval_shape(grad_fn, params, first, dropout_rng)
    zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    total, _ = jax.lax.scan(one, zero, (jnp.arange(k), micro))
    return jax.tree.map(lambda x: x / k, total)

  def _train_step(self, state, batch):
    return self.step_with(state, batch, self.config.seed, self.optimizer)

  def step_with(self, state, batch, seed, optimizer):
    """The train step of a run with this `seed` (an int or a traced scalar) and `optimizer`;
    packed sweeps (attnzoo.train.packed) vmap it over runs."""
    # Dropout masks are a function of (seed, step), like the batches: resuming stays exact.
    dropout_key = jax.random.fold_in(jax.random.key(seed), 1)  # not init's stream
    dropout_rng = jax.random.fold_in(dropout_key, state["step"])
    with sharding.activate(self.mesh, self.rules, self.plan):
      (loss, aux), grads = self._gradients(state["params"], batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {
      "train/loss": loss,
      **{f"train/{k}": v for k, v in aux.items()},
      "train/grad_norm": optax.tree.norm(grads),
    }
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  def _eval_step(self, params, batch):
    with sharding.activate(self.mesh, self.rules, self.plan):
      return self.task.example_metrics(self._outputs(params, batch), batch)

  def evaluate(self, params) -> dict:
    """The task's metrics averaged over the examples of each eval segment
    (eval/<metric>/<segment>) and of all segments (eval/<metric>), plus derived ones."""
    out, pooled = {}, {name: [] for name in self.task.metric_names}
    for segment, batches in self.task.eval_sets().items():
      values = [jax.device_get(self.eval_step(params, self._put(batch))) for batch in batches]
      for name in self.task.metric_names:
        per_example = np.concatenate([np.asarray(v[name], np.float64) for v in values])
        out[f"eval/{name}/{segment}"] = float(per_example.mean())
        pooled[name].append(per_example)
    means = {name: float(np.concatenate(v).mean()) for name, v in pooled.items()}
    out.update({f"eval/{name}": value for name, value in means.items()})
    out.update({f"eval/{name}": value for name, value in self.task.summarize(means).items()})
    return out

  def should_stop(self, eval_metrics: dict) -> bool:
    """Early stop: the task's early-stop metric reached train.early_stop_at."""
    at, metric = self.config.train.early_stop_at, self.task.early_stop_metric
    return at is not None and metric is not None and eval_metrics[metric] >= at


def train(config: ml_collections.ConfigDict, workdir, *, quiet: bool = False) -> dict:
  """Trains (or resumes) the run in workdir; returns the summary also saved as summary.json."""
  workdir = _prepare_workdir(workdir, config)
  summary_path = workdir / "summary.json"
  if summary_path.exists():
    return json.loads(summary_path.read_text())
  tc = config.train
  sharding.maybe_initialize_distributed(with_defaults(config).mesh)
  exp = Experiment(config)
  state = exp.init_state()
  (workdir / "config.json").write_text(config.to_json(indent=2, sort_keys=True))
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
      raise TrainingError(
        f"training loss is not finite (NaN/inf) between steps "
        f"{step - len(window) + 1} and {step}; the last good checkpoint "
        f"(step {last}) is kept in {workdir / 'checkpoints'}"
      )
    mean["throughput/tokens_per_s"] = window_tokens / max(time.time() - window_start, 1e-9)
    logger.write(step, mean)
    window, window_tokens, window_start = [], 0, time.time()

  try:
    for step in range(start, exp.num_steps):
      batch = exp.shardable(exp.task.train_batch(step))
      state, metrics = exp.train_step(state, batch)
      window.append(metrics)
      window_tokens += exp.task.num_tokens(batch)
      done = step + 1
      logger.advance(1)
      if done % tc.log_every == 0:
        flush(done)
      stop = False
      if done % tc.eval_every == 0 or done == exp.num_steps:
        flush(done)
        eval_metrics = exp.evaluate(state["params"])
        logger.write(done, eval_metrics)
        stop = exp.should_stop(eval_metrics)
      if done % tc.checkpoint_every == 0 or done == exp.num_steps or stop:
        flush(done)
        checkpoints.save(done, state)
      if stop:
        status = "early_stopped"
        break
  finally:
    checkpoints.close()
    logger.close()
  return write_summary(workdir, exp, state, status, eval_metrics, started)


def write_summary(workdir, exp, state, status: str, eval_metrics: dict, started: float) -> dict:
  """The run's summary (status, step, sizes, wall time, final evaluation) -> summary.json."""
  if not eval_metrics:
    eval_metrics = exp.evaluate(state["params"])
  summary = {
    "status": status,
    "step": int(state["step"]),
    "params": count_params(state["params"]),
    "state_size": exp.model.state_size(exp.task.max_seq_len),
    "wall_time_s": time.time() - started,
    **eval_metrics,
  }
  (pathlib.Path(workdir) / "summary.json").write_text(json.dumps(summary, indent=2))
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
