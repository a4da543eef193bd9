"""ListOps (Nangia & Bowman 2018) as Long Range Arena generates it (Tay et al. 2021,
`lra_benchmarks/data/listops.py`): nested lists of MIN, MAX, MED (median, floored) and SM (sum
mod 10) over the digits 0-9; the label is the value of the expression (10 classes).

The distribution is LRA's: a node at depth < max_depth (10) is a digit with p = 0.75, else an
operator with randint(2, max_args = 10) arguments; at max_depth it is a digit. A tree is kept
when min_length < tokens < max_length (500 < len < 2000, one token per digit and two per
operator: the operator and its closing "]"), and duplicates are dropped. Unlike LRA (unseeded
`random`, order of a Python set), the stream is seeded: examples are generated in chunks, chunk
i of a split from `random.Random` seeded by (seed, split, i), so any chunk can be made alone, in
any process, and a whole split is a pure function of the seed. Generation stops growing a tree
as soon as it is too long (it would be rejected anyway), which leaves the kept distribution
unchanged.

Tokens: 0 pad, 1 CLS (prepended, for CLS pooling as in LRA), 2-11 digits, 12-15 MIN MAX MED SM,
16 "]" (LRA's "X"); LRA's parentheses carry no information and are dropped, as LRA does.
"""

from __future__ import annotations

import csv
import pathlib
import random

import numpy as np

from attnzoo.tasks.base import register_task
from attnzoo.tasks.lra.common import SPLITS, LRATask

PAD, CLS, DIGIT0, CLOSE = 0, 1, 2, 16
OPERATORS = ("MIN", "MAX", "MED", "SM")
OP0 = 12
VOCAB_SIZE = 17
VALUE_P = 0.75  # LRA: `r > VALUE_P` with VALUE_P = 0.25 makes a digit


class _TooLong(Exception):
  pass


def _apply(op: int, values: list[int]) -> int:
  if op == 0:
    return min(values)
  if op == 1:
    return max(values)
  if op == 2:
    return int(np.median(values))  # LRA: int(np.median(...)), a .5 median floors
  return sum(values) % 10


def _tree(rng: random.Random, depth: int, out: list, limit: int, max_depth: int, max_args: int):
  """Appends the tokens of one random (sub)tree to `out`; returns its value."""
  if len(out) >= limit:
    raise _TooLong
  if depth >= max_depth or rng.random() < VALUE_P:
    value = rng.randrange(10)
    out.append(DIGIT0 + value)
    return value
  at = len(out)
  out.append(None)  # the operator token, drawn after its arguments as LRA does
  num_args = rng.randint(2, max_args)
  values = [_tree(rng, depth + 1, out, limit, max_depth, max_args) for _ in range(num_args)]
  op = rng.randrange(len(OPERATORS))
  out[at] = OP0 + op
  out.append(CLOSE)
  return _apply(op, values)


def generate(
  num_examples: int,
  seed,
  *,
  min_length: int = 500,
  max_length: int = 2000,
  max_depth: int = 10,
  max_args: int = 10,
) -> tuple[np.ndarray, np.ndarray]:
  """(tokens [N, max_length] int32: CLS, the expression (< max_length tokens), padding;
  labels [N] int32).

  `seed` is anything `random.Random` / numpy accept as a seed sequence (e.g. (seed, split, i));
  the N examples are distinct."""
  if not 0 <= min_length < max_length - 1 or max_depth < 1 or max_args < 2:
    raise ValueError(
      f"ListOps needs 0 <= min_length < max_length - 1, max_depth >= 1, max_args >= 2; got "
      f"{min_length}, {max_length}, {max_depth}, {max_args}"
    )
  rng = random.Random(int(np.random.SeedSequence(seed).generate_state(1)[0]))
  tokens = np.zeros((num_examples, max_length), np.int32)
  labels = np.zeros(num_examples, np.int32)
  seen: set[bytes] = set()
  n = 0
  while n < num_examples:
    out: list = []
    try:
      value = _tree(rng, 1, out, max_length, max_depth, max_args)
    except _TooLong:
      continue
    if not min_length < len(out) < max_length:
      continue
    key = bytes(out)
    if key in seen:
      continue
    seen.add(key)
    tokens[n, 0] = CLS
    tokens[n, 1 : 1 + len(out)] = out
    labels[n] = value
    n += 1
  return tokens, labels


def to_text(tokens: np.ndarray) -> str:
  """The expression of one token row in LRA's notation ("[MAX 2 9 ]"), CLS and padding dropped."""
  names = {DIGIT0 + d: str(d) for d in range(10)}
  names.update({OP0 + i: f"[{op}" for i, op in enumerate(OPERATORS)})
  names[CLOSE] = "]"
  return " ".join(names[int(t)] for t in tokens if t not in (PAD, CLS))


def from_text(text: str, max_length: int) -> np.ndarray:
  """LRA's tsv notation ("( ( [MAX 2 9 ) ]" or with "X" for "]") -> one token row as above."""
  ids = {str(d): DIGIT0 + d for d in range(10)}
  ids.update({f"[{op}": OP0 + i for i, op in enumerate(OPERATORS)})
  ids.update({"]": CLOSE, "X": CLOSE})
  words = [w for w in text.replace("(", " ").replace(")", " ").split() if w]
  unknown = sorted({w for w in words if w not in ids})
  if unknown:
    raise ValueError(f"ListOps text has unknown token(s) {', '.join(unknown[:3])}")
  if len(words) + 1 > max_length:
    raise ValueError(f"a ListOps expression of {len(words)} tokens is longer than {max_length - 1}")
  row = np.zeros(max_length, np.int32)
  row[0] = CLS
  row[1 : 1 + len(words)] = [ids[w] for w in words]
  return row


def read_released(root, max_length: int) -> dict:
  """LRA's `basic_{train,val,test}.tsv` (header "Source<TAB>Target") -> {split: (tokens,
  labels)} in this module's token ids."""
  root = pathlib.Path(root)
  splits = {}
  for split in SPLITS:
    path = root / f"basic_{split}.tsv"
    if not path.exists():
      raise ValueError(f"a ListOps file not found at {str(path)!r}")
    with open(path, encoding="utf-8", newline="") as f:
      rows = list(csv.reader(f, delimiter="\t"))[1:]
    tokens = np.stack([from_text(text, max_length) for text, _ in rows])
    splits[split] = (tokens, np.asarray([int(label) for _, label in rows], np.int32))
  return splits


def make_shard(spec: dict, split: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Shard `index` of `split`, from the seed (spec seed, split, index)."""
  return generate(
    count,
    (spec["seed"], SPLITS.index(split), index),
    min_length=spec["min_length"],
    max_length=spec["max_length"],
    max_depth=spec["max_depth"],
    max_args=spec["max_args"],
  )


@register_task("lra/listops")
class ListOps(LRATask):
  """LRA ListOps: 10-way classification of an expression's value (CLS pooling in LRA)."""

  pad_id = PAD
  vocab_size = VOCAB_SIZE
  num_classes = 10

  source_hint = "LRA's release (lra_release/listops-1000: basic_{train,val,test}.tsv)"

  @classmethod
  def load_source(cls, data) -> dict:
    """LRA's released split (data.source = the listops-1000 folder) instead of generating."""
    return read_released(data.source, data.max_length)

  @staticmethod
  def data_spec(data) -> dict:
    if data.source:
      return {"task": "lra/listops", "source": data.source, "max_length": data.max_length}
    return {
      "task": "lra/listops",
      "seed": data.seed,
      "min_length": data.min_length,
      "max_length": data.max_length,
      "max_depth": data.max_depth,
      "max_args": data.max_args,
    }
