"""Multi-query associative recall, MQAR (Arora et al. 2023, "Zoology"), as Zoology generates it.

An example of length L with K key-value pairs is `k1 v1 ... kK vK` followed by the queries:
key j is placed at offset 2·gap_j of the remaining (L - 2K) tokens, where the K gaps are drawn
without replacement from (L - 2K)/2 slots with p(i) ∝ a·i^(a-1) (a = 0.01). Keys come from
[1, V/2), values from [V/2, V), distinct within an example, 0 is filler (or uniform random
tokens with `random_non_queries`). The label at a query's position is its value (after the
next-token shift); every other label is -100. Accuracy is per example, averaged over examples.

Zoology samples row by row with `np.random.choice`; here every draw is vectorised over
examples (uniform subsets by ranking random numbers; the weighted gaps by Gumbel-top-k, which
is the same distribution as sequential sampling without replacement), so 100k examples take
seconds. The draws differ from Zoology's number for number; the distribution is the same.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo.tasks.base import Batch, Task, register_task

IGNORE = -100


@dataclasses.dataclass(frozen=True)
class Segment:
  seq_len: int
  num_kv_pairs: int
  num_examples: int
  batch_size: int

  @property
  def name(self) -> str:
    return f"L{self.seq_len}_kv{self.num_kv_pairs}"


def check_segment(segment: Segment, vocab_size: int):
  """Raises ValueError naming the problem if MQAR cannot be generated with these sizes."""
  L, K = segment.seq_len, segment.num_kv_pairs
  if L % 2:
    raise ValueError(f"MQAR seq_len must be even, got {L}")
  if K < 1 or 4 * K > L:
    raise ValueError(
      f"MQAR num_kv_pairs={K} does not fit seq_len={L} (needs 4*num_kv_pairs <= seq_len)"
    )
  if vocab_size <= L:
    raise ValueError(f"MQAR vocab_size ({vocab_size}) must exceed seq_len ({L})")
  if K >= vocab_size // 2:
    raise ValueError(f"MQAR num_kv_pairs={K} needs more than {vocab_size // 2} keys")
  if segment.num_examples < 1 or segment.batch_size < 1:
    raise ValueError(f"MQAR segment {segment.name}: num_examples and batch_size must be >= 1")


def _distinct(rng, low, high, rows, k, block=4096):
  """rows × k distinct integers from [low, high), each row a uniform random ordered subset."""
  out = np.empty((rows, k), np.int64)
  for start in range(0, rows, block):
    n = min(block, rows - start)
    scores = rng.random((n, high - low), dtype=np.float32)
    top = np.argpartition(scores, k - 1, axis=1)[:, :k]  # k smallest, in arbitrary order
    order = np.argsort(np.take_along_axis(scores, top, axis=1), axis=1)
    out[start : start + n] = low + np.take_along_axis(top, order, axis=1)
  return out


def generate(
  vocab_size: int,
  num_examples: int,
  seq_len: int,
  num_kv_pairs: int,
  seed: int,
  power_a: float = 0.01,
  random_non_queries: bool = True,
):
  """Returns (inputs [N, L] int32, labels [N, L] int32)."""
  check_segment(Segment(seq_len, num_kv_pairs, num_examples, 1), vocab_size)
  rng = np.random.default_rng(seed)
  K, N, L = num_kv_pairs, num_examples, seq_len
  context = 2 * K
  keys = _distinct(rng, 1, vocab_size // 2, N, K)
  values = _distinct(rng, vocab_size // 2, vocab_size, N, K)
  kvs = np.zeros((N, context), np.int64)
  kvs[:, 0::2], kvs[:, 1::2] = keys, values

  space = (L - context) // 2
  log_p = np.log(power_a) + (power_a - 1) * np.log(np.arange(1, space + 1))
  gumbel = -np.log(-np.log(rng.random((N, space))))
  gaps = np.argsort(-(log_p + gumbel), axis=1)[:, :K]  # Gumbel-top-k, in draw order

  queries = np.zeros((N, L - context + 1), np.int64)
  np.put_along_axis(queries, 2 * gaps, keys, axis=1)
  examples = np.concatenate([kvs, queries], axis=1)
  labels = np.full((N, L + 1), IGNORE, np.int64)
  np.put_along_axis(labels, 2 * gaps + context + 1, values, axis=1)
  inputs, labels = examples[:, :-1], labels[:, 1:]
  if random_non_queries:
    filler = inputs == 0
    inputs = np.where(filler, rng.integers(0, vocab_size, size=inputs.shape), inputs)
  return inputs.astype(np.int32), labels.astype(np.int32)


def with_targets(inputs, labels, num_kv_pairs):
  """Batch dict: tokens plus the K query positions and values per example, in order."""
  positions = np.sort(
    np.argsort(labels == IGNORE, axis=1, kind="stable")[:, :num_kv_pairs], axis=1
  ).astype(np.int32)
  return {
    "inputs": inputs,
    "labels": labels,
    "target_positions": positions,
    "targets": np.take_along_axis(labels, positions, axis=1),
  }


@register_task("mqar")
class MQAR(Task):
  """Multi-segment MQAR train and test sets; the batch at a step depends on (seed, step) only.

  Every batch holds one segment. Each epoch visits all train batches in an order and with
  example groupings drawn from (seed, epoch); with `shuffle=False`, as Zoology's loader
  (`shuffle=False`), every epoch visits the same batches of consecutive examples in the same
  order (segment by segment). The model is a causal LM whose logits are taken
  at the query positions only; the loss is the cross-entropy there and an example counts as
  scored by the fraction of its queries answered correctly (Zoology's per-example accuracy,
  averaged over examples).
  """

  model_kind = "causal_lm"
  metric_names = ("loss", "accuracy")
  early_stop_metric = "eval/accuracy"

  def __init__(
    self,
    *,
    vocab_size: int,
    train_segments,
    test_segments,
    seed: int,
    power_a: float = 0.01,
    random_non_queries: bool = True,
    shuffle: bool = True,
  ):
    for segment in (*train_segments, *test_segments):
      check_segment(segment, vocab_size)
      if segment.batch_size > segment.num_examples:
        raise ValueError(
          f"MQAR segment {segment.name}: batch_size {segment.batch_size} > "
          f"num_examples {segment.num_examples}"
        )
    self.vocab_size, self.seed, self.shuffle = vocab_size, seed, shuffle
    self.train_segments, self.test_segments = tuple(train_segments), tuple(test_segments)
    make = lambda s, i, salt: generate(
      vocab_size,
      s.num_examples,
      s.seq_len,
      s.num_kv_pairs,
      seed=[seed, salt, i],
      power_a=power_a,
      random_non_queries=random_non_queries,
    )
    self.train_data = [make(s, i, 0) for i, s in enumerate(self.train_segments)]
    self.test_data = [make(s, i, 1) for i, s in enumerate(self.test_segments)]
    self.batches_per_epoch = [s.num_examples // s.batch_size for s in self.train_segments]
    self._epoch_cache = (None, None)

  @classmethod
  def from_config(cls, config) -> MQAR:
    d = config.data

    def segments(key):
      specs = d[key]
      if not specs or any(len(s) != 4 for s in specs):
        raise ValueError(
          f"data.{key} must be a non-empty list of (seq_len, num_kv_pairs, "
          f"num_examples, batch_size), got {specs!r}"
        )
      return [Segment(*map(int, s)) for s in specs]

    if not d.power_a > 0:
      raise ValueError(f"data.power_a must be positive, got {d.power_a!r}")
    return cls(
      vocab_size=d.vocab_size,
      train_segments=segments("train_segments"),
      test_segments=segments("test_segments"),
      seed=config.seed,
      power_a=d.power_a,
      random_non_queries=d.random_non_queries,
      shuffle=d.get("shuffle", True),
    )

  @property
  def steps_per_epoch(self) -> int:
    return sum(self.batches_per_epoch)

  @property
  def max_seq_len(self) -> int:
    return max(s.seq_len for s in self.test_segments)

  def _epoch_plan(self, epoch):
    if self._epoch_cache[0] != epoch:
      rng = np.random.default_rng([self.seed, 2, epoch])
      batches = [(i, b) for i, n in enumerate(self.batches_per_epoch) for b in range(n)]
      if self.shuffle:
        order = rng.permutation(len(batches))
        examples = [rng.permutation(s.num_examples) for s in self.train_segments]
      else:
        order = np.arange(len(batches))
        examples = [np.arange(s.num_examples) for s in self.train_segments]
      self._epoch_cache = (epoch, ([batches[j] for j in order], examples))
    return self._epoch_cache[1]

  def train_batch(self, step: int) -> Batch:
    epoch, index = divmod(step, self.steps_per_epoch)
    batches, examples = self._epoch_plan(epoch)
    segment_index, b = batches[index]
    segment = self.train_segments[segment_index]
    rows = examples[segment_index][b * segment.batch_size : (b + 1) * segment.batch_size]
    inputs, labels = self.train_data[segment_index]
    return with_targets(inputs[rows], labels[rows], segment.num_kv_pairs)

  def eval_sets(self) -> dict[str, list[Batch]]:
    out = {}
    for segment, (inputs, labels) in zip(self.test_segments, self.test_data):
      out[segment.name] = [
        with_targets(
          inputs[i : i + segment.batch_size],
          labels[i : i + segment.batch_size],
          segment.num_kv_pairs,
        )
        for i in range(0, segment.num_examples, segment.batch_size)
      ]
    return out

  def model_kwargs(self) -> dict:
    return {"vocab_size": self.vocab_size}

  def model_inputs(self, batch: Batch) -> dict:
    return {"tokens": batch["inputs"], "logits_at": batch["target_positions"]}

  @staticmethod
  def _query_cross_entropy(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])

  @staticmethod
  def _query_accuracy(logits, batch):
    """The fraction of an example's queries answered correctly, per example [N]."""
    return (jnp.argmax(logits, -1) == batch["targets"]).mean(-1)

  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    accuracy = self._query_accuracy(outputs, batch).mean()
    return self._query_cross_entropy(outputs, batch).mean(), {"accuracy": accuracy}

  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    return {
      "loss": self._query_cross_entropy(outputs, batch).mean(-1),
      "accuracy": self._query_accuracy(outputs, batch),
    }
