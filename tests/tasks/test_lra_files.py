"""LRA's real-data loaders on tiny fixtures in the original formats (tests/fixtures/lra):
aclImdb text files, CIFAR-10 python pickles, AAN pair tsv files."""

import pickle

import numpy as np
import pytest

from attnzoo.cli import main
from attnzoo.tasks.lra import listops
from attnzoo.tasks.lra.common import read_split
from attnzoo.tasks.lra.files import BYTE0, CLS
from tests.conftest import REPO

FIXTURES = REPO / "tests/fixtures/lra"


def prepare(tmp_path, task, source, *extra):
  out = tmp_path / task.split("/")[1]
  argv = ["data", "prepare", task, "--out", str(out), "--quiet", f"--config.data.source={source}"]
  assert main([*argv, *extra]) == 0
  return {s: read_split(out, s, task) for s in ("train", "val", "test")}


def test_text_is_bytes_with_cls_and_the_test_set_validates(tmp_path):
  splits = prepare(tmp_path, "lra/text", FIXTURES / "aclImdb", "--config.data.max_length=24")
  inputs, labels = splits["train"]
  assert inputs.shape == (6, 24) and list(labels) == [0, 0, 0, 1, 1, 1]
  for row, name in ((0, "0_7"), (1, "1_8")):  # files sorted by name
    text = [b + BYTE0 for b in (FIXTURES / f"aclImdb/train/neg/{name}.txt").read_bytes()[:23]]
    assert list(inputs[row]) == [CLS, *text] + [0] * (23 - len(text))  # truncated or padded
  assert all(np.array_equal(a, b) for a, b in zip(splits["val"], splits["test"]))


def test_image_is_grayscale_pixels_with_lra_splits(tmp_path):
  splits = prepare(tmp_path, "lra/image", FIXTURES / "cifar-10-batches-py")
  assert [len(splits[s][0]) for s in ("train", "val", "test")] == [18, 2, 4]
  with open(FIXTURES / "cifar-10-batches-py/data_batch_1", "rb") as f:
    batch = pickle.load(f, encoding="bytes")
  r, g, b = batch[b"data"][0].reshape(3, 1024).astype(float)
  expected = np.round(0.2989 * r + 0.5870 * g + 0.1140 * b)
  assert np.array_equal(splits["train"][0][0], expected)
  assert splits["train"][1][0] == batch[b"labels"][0]


def test_retrieval_pairs_are_two_documents(tmp_path):
  splits = prepare(tmp_path, "lra/retrieval", FIXTURES / "tsv_data", "--config.data.max_length=16")
  inputs, labels = splits["val"]  # new_aan_pairs.eval.tsv
  assert inputs.shape == (4, 32) and list(labels) == [0, 1, 0, 1]
  assert inputs[0, 0] == CLS and inputs[0, 16] == CLS
  text2 = b"A paper on retrieval number 0."
  assert list(inputs[0, 17:32]) == [c + BYTE0 for c in text2[:15]]


def test_listops_reads_lra_released_split(tmp_path):
  source = FIXTURES / "listops-1000"
  splits = prepare(tmp_path, "lra/listops", source, "--config.data.max_length=16")
  tokens, labels = splits["test"]
  assert list(labels) == [9, 8, 3]  # basic_test.tsv
  max_op, close = listops.OP0 + listops.OPERATORS.index("MAX"), listops.CLOSE
  digit = listops.DIGIT0
  assert list(tokens[0]) == [listops.CLS, max_op, digit + 2, digit + 9, close] + [0] * 11


def test_text_and_image_from_tfds_mock_data(tmp_path):
  """imdb_reviews and cifar10 through tfds's own mock-data utility (TF-free data_source)."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=10):
    text = prepare(tmp_path, "lra/text", "tfds:imdb_reviews", "--config.data.max_length=16")
    reviews = tfds.data_source("imdb_reviews", split="train")
    image = prepare(tmp_path, "lra/image", "tfds:cifar10")
    pictures = tfds.data_source("cifar10", split="train")
    first_review, first_picture = reviews[0], pictures[0]
  inputs, labels = text["train"]
  review = [b + BYTE0 for b in first_review["text"].encode()[:15]]
  assert list(inputs[0]) == [CLS, *review] + [0] * (15 - len(review))
  assert labels[0] == first_review["label"] and inputs.shape == (10, 16)
  assert all(np.array_equal(a, b) for a, b in zip(text["val"], text["test"]))
  assert [len(image[s][0]) for s in ("train", "val", "test")] == [9, 1, 10]
  r, g, b = first_picture["image"].reshape(1024, 3).T.astype(float)
  assert np.array_equal(image["train"][0][0], np.round(0.2989 * r + 0.5870 * g + 0.1140 * b))
