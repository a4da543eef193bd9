"""The language-modeling task: sources, windows, packed documents, training and resuming."""

import hashlib
import math

import jax
import numpy as np
import pytest

from attnzoo.cli import main
from attnzoo.config import load_config_file, set_typed
from attnzoo.models import build_model
from attnzoo.tasks import build_task
from attnzoo.tasks.lm import SHAKESPEARE, positions_in_documents
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.logging import read_metrics
from attnzoo.train.trainer import load_run, train
from tests.conftest import REPO, relative_error
from tests.mixers.test_mixers import TEST_KWARGS


def lm_config(knobs="", **overrides):
  spec = f"{REPO}/configs/lm.py:mixer=attention,d_model=32,num_layers=1,seq_len=32,batch_size=16"
  config = load_config_file(spec + (f",{knobs}" if knobs else ""))
  for key, value in overrides.items():
    set_typed(config, key, value)
  return config


def test_shakespeare_ships_with_the_package_and_splits_as_nanogpt():
  digest = hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest()
  assert digest.startswith("86c4e6aa")
  task = build_task(lm_config())
  assert task.vocab_size == 65 and len(task.train_tokens) == 1_003_854  # nanoGPT's numbers
  assert len(task.val_tokens) == 111_540
  batch = task.train_batch(5)
  assert set(batch) == {"inputs", "labels", "weights"}
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["labels"][:, :-1])
  assert task.vocabulary.decode(task.vocabulary.encode("ROMEO:")) == "ROMEO:"
  (val,) = task.eval_sets().values()
  assert sum(len(b["inputs"]) for b in val) == (111_540 - 1) // 32


def test_byte_level_and_token_files(tmp_path):
  text = "héllo wörld, " * 40
  (tmp_path / "t.txt").write_text(text)
  task = build_task(lm_config(f"source={tmp_path / 't.txt'},tokenizer=byte"))
  assert task.vocab_size == 256 and task.unit == "byte"
  assert len(task.train_tokens) + len(task.val_tokens) == len(text.encode())
  tokens = np.arange(1000, dtype=np.uint16) % 300
  tokens.tofile(tmp_path / "t.bin")
  np.save(tmp_path / "t.npy", tokens.astype(np.int64))
  for name in ("t.bin", "t.npy"):
    task = build_task(lm_config(f"source={tmp_path / name}"))
    assert task.vocab_size == 300 and task.unit == "token"
    batch = task.train_batch(0)
    np.testing.assert_array_equal((batch["labels"] - batch["inputs"]) % 300, 1)


def test_positions_restart_at_each_document():
  ids = np.array([[3, 3, 4, 4, 4, 5], [7, 7, 7, 7, 7, 7]])
  np.testing.assert_array_equal(
    positions_in_documents(ids), [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 4, 5]]
  )


def test_packed_documents_reset_recurrent_state(tmp_path):
  """A packed row through recurrent mixers equals each of its documents run alone."""
  rng = np.random.default_rng(0)
  for i in range(60):
    (tmp_path / f"doc{i:02d}.txt").write_text("".join(rng.choice(list("abcdefgh"), 5 + i % 9)))
  (tmp_path / ".hidden").write_text("zzz")
  task = build_task(lm_config(f"source={tmp_path}", **{"data.batch_size": 2}))
  assert "z" not in task.vocabulary.chars
  batch = task.train_batch(0)
  ids = batch["segment_ids"]
  assert (ids[:, 1:] != ids[:, :-1]).sum(1).min() >= 2  # every row holds 3+ documents
  # no label crosses a document boundary
  np.testing.assert_array_equal(batch["weights"][:, :-1], ids[:, 1:] == ids[:, :-1])
  mixers = ("gla", "mamba2", "gated_deltanet")
  model = build_model(
    "causal_lm",
    dict(
      mixer="+".join(mixers),
      mixer_kwargs={n: TEST_KWARGS[n] for n in mixers},
      d_model=16,
      num_layers=3,
    ),
    np.float32,
    vocab_size=task.vocab_size,
  )
  # each document alone, left-aligned in a row of its own (causal: the padding after it is
  # never seen), run in the same call as the packed rows
  docs = []
  for row in range(2):
    bounds = np.flatnonzero(np.diff(ids[row])) + 1
    docs += [(row, a, b) for a, b in zip([0, *bounds], [*bounds, ids.shape[1]])]
  alone = np.zeros((len(docs), ids.shape[1]), np.int32)
  for i, (row, a, b) in enumerate(docs):
    alone[i, : b - a] = batch["inputs"][row, a:b]
  inputs = task.model_inputs(batch)
  t = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), alone.shape)
  both = {
    "tokens": np.concatenate([inputs["tokens"], alone]),
    "segment_ids": np.concatenate([inputs["segment_ids"], np.zeros_like(alone)]),
    "positions": np.concatenate([inputs["positions"], t]),
  }
  params = model.init(jax.random.key(0), batch["inputs"][:1])
  out = np.asarray(jax.jit(model.apply)(params, **both))
  for i, (row, a, b) in enumerate(docs):
    assert relative_error(out[row, a:b], out[2 + i, : b - a]) < 1e-5


def test_train_lowers_the_loss_and_resumes_bit_exactly(tmp_path, capsys):
  """40 steps on a Shakespeare slice; then the last checkpoint is removed as if the run had been
  killed after step 20, and resuming gives the same parameters and logged losses; then
  `attnzoo generate` samples from it."""
  (tmp_path / "slice.txt").write_text(SHAKESPEARE.read_text()[:40_000])
  config = lm_config(
    f"source={tmp_path / 'slice.txt'},num_steps=40,lr=0.01,dropout=0.0",
    **{
      "data.eval_windows": 16,
      "data.eval_batch_size": 16,
      "train.warmup_steps": 5,
      "train.log_every": 10,
      "train.eval_every": 40,
      "train.checkpoint_every": 20,
    },
  )
  workdir = tmp_path / "run"
  summary = train(config, workdir, quiet=True)
  vocab = build_task(config).vocab_size
  assert summary["eval/loss"] < math.log(vocab) - 0.6  # chance: log(vocab)
  assert summary["eval/bits_per_char"] == pytest.approx(summary["eval/loss"] / math.log(2))
  assert summary["eval/perplexity"] == pytest.approx(math.exp(summary["eval/loss"]))
  params = jax.tree.leaves(load_run(workdir)[2]["params"])
  logged = read_metrics(workdir)
  # as if killed after the checkpoint of step 20: resume from it
  (workdir / "summary.json").unlink()
  Checkpoints(workdir / "checkpoints", 2).manager.delete(40)
  assert Checkpoints(workdir / "checkpoints", 2).latest_step() == 20
  resumed = train(config, workdir, quiet=True)
  losses = lambda metrics: [(m["step"], m.get("train/loss"), m.get("eval/loss")) for m in metrics]
  assert losses(read_metrics(workdir)) == losses(logged)
  assert resumed["eval/loss"] == summary["eval/loss"]
  for a, b in zip(jax.tree.leaves(load_run(workdir)[2]["params"]), params):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # the CLI samples from the run; its bad inputs are one error line
  argv = ["generate", "--workdir", str(workdir), "--max_new_tokens", "5", "--num_samples", "2"]
  assert main([*argv, "--prompt", "ROMEO:", "--seed", "1"]) == 0
  samples = capsys.readouterr().out.split("\n\n")
  assert [len(s) for s in samples[:2]] == [11, 11] and samples[0].startswith("ROMEO:")
  assert main([*argv, "--prompt", "ROMEO€"]) == 2
  assert capsys.readouterr().err.startswith("error: characters '€' are not in the model's vocab")


def test_empty_sources_are_one_error_line(tmp_path, capsys):
  (tmp_path / "empty.txt").write_text("")
  (tmp_path / "dir").mkdir()
  (tmp_path / "dir" / "blank.txt").write_text("")
  for source, message in (("empty.txt", "is empty"), ("dir", "holds no non-empty text files")):
    argv = ["train", "--config", f"{REPO}/configs/lm.py:source={tmp_path / source}"]
    assert main([*argv, "--workdir", str(tmp_path / f"w_{source}")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.source") and message in err[0]


def test_tfds_text_datasets_through_tfds_mock_data(tmp_path, capsys):
  """tfds's own mock-data utility stands in for a prepared dataset: lm1b has no validation
  split, so its test split validates; every example is a document."""
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=12):
    task = build_task(lm_config("source=tfds:lm1b,tokenizer=byte,seq_len=8"))
    train_texts = [e["text"] for e in tfds.data_source("lm1b", split="train")]
    test_texts = [e["text"] for e in tfds.data_source("lm1b", split="test")]
  assert task.vocab_size == 256
  as_bytes = lambda texts: np.frombuffer("".join(texts).encode(), np.uint8)
  np.testing.assert_array_equal(task.train_tokens, as_bytes(train_texts))
  np.testing.assert_array_equal(task.val_tokens, as_bytes(test_texts))
  assert task.train_docs is not None and len(np.unique(task.train_docs)) == 12
  assert task.train_batch(3)["segment_ids"].shape == (16, 8)
  with tfds.testing.mock_data(num_examples=1):  # char-level: one document per split
    task = build_task(lm_config("source=tfds:tiny_shakespeare,seq_len=4"))
    (train,) = [e["text"] for e in tfds.data_source("tiny_shakespeare", split="train")]
    (val,) = [e["text"] for e in tfds.data_source("tiny_shakespeare", split="validation")]
  assert task.vocabulary.decode(task.train_tokens) == train
  assert task.vocabulary.decode(task.val_tokens) == val
  argv = ["train", "--config", f"{REPO}/configs/lm.py:source=tfds:lm1b", "--workdir"]
  assert main([*argv, str(tmp_path / "w"), f"--config.data.tfds_data_dir={tmp_path}"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "tfds build lm1b --file_format=array_record" in err[-1]
