"""Packed sweeps: runs vmapped in one program equal the same runs trained one by one."""

import jax
import numpy as np
import pytest

from attnzoo.config import ConfigError
from attnzoo.train.logging import read_metrics
from attnzoo.train.packed import packable, train_packed
from attnzoo.train.trainer import Experiment, load_run, train
from tests.conftest import relative_error, tiny_mqar_config


def run_config(lr, seed):
  return tiny_mqar_config(
    **{
      "train.lr": lr,
      "seed": seed,
      "model.d_model": 16,
      "model.num_layers": 1,
      "model.max_positions": 16,
      "model.embedding_dropout": 0.1,  # per-run dropout masks
      "model.mixer_kwargs.attention_dropout": 0.1,
      "data.vocab_size": 64,
      "data.train_segments": ((16, 2, 512, 16),),
      "data.test_segments": ((16, 2, 64, 64),),
      "train.num_steps": 20,
      "train.eval_every": 10,
      "train.checkpoint_every": 10,
      "train.warmup_steps": 0,
      "train.early_stop_at": 0.02,  # the lr 1e-2 run passes it by step 10, the other does not
    }
  )


def test_packed_equals_one_by_one_with_per_run_early_stop(tmp_path):
  grid = [(1e-3, 0), (1e-2, 1)]
  configs = [run_config(lr, seed) for lr, seed in grid]
  assert packable(configs) and not packable([configs[0], tiny_mqar_config()])
  alone = [train(c, tmp_path / f"alone{i}", quiet=True) for i, c in enumerate(configs)]
  # max_chunk=5: the 5 steps between two logs run as one scan.
  packed = train_packed(configs, [tmp_path / f"packed{i}" for i in range(2)], max_chunk=5)
  assert [s["status"] for s in packed] == [s["status"] for s in alone]
  assert [s["step"] for s in packed] == [20, 10]  # the second run stopped and froze
  for i, (a, p) in enumerate(zip(alone, packed)):
    assert p["eval/accuracy"] == a["eval/accuracy"]
    logged = lambda name: [
      (m["step"], m["train/loss"])
      for m in read_metrics(tmp_path / f"{name}{i}")
      if "train/loss" in m
    ]
    steps, want = zip(*logged("alone"))
    assert [s for s, _ in logged("packed")] == list(steps)
    np.testing.assert_allclose([v for _, v in logged("packed")], want, rtol=1e-5)
    want, got = (
      jax.tree_util.tree_leaves_with_path(load_run(tmp_path / f"{n}{i}")[2]["params"])
      for n in ("alone", "packed")
    )
    # All parameters as one vector: attention's key bias has a zero gradient (softmax ignores
    # a shift shared by all keys), so it holds only float noise, different in each program.
    flat = lambda leaves: np.concatenate([np.ravel(x) for _, x in leaves])
    assert relative_error(flat(got), flat(want)) < 1e-5
  # A pack killed after its step-10 checkpoint resumes there and ends as the whole one did.
  calls = []

  def evaluate_then_die(self, params):
    calls.append(1)
    if len(calls) == 3:  # the step-20 evaluation
      raise KeyboardInterrupt
    return real_evaluate(self, params)

  real_evaluate = Experiment.evaluate
  resumed = [tmp_path / f"resumed{i}" for i in range(2)]
  with pytest.MonkeyPatch.context() as m:
    m.setattr(Experiment, "evaluate", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
      train_packed(configs, resumed, max_chunk=5)
  again = train_packed(configs, resumed, max_chunk=5)
  drop = ("wall_time_s",)
  assert [{k: v for k, v in s.items() if k not in drop} for s in again] == [
    {k: v for k, v in s.items() if k not in drop} for s in packed
  ]
  assert logged_losses(resumed[0]) == logged_losses(tmp_path / "packed0")
  assert not list(tmp_path.glob(".pack_*"))  # removed once the pack is done
  # A finished pack is not re-run; mixing model shapes is refused.
  assert train_packed(configs, [tmp_path / f"packed{i}" for i in range(2)]) == packed
  with pytest.raises(ConfigError, match="differ only in train.lr and seed"):
    train_packed([configs[0], tiny_mqar_config()], [tmp_path / "x", tmp_path / "y"])


def logged_losses(workdir):
  return [(m["step"], m["train/loss"]) for m in read_metrics(workdir) if "train/loss" in m]
