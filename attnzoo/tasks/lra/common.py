"""What every Long Range Arena task shares: sequence classification over fixed train / val / test
splits (`LRATask`), and the npz shards `attnzoo data prepare lra/<task>` writes and training reads.

Shards: `DIR/spec.json` (the task and its data parameters, written first), one
`DIR/<split>-<index>.npz` per shard (arrays "inputs" [n, T] and "labels" [n]), each written to a
temporary name and renamed, so a shard on disk is always whole; `DIR/meta.json` (example counts)
is written last and marks the directory complete. Preparing again skips the shards already
there (idempotent, resumable after a kill); a directory prepared with other parameters is an
error. Generated tasks make shard i of a split from the seed (data seed, split, i), so a split
is the same whether made in one process, many, or in memory.
"""

from __future__ import annotations

import abc
import importlib
import json
import multiprocessing
import os
import pathlib
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo.tasks.base import Batch, Task

SPLITS = ("train", "val", "test")


def shard_plan(counts: dict[str, int], shard_size: int) -> list[tuple[str, int, int]]:
  """[(split, shard index, examples)] covering counts[split] examples per split."""
  plan = []
  for split in SPLITS:
    n = counts.get(split, 0)
    for i, start in enumerate(range(0, n, shard_size)):
      plan.append((split, i, min(shard_size, n - start)))
  return plan


def _shard_name(split: str, index: int) -> str:
  return f"{split}-{index:05d}.npz"


def _write_shard(out, split: str, index: int, inputs: np.ndarray, labels: np.ndarray) -> None:
  """One shard, written under a temporary name and renamed: never half-written."""
  path = pathlib.Path(out) / _shard_name(split, index)
  tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.npz")
  np.savez(tmp, inputs=inputs, labels=labels)
  os.replace(tmp, path)


def _make_shard(job) -> tuple[str, int]:
  """Worker: generate one shard with `module.make_shard` and write it."""
  module, spec, out, split, index, count = job
  _write_shard(
    out, split, index, *importlib.import_module(module).make_shard(spec, split, index, count)
  )
  return split, count


def _write_json(path: pathlib.Path, value) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(value, indent=2, sort_keys=True))
  os.replace(tmp, path)


def _start(out, spec: dict) -> pathlib.Path:
  """Creates `out` with spec.json, or checks that it holds the same spec."""
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  spec_path = out / "spec.json"
  if spec_path.exists():
    if json.loads(spec_path.read_text()) != spec:
      raise ValueError(f"{out} holds a dataset prepared with other parameters; use a new --out")
  else:
    _write_json(spec_path, spec)
  return out


def prepare(
  module: str,
  spec: dict,
  counts: dict[str, int],
  out,
  *,
  shard_size: int,
  workers: int = 1,
  progress: bool = True,
) -> dict:
  """Generates the shards of every split into `out` with `module.make_shard` (see the module
  docstring), in `workers` processes; returns meta."""
  spec = json.loads(json.dumps({**spec, "counts": counts, "shard_size": shard_size}))
  out = _start(out, spec)
  plan = shard_plan(counts, shard_size)
  todo = [
    (module, spec, str(out), s, i, n) for s, i, n in plan if not (out / _shard_name(s, i)).exists()
  ]
  from tqdm import tqdm

  bar = tqdm(total=len(plan), initial=len(plan) - len(todo), unit="shard", disable=not progress)
  if workers > 1 and len(todo) > 1:
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
      for _ in pool.imap_unordered(_make_shard, todo):
        bar.update()
  else:
    for job in todo:
      _make_shard(job)
      bar.update()
  bar.close()
  meta = {"task": spec["task"], "examples": {s: counts.get(s, 0) for s in SPLITS}}
  _write_json(out / "meta.json", meta)
  return meta


def write_splits(splits: dict, spec: dict, out, *, shard_size: int, progress: bool = True) -> dict:
  """Writes loaded splits {split: (inputs, labels)} into `out` as shards; returns meta."""
  out = _start(out, json.loads(json.dumps({**spec, "shard_size": shard_size})))
  from tqdm import tqdm

  counts = {s: len(splits[s][0]) for s in SPLITS}
  plan = shard_plan(counts, shard_size)
  for split, index, _ in tqdm(plan, unit="shard", disable=not progress):
    if not (out / _shard_name(split, index)).exists():
      rows = slice(index * shard_size, (index + 1) * shard_size)
      _write_shard(out, split, index, splits[split][0][rows], splits[split][1][rows])
  meta = {"task": spec["task"], "examples": counts}
  _write_json(out / "meta.json", meta)
  return meta


def read_split(directory, split: str, task: str) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, labels) of one split of a prepared directory; a one-line error when absent."""
  directory = pathlib.Path(directory)
  meta_path = directory / "meta.json"
  if not meta_path.exists():
    raise ValueError(
      f"no prepared {task} data in {str(directory)!r}; run: attnzoo data prepare {task} "
      f"--out {directory}"
    )
  meta = json.loads(meta_path.read_text())
  if meta["task"] != task:
    raise ValueError(f"{str(directory)!r} holds {meta['task']} data, not {task}")
  files = sorted(directory.glob(f"{split}-*.npz"))
  if not files:
    raise ValueError(f"{str(directory)!r} has no {split} shards")
  parts = [np.load(f) for f in files]
  return (
    np.concatenate([p["inputs"] for p in parts]),
    np.concatenate([p["labels"] for p in parts]),
  )


class LRATask(Task):
  """Classification of whole sequences over fixed splits: epochs visit the train split in an
  order drawn from (seed, epoch); the eval segments are "val" and "test" (select on
  eval/accuracy/val, report eval/accuracy/test, as LRA does). `pad_id` (None: no padding)
  marks the tokens kept out of the model's context and pooling."""

  model_kind = "classifier"
  metric_names = ("loss", "accuracy")
  early_stop_metric = "eval/accuracy/val"
  pad_id: ClassVar[int | None] = 0
  vocab_size: int
  num_classes: int

  @staticmethod
  @abc.abstractmethod
  def data_spec(data) -> dict:
    """The parameters that define the dataset ("task" and the generator's or loader's)."""

  # loader tasks (real datasets in their original formats) set generated = False, implement
  # load_source(data) and say in source_hint how to get the files
  generated: ClassVar[bool] = True
  source_hint: ClassVar[str] = ""

  @classmethod
  def load_source(cls, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    raise NotImplementedError(f"{cls.name} is generated, it has no source files")

  @classmethod
  def _source_splits(cls, data) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    if not data.source:
      raise ValueError(
        f"{cls.name} needs its dataset: {cls.source_hint}; then: attnzoo data prepare "
        f"{cls.name} --out DIR --config.data.source=PATH (or set data.source)"
      )
    return cls.load_source(data)

  @classmethod
  def from_config(cls, config) -> LRATask:
    """Splits from the prepared shards in data.dir, else generated in memory (generators) or
    read from data.source (loaders)."""
    d = config.data
    spec = cls.data_spec(d)
    if d.dir:
      splits = {s: read_split(d.dir, s, cls.name) for s in SPLITS}
    elif cls.generated and not d.get("source"):
      counts = {"train": d.num_train, "val": d.num_val, "test": d.num_test}
      make = importlib.import_module(cls.__module__).make_shard
      splits = generated_splits(make, spec, counts, d.shard_size)
    else:
      splits = cls._source_splits(d)
    return cls(
      splits,
      batch_size=d.batch_size,
      eval_batch_size=d.eval_batch_size,
      seed=config.seed,
    )

  @classmethod
  def prepare(cls, config, out, *, workers: int = 1, progress: bool = True) -> dict:
    """Writes the splits of `config.data` as shards into `out` (`attnzoo data prepare`)."""
    d = config.data
    if d.shard_size < 1:
      raise ValueError(f"{cls.name}: shard_size must be >= 1, got {d.shard_size}")
    spec = cls.data_spec(d)
    if not cls.generated or d.get("source"):
      return write_splits(
        cls._source_splits(d), spec, out, shard_size=d.shard_size, progress=progress
      )
    counts = {"train": d.num_train, "val": d.num_val, "test": d.num_test}
    if min(counts.values()) < 1:
      raise ValueError(f"{cls.name}: num_train, num_val and num_test must be >= 1")
    return prepare(
      cls.__module__, spec, counts, out, shard_size=d.shard_size, workers=workers, progress=progress
    )

  def __init__(
    self,
    data: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    batch_size: int,
    eval_batch_size: int,
    seed: int,
  ):
    for split in SPLITS:
      if split not in data or not len(data[split][0]):
        raise ValueError(f"{self.name}: the {split} split is empty")
    if not 1 <= batch_size <= len(data["train"][0]):
      raise ValueError(
        f"{self.name}: batch_size must be in [1, {len(data['train'][0])}], got {batch_size}"
      )
    if eval_batch_size < 1:
      raise ValueError(f"{self.name}: eval_batch_size must be >= 1, got {eval_batch_size}")
    self.data = data
    self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
    self.steps_per_epoch = len(data["train"][0]) // batch_size
    self._order = (None, None)

  def _batch(self, inputs: np.ndarray, labels: np.ndarray) -> Batch:
    return {"inputs": np.asarray(inputs, np.int32), "labels": np.asarray(labels, np.int32)}

  def train_batch(self, step: int) -> Batch:
    epoch, index = divmod(step, self.steps_per_epoch)
    if self._order[0] != epoch:
      rng = np.random.default_rng([self.seed, 3, epoch])
      self._order = (epoch, rng.permutation(len(self.data["train"][0])))
    rows = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
    inputs, labels = self.data["train"]
    return self._batch(inputs[rows], labels[rows])

  def eval_sets(self) -> dict[str, list[Batch]]:
    out = {}
    for split in ("val", "test"):
      inputs, labels = self.data[split]
      out[split] = [
        self._batch(inputs[i : i + self.eval_batch_size], labels[i : i + self.eval_batch_size])
        for i in range(0, len(inputs), self.eval_batch_size)
      ]
    return out

  @property
  def max_seq_len(self) -> int:
    return max(v[0].shape[1] for v in self.data.values())

  def model_kwargs(self) -> dict:
    return {"vocab_size": self.vocab_size, "num_classes": self.num_classes}

  def model_inputs(self, batch: Batch) -> dict:
    if self.pad_id is None:
      return {"tokens": batch["inputs"]}
    return {"tokens": batch["inputs"], "mask": batch["inputs"] != self.pad_id}

  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    metrics = self.example_metrics(outputs, batch)
    return metrics["loss"].mean(), {"accuracy": metrics["accuracy"].mean()}

  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    labels = batch["labels"]
    loss = optax.softmax_cross_entropy_with_integer_labels(outputs.astype(jnp.float32), labels)
    return {"loss": loss, "accuracy": (jnp.argmax(outputs, -1) == labels).astype(jnp.float32)}


def generated_splits(
  make_shard: Callable, spec: dict, counts: dict[str, int], shard_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Every split made in memory, shard by shard exactly as `prepare` writes them."""
  out = {}
  for split in SPLITS:
    parts = [make_shard(spec, s, i, n) for s, i, n in shard_plan(counts, shard_size) if s == split]
    out[split] = tuple(np.concatenate(a) for a in zip(*parts))
  return out
