"""The task protocol and registry (DESIGN.md, Tasks).

A task owns everything the trainer must not know by name:
  - its data: `train_batch(step)` is a pure function of (seed, step), so a killed run resumes
    bit-exactly, and `eval_sets()` are fixed batches grouped by segment;
  - the model head it needs (`model_kind`: "causal_lm", "classifier" or "regressor", built by
    `attnzoo.models.build_model` with `model_kwargs()`), and how a batch feeds it
    (`model_inputs(batch)`: keyword arguments of the model's `__call__`);
  - its loss (`loss(outputs, batch) -> (scalar, {name: scalar})`, traced inside the jitted
    train step) and its metrics (`example_metrics(outputs, batch) -> {name: [N]}`, one value per
    example; the trainer averages them per segment as `eval/<name>/<segment>` and over all
    segments as `eval/<name>`; `summarize` may derive more from those means).

Batches are dicts of numpy arrays with the examples on the leading axis; "inputs" holds the
model's input sequences [N, T, ...] (tokens or vectors), from which throughput is counted.
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import numpy as np

Batch = dict[str, np.ndarray]
MODEL_KINDS = ("causal_lm", "classifier", "regressor", "dual_encoder")

TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
  """Class decorator: `@register_task("mqar")` makes the task buildable as `config.task`."""

  def decorator(cls):
    if name in TASKS:
      raise ValueError(f"task {name!r} is registered twice")
    if cls.model_kind not in MODEL_KINDS:
      raise ValueError(f"task {name!r}: model_kind must be one of {', '.join(MODEL_KINDS)}")
    TASKS[name] = cls
    cls.name = name
    return cls

  return decorator


def build_task(config) -> Task:
  """The task `config.task` names, built from the config (a one-line error when unknown)."""
  if config.task not in TASKS:
    raise ValueError(f"unknown task {config.task!r}; registered: {', '.join(sorted(TASKS))}")
  return TASKS[config.task].from_config(config)


class Task(abc.ABC):
  """Base class of every registered task; see the module docstring for the contract."""

  name: ClassVar[str]
  model_kind: ClassVar[str]
  metric_names: ClassVar[tuple[str, ...]]  # keys of example_metrics
  early_stop_metric: ClassVar[str | None] = None  # an eval metric, higher is better

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config) -> Task:
    """Builds the task from a whole experiment config (its `data` section and `seed`)."""

  @abc.abstractmethod
  def train_batch(self, step: int) -> Batch:
    """The training batch of `step`: a pure function of (seed, step)."""

  @abc.abstractmethod
  def eval_sets(self) -> dict[str, list[Batch]]:
    """{segment name: [batch, ...]}: fixed evaluation batches (the last may be smaller)."""

  @abc.abstractmethod
  def model_kwargs(self) -> dict[str, Any]:
    """The task-given arguments of the model (vocab_size, num_classes, input_dim, ...)."""

  @abc.abstractmethod
  def model_inputs(self, batch: Batch) -> dict[str, Any]:
    """Keyword arguments of the model's `__call__` for this batch."""

  @abc.abstractmethod
  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(scalar training loss, {name: scalar} logged as train/<name>); traced under jit."""

  @abc.abstractmethod
  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    """{name: [N]} per-example evaluation values, names as in `metric_names`."""

  @property
  @abc.abstractmethod
  def max_seq_len(self) -> int:
    """The longest sequence the task evaluates (for the model's decoding-state size)."""

  def summarize(self, means: dict[str, float]) -> dict[str, float]:
    """Metrics derived from the averaged eval metrics (e.g. perplexity from the loss)."""
    del means
    return {}

  @staticmethod
  def num_tokens(batch: Batch) -> int:
    """Sequence positions in a batch (examples x length), for throughput."""
    return int(np.prod(batch["inputs"].shape[:2]))
