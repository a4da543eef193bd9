"""Packed sweeps: runs that differ only in learning rate and seed train together in ONE jitted
program, the train step `vmap`ped over runs.

Small models (MQAR, ICL) are launch-bound on an accelerator (a 2-layer d=128 model steps in
~2 ms on an H200), so R runs packed cost about one. Each run keeps its own parameters, optimiser
state, data (batches and evaluation sets are functions of its seed), dropout masks and
early-stop mask: once a run stops (or its loss stops being finite), the step leaves its state
unchanged. Every run gets the workdir files a lone run writes (config.json, metrics.jsonl,
TensorBoard, summary.json) with the same values, up to float reassociation in the vmapped
matmuls, and a checkpoint of its final state (so `attnzoo eval` and `load_run` read it).
The pack checkpoints its stacked state every train.checkpoint_every steps beside the runs'
workdirs, so a killed pack resumes there (then removes it). Differences from
`trainer.train`: a run whose loss is not finite ends with status "not_finite"
while the others go on (a lone run raises TrainingError).
"""

from __future__ import annotations

import hashlib
import json
import math
import pathlib
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.config import ConfigError
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.logging import MetricsLogger
from attnzoo.train.optim import make_optimizer
from attnzoo.train.trainer import Experiment, _prepare_workdir, write_summary

# Config fields a pack may vary; everything else must be equal.
VARYING = ("seed", "train.lr", "name", "group")


def _shared_part(config) -> str:
  d = json.loads(config.to_json())
  for path in VARYING:
    *parents, leaf = path.split(".")
    node = d
    for part in parents:
      node = node[part]
    node.pop(leaf, None)
  return json.dumps(d, sort_keys=True)


def packable(configs) -> bool:
  """Whether the configs differ only in learning rate and seed (and name/group)."""
  return len({_shared_part(c) for c in configs}) == 1


def pack_groups(configs) -> list[list]:
  """The configs grouped into packs (runs differing only in lr and seed), in first-seen order."""
  groups = {}
  for c in configs:
    groups.setdefault(_shared_part(c), []).append(c)
  return list(groups.values())


def packed_step(exp: Experiment, train_config, num_steps: int, shared_batch: bool):
  """exp's train step vmapped over runs: (states, batch(es), seeds, lrs, active) ->
  (states, metrics); a run with active False keeps its state. shared_batch: one batch for all
  runs (else one per run)."""

  def one_run(state, batch, seed, lr, active):
    optimizer = make_optimizer(_WithLR(train_config, lr), num_steps)
    new, metrics = exp.step_with(state, batch, seed, optimizer)
    return jax.tree.map(lambda n, o: jnp.where(active, n, o), new, state), metrics

  return jax.vmap(one_run, in_axes=(0, None if shared_batch else 0, 0, 0, 0))


class _WithLR:
  """A train section whose lr is a (traced) per-run value."""

  def __init__(self, train_config, lr):
    self._train_config, self.lr = train_config, lr

  def __getattr__(self, key):
    return getattr(self._train_config, key)


def _stack(trees):
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _run(tree, r: int):
  return jax.tree.map(lambda x: x[r], tree)


def train_packed(
  configs,
  workdirs,
  *,
  quiet: bool = True,
  max_chunk: int | None = None,
  checkpoint: bool = True,
) -> list[dict]:
  """Trains the runs `configs` (one per workdir) packed; returns their summaries in order.
  Runs whose workdir holds a summary.json are not re-run; checkpoint=False keeps no final
  checkpoint (large sweeps that need only the summaries). The steps between two logs or
  evaluations (at most max_chunk, and no further than a change of batch shape) run as one
  `lax.scan` over batches stacked on the host, so a small model is not bound by one launch
  per step. max_chunk defaults to 1024 on accelerators and 1 on the CPU (no launch cost to
  save there, and a scanned step compiles several times slower). Each length of scan and
  batch shape compiles once: fixed-order data (Zoology's) repeats the same few every epoch;
  shuffled multi-length data compiles more."""
  if not configs or len(configs) != len(workdirs):
    raise ConfigError("train_packed needs one workdir per config")
  if not packable(configs):
    raise ConfigError("a pack's configs may differ only in train.lr and seed")
  workdirs = [_prepare_workdir(w, c) for c, w in zip(configs, workdirs)]
  summaries = [
    json.loads((w / "summary.json").read_text()) if (w / "summary.json").exists() else None
    for w in workdirs
  ]
  todo = [r for r, s in enumerate(summaries) if s is None]
  if not todo:
    return summaries
  configs, workdirs = [configs[r] for r in todo], [workdirs[r] for r in todo]
  tc = configs[0].train
  experiments = {}  # seed -> Experiment (task data depend on the seed only)
  for c in configs:
    if c.seed not in experiments:
      experiments[c.seed] = Experiment(c)
  exps = [experiments[c.seed] for c in configs]
  base = exps[0]
  num_steps = base.num_steps
  for c, w in zip(configs, workdirs):
    (w / "config.json").write_text(c.to_json(indent=2, sort_keys=True))

  shared = len(experiments) == 1  # one seed: every run sees the same batches
  one_step = packed_step(base, tc, num_steps, shared)

  def steps(state, batches, seeds, lrs, active):
    return jax.lax.scan(lambda s, batch: one_step(s, batch, seeds, lrs, active), state, batches)

  steps_fn = jax.jit(steps, donate_argnums=0)
  if max_chunk is None:
    max_chunk = 1 if jax.default_backend() == "cpu" else 1024

  def host_batches(start, stop):
    """The batches of steps [start, end) stacked ([steps, (runs,) batch, ...]) and end: the
    first step at or after which the batch shapes change (multi-length tasks), else stop."""
    per_step, shapes = [], None
    for step in range(start, stop):
      by_seed = {seed: exp.task.train_batch(step) for seed, exp in experiments.items()}
      step_shapes = {k: v.shape for b in by_seed.values() for k, v in b.items()}
      if shapes is not None and step_shapes != shapes:
        return jax.tree.map(lambda *xs: np.stack(xs), *per_step), step
      shapes = step_shapes
      if shared:
        per_step.append(by_seed[configs[0].seed])
      else:
        per_step.append(jax.tree.map(lambda *xs: np.stack(xs), *[by_seed[c.seed] for c in configs]))
    return jax.tree.map(lambda *xs: np.stack(xs), *per_step), stop

  state = _stack([exp.init_state() for exp in exps])
  seeds = jnp.array([c.seed for c in configs], jnp.int32)
  lrs = jnp.array([c.train.lr for c in configs], jnp.float32)
  R = len(configs)
  active = np.ones(R, bool)
  status = ["completed"] * R
  final_eval = [{} for _ in range(R)]
  # The pack's own checkpoints (every train.checkpoint_every steps): a killed pack resumes.
  pack_dir = _pack_dir(workdirs)
  pack_checkpoints = Checkpoints(pack_dir / "state", 1)
  start = pack_checkpoints.latest_step() or 0
  if start:
    state = pack_checkpoints.restore(state)
    meta = json.loads((pack_dir / f"meta_{start}.json").read_text())
    active[:], status, final_eval = meta["active"], meta["status"], meta["final_eval"]
  loggers = [MetricsLogger(w, num_steps, start, quiet or r > 0) for r, w in enumerate(workdirs)]
  started = time.time()
  window, window_start = [], time.time()
  tokens = np.zeros(R)

  def flush(step):
    nonlocal window, window_start
    if not window:
      return
    values = jax.device_get(window)
    for r in np.flatnonzero(active):
      mean = {k: float(np.concatenate([v[k][:, r] for v in values]).mean()) for k in values[0]}
      if not all(math.isfinite(v) for v in mean.values()):
        active[r], status[r] = False, "not_finite"
      mean["throughput/tokens_per_s"] = tokens[r] / max(time.time() - window_start, 1e-9)
      loggers[r].write(step, mean)
    window, window_start = [], time.time()
    tokens[:] = 0

  def next_boundary(step):
    every = [tc.log_every, tc.eval_every]
    return min([num_steps, step + max_chunk] + [(step // e + 1) * e for e in every])

  try:
    step = start
    while step < num_steps and active.any():
      batches, stop = host_batches(step, next_boundary(step))
      state, metrics = steps_fn(state, batches, seeds, lrs, jnp.asarray(active))
      window.append(metrics)
      loggers[0].advance(stop - step)  # the pack's progress bar (unless quiet)
      tokens[active] += (stop - step) * base.task.num_tokens(base.task.train_batch(step))
      step = stop
      if step % tc.log_every == 0:
        flush(step)
      if step % tc.eval_every == 0 or step == num_steps:
        flush(step)
        for r in np.flatnonzero(active):
          final_eval[r] = exps[r].evaluate(_run(state["params"], r))
          loggers[r].write(step, final_eval[r])
          if exps[r].should_stop(final_eval[r]):
            active[r], status[r] = False, "early_stopped"
      if step % tc.checkpoint_every == 0 and step < num_steps and active.any():
        meta = {"active": active.tolist(), "status": status, "final_eval": final_eval}
        (pack_dir / f"meta_{step}.json").write_text(json.dumps(meta))  # before the state
        pack_checkpoints.save(step, state)
    flush(num_steps)
  finally:
    for logger in loggers:
      logger.close()
    pack_checkpoints.close()
  for r in range(R):
    run_state = _run(state, r)
    if checkpoint:
      checkpoints = Checkpoints(workdirs[r] / "checkpoints", tc.max_checkpoints)
      checkpoints.save(int(run_state["step"]), run_state)
      checkpoints.close()
    summaries[todo[r]] = write_summary(
      workdirs[r], exps[r], run_state, status[r], final_eval[r], started
    )
  shutil.rmtree(pack_dir)
  return summaries


def _pack_dir(workdirs) -> pathlib.Path:
  """Where a pack keeps its own checkpoints: beside its runs' workdirs, named by them."""
  names = "\n".join(str(w.resolve()) for w in workdirs)
  return workdirs[0].parent / f".pack_{hashlib.sha1(names.encode()).hexdigest()[:12]}"
