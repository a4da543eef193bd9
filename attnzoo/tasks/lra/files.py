"""LRA's real-data tasks, read from local files in their original formats (no TensorFlow), or
from prepared TFDS datasets (`data.source = "tfds:imdb_reviews"` / `"tfds:cifar10"`, read with
attnzoo.tasks.tfds_source; `data.tfds_data_dir` where they were prepared):

- `lra/text`: byte-level IMDB sentiment (Maas et al. 2011), the Stanford `aclImdb/` tree
  (`{train,test}/{pos,neg}/*.txt`). As LRA, the test set is also the validation set.
- `lra/image`: grayscale CIFAR-10 (Krizhevsky 2009), the python `cifar-10-batches-py/` pickles;
  pixels become tokens (vocab 256) with TF's rgb_to_grayscale weights, rounded; LRA's splits
  train[:90%] / train[90%:] / test (45K / 5K / 10K).
- `lra/retrieval`: AAN citation pairs (Radev et al. 2013), LRA's
  `new_aan_pairs.{train,eval,test}.tsv` (label, id1, id2, text1, text2), a dual encoder.

Text tokens: 0 pad, 1 CLS (prepended for CLS pooling), byte b -> b + 2 (LRA: b + 1 with the
CLS added inside the model); vocab 258; documents truncated to data.max_length tokens.
"""

from __future__ import annotations

import csv
import pathlib
import pickle

import numpy as np

from attnzoo.tasks.base import register_task
from attnzoo.tasks.lra.common import LRATask
from attnzoo.tasks.tfds_source import is_tfds, tfds_split

PAD, CLS, BYTE0 = 0, 1, 2
BYTE_VOCAB = 258


def byte_tokens(texts: list[str], max_length: int) -> np.ndarray:
  """[N, max_length] int32: CLS, the UTF-8 bytes + 2 (truncated), padding."""
  out = np.zeros((len(texts), max_length), np.int32)
  for i, text in enumerate(texts):
    data = np.frombuffer(text.encode("utf-8"), np.uint8)[: max_length - 1]
    out[i, 0] = CLS
    out[i, 1 : 1 + len(data)] = data.astype(np.int32) + BYTE0
  return out


def _need(path: pathlib.Path, what: str) -> pathlib.Path:
  if not path.exists():
    raise ValueError(f"{what} not found at {str(path)!r}")
  return path


def _tfds_columns(source: str, split: str, data_dir: str, feature: str):
  """(a list of `feature`, labels int32) of a TFDS split."""
  examples = tfds_split(source, split, data_dir)
  rows = [examples[i] for i in range(len(examples))]
  return [r[feature] for r in rows], np.asarray([int(r["label"]) for r in rows], np.int32)


def read_imdb_tfds(source: str, data_dir: str, max_length: int) -> dict:
  """TFDS imdb_reviews: its train and test splits (test also validates, as LRA)."""
  splits = {}
  for split in ("train", "test"):
    texts, labels = _tfds_columns(source, split, data_dir, "text")
    texts = [t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in texts]
    splits[split] = (byte_tokens(texts, max_length), labels)
  return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}


def read_imdb(root, max_length: int) -> dict:
  root = pathlib.Path(root)
  splits = {}
  for split in ("train", "test"):
    texts, labels = [], []
    for label, name in ((0, "neg"), (1, "pos")):
      folder = _need(root / split / name, "an aclImdb folder")
      for file in sorted(folder.glob("*.txt")):
        texts.append(file.read_text(encoding="utf-8", errors="replace"))
        labels.append(label)
    splits[split] = (byte_tokens(texts, max_length), np.asarray(labels, np.int32))
  return {"train": splits["train"], "val": splits["test"], "test": splits["test"]}


def _unpickle(path: pathlib.Path) -> dict:
  with open(_need(path, "a CIFAR-10 batch"), "rb") as f:
    return pickle.load(f, encoding="bytes")


def gray_tokens(rgb: np.ndarray) -> np.ndarray:
  """[N, 1024] int32 pixel tokens of [N, 3, 1024] RGB (TF's rgb_to_grayscale weights)."""
  rgb = rgb.astype(np.float64)
  gray = np.round(rgb[:, 0] * 0.2989 + rgb[:, 1] * 0.5870 + rgb[:, 2] * 0.1140)
  return np.clip(gray, 0, 255).astype(np.int32)


def _cifar_splits(train: tuple, test: tuple) -> dict:
  """LRA's splits: train[:90%] / train[90%:] / test."""
  (train_x, train_y), cut = train, int(0.9 * len(train[0]))
  return {
    "train": (train_x[:cut], train_y[:cut]),
    "val": (train_x[cut:], train_y[cut:]),
    "test": test,
  }


def read_cifar10_gray_tfds(source: str, data_dir: str) -> dict:
  """TFDS cifar10 (images [32, 32, 3] uint8, row-major pixels as the python pickles)."""

  def load(split):
    images, labels = _tfds_columns(source, split, data_dir, "image")
    rgb = np.stack(images).reshape(len(images), 1024, 3).transpose(0, 2, 1)
    return gray_tokens(rgb), labels

  return _cifar_splits(load("train"), load("test"))


def read_cifar10_gray(root) -> dict:
  root = pathlib.Path(root)

  def load(names):
    batches = [_unpickle(root / n) for n in names]
    rgb = np.concatenate([b[b"data"] for b in batches]).reshape(-1, 3, 1024)
    labels = np.concatenate([b[b"labels"] for b in batches]).astype(np.int32)
    return gray_tokens(rgb), labels

  return _cifar_splits(load([f"data_batch_{i}" for i in range(1, 6)]), load(["test_batch"]))


def read_aan(root, max_length: int) -> dict:
  root = pathlib.Path(root)
  splits = {}
  for split, name in (("train", "train"), ("val", "eval"), ("test", "test")):
    path = _need(root / f"new_aan_pairs.{name}.tsv", "an AAN pairs file")
    labels, first, second = [], [], []
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
      for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
        if len(row) != 5:
          raise ValueError(f"{path.name}: a row has {len(row)} columns, expected 5")
        labels.append(int(float(row[0])))
        first.append(row[3])
        second.append(row[4])
    inputs = np.concatenate([byte_tokens(first, max_length), byte_tokens(second, max_length)], 1)
    splits[split] = (inputs, np.asarray(labels, np.int32))
  return splits


class _FileTask(LRATask):
  generated = False

  @classmethod
  def data_spec(cls, data) -> dict:
    return {"task": cls.name, "max_length": data.max_length}


@register_task("lra/text")
class Text(_FileTask):
  """LRA Text: IMDB sentiment from bytes (2 classes)."""

  vocab_size, num_classes = BYTE_VOCAB, 2
  source_hint = (
    "download aclImdb_v1.tar.gz from https://ai.stanford.edu/~amaas/data/sentiment/ and unpack"
    " it (data.source = the aclImdb folder), or data.source = tfds:imdb_reviews"
  )

  @classmethod
  def load_source(cls, data) -> dict:
    if is_tfds(data.source):
      return read_imdb_tfds(data.source, data.tfds_data_dir, data.max_length)
    return read_imdb(data.source, data.max_length)


@register_task("lra/image")
class Image(_FileTask):
  """LRA Image: grayscale CIFAR-10, one token per pixel (10 classes)."""

  vocab_size, num_classes = 256, 10
  pad_id = None
  source_hint = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and unpack"
    " it (data.source = the cifar-10-batches-py folder), or data.source = tfds:cifar10"
  )

  @classmethod
  def data_spec(cls, data) -> dict:
    return {"task": cls.name}

  @classmethod
  def load_source(cls, data) -> dict:
    if is_tfds(data.source):
      return read_cifar10_gray_tfds(data.source, data.tfds_data_dir)
    return read_cifar10_gray(data.source)


@register_task("lra/retrieval")
class Retrieval(_FileTask):
  """LRA Retrieval: do two AAN papers cite each other? A dual encoder over byte tokens."""

  model_kind = "dual_encoder"
  vocab_size, num_classes = BYTE_VOCAB, 2
  source_hint = (
    "get lra_release.gz (LRA's release, gs://long-range-arena/lra_release) and unpack"
    " lra_release/tsv_data (data.source = that folder)"
  )

  @classmethod
  def load_source(cls, data) -> dict:
    return read_aan(data.source, data.max_length)
