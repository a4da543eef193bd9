"""Language modeling on real text: characters, bytes or pre-tokenized token files.

Sources (`data.source`):
  - "shakespeare": tiny Shakespeare, shipped in the package (attnzoo/data/tinyshakespeare.txt,
    sha256 86c4e6aa…), so defaults and tests run offline;
  - a text file, or a directory of text files (one document per file, packed one after the
    other; `segment_ids` mark the documents, so every mixer resets its state at a boundary,
    and positions restart at each document);
  - a token file: `.npy` (any integer dtype) or raw little-endian `data.token_dtype`
    (uint16/uint32) read through a memory map, for users with their own tokenizer;
  - a prepared TFDS text dataset, "tfds:<name>" ("tfds:tiny_shakespeare", "tfds:lm1b", any with
    a "text" feature; attnzoo.tasks.tfds_source): its "train" split for training, its
    "validation" split (else "test") for validation, each example a document;
    `data.max_documents` (0 = all) takes the first examples of each split.

Text is tokenized per character (`data.tokenizer="char"`, vocabulary = the sorted characters of
the training split) or per UTF-8 byte ("byte", 256 tokens). The stream is split as nanoGPT does:
the first `1 - data.val_fraction` for training, the rest for validation (TFDS: its own splits).

A training batch holds `batch_size` random windows of `seq_len + 1` tokens whose starts are a
pure function of (seed, step), so a killed run resumes bit-exactly. The validation set is fixed:
consecutive non-overlapping windows over the validation split (at most `data.eval_windows`).
Metrics: the mean next-token cross-entropy (`loss`, nats), bits per character / byte / token
(`loss / ln 2`) and perplexity. A label that would cross a document boundary is not scored.
"""

from __future__ import annotations

import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo.config import ConfigError
from attnzoo.tasks.base import Batch, Task, register_task
from attnzoo.tasks.tfds_source import is_tfds, tfds_first_split, tfds_split

SHAKESPEARE = pathlib.Path(__file__).resolve().parent.parent / "data" / "tinyshakespeare.txt"
TOKEN_DTYPES = ("uint16", "uint32")


class Vocabulary:
  """Characters or bytes <-> token ids. `chars` is None for the byte-level vocabulary."""

  def __init__(self, chars: str | None):
    self.chars = chars
    self.index = None if chars is None else {c: i for i, c in enumerate(chars)}

  @property
  def size(self) -> int:
    return 256 if self.chars is None else len(self.chars)

  @property
  def unit(self) -> str:
    return "byte" if self.chars is None else "char"

  def encode(self, text: str) -> np.ndarray:
    """Token ids of text; a character outside a character-level vocabulary is an error."""
    if self.chars is None:
      return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
    unknown = sorted(set(text) - set(self.index))
    if unknown:
      raise ConfigError(
        f"characters {''.join(unknown)!r} are not in the model's vocabulary of "
        f"{self.size} characters"
      )
    return np.fromiter((self.index[c] for c in text), np.int32, len(text))

  def decode(self, tokens) -> str:
    tokens = [int(t) for t in np.asarray(tokens).reshape(-1)]
    if self.chars is None:
      return bytes(tokens).decode("utf-8", errors="replace")
    return "".join(self.chars[t] for t in tokens)


def _read_text(path: pathlib.Path) -> str:
  try:
    return path.read_text(encoding="utf-8", errors="replace")
  except OSError as e:
    raise ConfigError(f"cannot read {str(path)!r}: {e.strerror}") from None


def text_documents(source: str) -> list[str]:
  """The documents of a text source: the shipped Shakespeare, a file, or every text file of a
  directory (recursively, sorted by path; hidden files and non-UTF-8-looking files skipped)."""
  if source == "shakespeare":
    return [_read_text(SHAKESPEARE)]
  path = pathlib.Path(source).expanduser()
  if not path.exists():
    raise ConfigError(f"data.source {source!r} does not exist")
  if path.is_file():
    text = _read_text(path)
    if not text:
      raise ConfigError(f"data.source {source!r} is empty")
    return [text]
  documents = []
  for file in sorted(p for p in path.rglob("*") if p.is_file()):
    if any(part.startswith(".") for part in file.relative_to(path).parts):
      continue
    if b"\0" in file.read_bytes()[:4096]:  # binary, not text
      continue
    text = _read_text(file)
    if text:
      documents.append(text)
  if not documents:
    raise ConfigError(f"data.source directory {source!r} holds no non-empty text files")
  return documents


def tfds_documents(source: str, data_dir: str, max_documents: int) -> tuple[list[str], int]:
  """(the texts of the training split then of the validation split, the number of training
  characters) of a TFDS text dataset."""
  if max_documents < 0:
    raise ConfigError(f"data.max_documents must be >= 0 (0: all), got {max_documents}")

  def texts(examples) -> list[str]:
    count = len(examples) if max_documents == 0 else min(max_documents, len(examples))
    out = [examples[i]["text"] for i in range(count)]
    return [t.decode("utf-8", "replace") if isinstance(t, bytes) else str(t) for t in out]

  train = texts(tfds_split(source, "train", data_dir))
  val = texts(tfds_first_split(source, ("validation", "test"), data_dir)[1])
  return train + val, sum(map(len, train))


def split_docs(documents: list[str], chars: int) -> int:
  """How many leading documents hold the first `chars` characters."""
  return int(np.searchsorted(np.cumsum([len(d) for d in documents]), chars, side="right"))


def token_file(source: str, dtype: str) -> np.ndarray:
  """A pre-tokenized stream: `.npy` (memory-mapped) or raw `dtype` tokens."""
  path = pathlib.Path(source).expanduser()
  if not path.is_file():
    raise ConfigError(f"data.source {source!r} does not exist")
  if path.suffix == ".npy":
    tokens = np.load(path, mmap_mode="r")
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
      raise ConfigError(
        f"{source!r} must hold a 1-D integer array, got {tokens.dtype}{tokens.shape}"
      )
  else:
    if dtype not in TOKEN_DTYPES:
      raise ConfigError(f"data.token_dtype must be one of {', '.join(TOKEN_DTYPES)}, got {dtype!r}")
    if path.stat().st_size % np.dtype(dtype).itemsize:
      raise ConfigError(f"the size of {source!r} is not a multiple of {dtype}")
    tokens = np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")
  if len(tokens) == 0:
    raise ConfigError(f"data.source {source!r} is empty")
  return tokens


def is_token_file(source: str) -> bool:
  return pathlib.Path(source).suffix in (".npy", ".bin")


def positions_in_documents(segment_ids: np.ndarray) -> np.ndarray:
  """[N, T] position of each token inside its document, restarting at every boundary."""
  n, t = segment_ids.shape
  index = np.broadcast_to(np.arange(t), (n, t))
  starts = np.concatenate([np.ones((n, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  last_start = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
  return (index - last_start).astype(np.int32)


@register_task("lm")
class LanguageModeling(Task):
  """Next-token prediction over random windows of a token stream (see the module docstring)."""

  model_kind = "causal_lm"
  metric_names = ("loss",)
  early_stop_metric = None

  def __init__(
    self,
    tokens: np.ndarray,
    *,
    vocab_size: int,
    seq_len: int,
    batch_size: int,
    seed: int,
    val_fraction: float = 0.1,
    eval_windows: int = 0,
    eval_batch_size: int = 64,
    documents: np.ndarray | None = None,
    vocabulary: Vocabulary | None = None,
    split: int | None = None,
  ):
    """tokens [N] (any integer array, memory-mapped is fine); documents [N] the document id
    of each token (None: one stream, no segment ids); vocabulary for text sources; split: the
    number of training tokens (None: the first 1 - val_fraction of them)."""
    for key, value in (("seq_len", seq_len), ("batch_size", batch_size)):
      if not (isinstance(value, int) and value >= 1):
        raise ConfigError(f"data.{key} must be a positive integer, got {value!r}")
    if not 0 < val_fraction < 1:
      raise ConfigError(f"data.val_fraction must be in (0, 1), got {val_fraction!r}")
    split = int(len(tokens) * (1 - val_fraction)) if split is None else split
    self.train_tokens, self.val_tokens = tokens[:split], tokens[split:]
    self.train_docs = None if documents is None else documents[:split]
    self.val_docs = None if documents is None else documents[split:]
    for name, part in (("training", self.train_tokens), ("validation", self.val_tokens)):
      if len(part) < seq_len + 1:
        raise ConfigError(
          f"the {name} split has {len(part)} tokens, fewer than data.seq_len + 1 = {seq_len + 1}"
        )
    self.vocab_size, self.seq_len, self.batch_size, self.seed = (
      vocab_size,
      seq_len,
      batch_size,
      seed,
    )
    self.eval_windows, self.eval_batch_size = eval_windows, eval_batch_size
    self.vocabulary = vocabulary
    self.unit = vocabulary.unit if vocabulary is not None else "token"

  @classmethod
  def from_config(cls, config) -> LanguageModeling:
    d = config.data
    common = dict(
      seq_len=d.seq_len,
      batch_size=d.batch_size,
      seed=config.seed,
      val_fraction=d.val_fraction,
      eval_windows=d.eval_windows,
      eval_batch_size=d.eval_batch_size,
    )
    if not d.source:
      raise ConfigError("data.source is empty; give 'shakespeare', a text file or a directory")
    if is_token_file(d.source):
      tokens = token_file(d.source, d.token_dtype)
      vocab_size = d.vocab_size or int(np.max(tokens)) + 1
      return cls(tokens, vocab_size=vocab_size, **common)
    split = None
    if is_tfds(d.source):
      documents, split = tfds_documents(d.source, d.tfds_data_dir, d.max_documents)
    else:
      documents = text_documents(d.source)
    if d.tokenizer == "byte":
      vocab = Vocabulary(None)
    elif d.tokenizer == "char":
      chars = int(sum(map(len, documents)) * (1 - d.val_fraction)) if split is None else split
      text = "".join(documents)[:chars]
      vocab = Vocabulary("".join(sorted(set(text))))
    else:
      raise ConfigError(f"data.tokenizer must be char or byte, got {d.tokenizer!r}")
    if d.tokenizer == "char":  # validation characters unseen in training: one unknown id
      text = "".join(documents)
      extra = sorted(set(text) - set(vocab.chars))
      if extra:
        vocab = Vocabulary(vocab.chars + "".join(extra))
    encoded = [vocab.encode(doc) for doc in documents]
    tokens = np.concatenate(encoded)
    ids = None
    if len(documents) > 1:
      ids = np.repeat(np.arange(len(encoded), dtype=np.int32), [len(e) for e in encoded])
    if d.vocab_size and d.vocab_size != vocab.size:
      raise ConfigError(f"data.vocab_size is {d.vocab_size} but the text has {vocab.size} tokens")
    if split is not None:  # characters -> tokens (bytes differ from characters)
      split = sum(len(e) for e in encoded[: split_docs(documents, split)])
    return cls(
      tokens, vocab_size=vocab.size, documents=ids, vocabulary=vocab, split=split, **common
    )

  @property
  def max_seq_len(self) -> int:
    return self.seq_len

  def _windows(self, tokens, docs, starts) -> Batch:
    index = np.asarray(starts)[:, None] + np.arange(self.seq_len + 1)
    window = np.asarray(tokens[index.reshape(-1)]).reshape(index.shape).astype(np.int32)
    batch = {"inputs": window[:, :-1], "labels": window[:, 1:]}
    if docs is None:
      batch["weights"] = np.ones(batch["inputs"].shape, np.float32)
    else:
      segments = np.asarray(docs[index.reshape(-1)]).reshape(index.shape).astype(np.int32)
      batch["segment_ids"] = segments[:, :-1]
      batch["positions"] = positions_in_documents(segments[:, :-1])
      batch["weights"] = (segments[:, 1:] == segments[:, :-1]).astype(np.float32)
    return batch

  def train_batch(self, step: int) -> Batch:
    rng = np.random.default_rng([self.seed, 3, step])
    starts = rng.integers(0, len(self.train_tokens) - self.seq_len, size=self.batch_size)
    return self._windows(self.train_tokens, self.train_docs, starts)

  def eval_sets(self) -> dict[str, list[Batch]]:
    count = (len(self.val_tokens) - 1) // self.seq_len
    if self.eval_windows:
      count = min(count, self.eval_windows)
    starts = np.arange(count) * self.seq_len
    size = self.eval_batch_size
    return {
      "val": [
        self._windows(self.val_tokens, self.val_docs, starts[i : i + size])
        for i in range(0, count, size)
      ]
    }

  def model_kwargs(self) -> dict:
    return {"vocab_size": self.vocab_size}

  def model_inputs(self, batch: Batch) -> dict:
    out = {"tokens": batch["inputs"]}
    if "segment_ids" in batch:
      out.update(segment_ids=batch["segment_ids"], positions=batch["positions"])
    return out

  @staticmethod
  def _token_losses(logits, batch):
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"])

  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    weights = batch["weights"]
    loss = (self._token_losses(outputs, batch) * weights).sum() / jnp.maximum(weights.sum(), 1)
    return loss, {f"bits_per_{self.unit}": loss / math.log(2)}

  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    weights = batch["weights"]
    per_token = self._token_losses(outputs, batch) * weights
    return {"loss": per_token.sum(-1) / jnp.maximum(weights.sum(-1), 1)}

  def summarize(self, means: dict[str, float]) -> dict[str, float]:
    return {
      f"bits_per_{self.unit}": means["loss"] / math.log(2),
      "perplexity": math.exp(min(means["loss"], 700.0)),
    }
