"""Training end to end: files in the workdir, bit-exact kill-and-resume, NaN handling,
half-written checkpoints."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np
import pytest

from attnzoo.config import ConfigError
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.logging import read_metrics
from attnzoo.train.trainer import TrainingError, load_run, train
from tests.conftest import FAST_XLA_FLAGS, REPO, tiny_mqar_config

TINY_ARGS = [
  "--config",
  f"{REPO}/configs/mqar.py:mixer=attention,d_model=32,num_layers=2,"
  "seq_len=32,num_kv_pairs=4,train_examples=2048,batch_size=32,num_steps={steps}",
  "--config.data.vocab_size=256",
  "--config.data.test_segments=((32,4,64,32),)",
  "--config.train.log_every=5",
  "--config.train.eval_every=100",
  "--config.train.checkpoint_every=10",
  "--config.train.warmup_steps=5",
  "--config.train.early_stop_at=2.0",
  "--quiet",
]


def cli(workdir, steps):
  args = [a.replace("{steps}", str(steps)) for a in TINY_ARGS]
  return [sys.executable, "-m", "attnzoo", "train", "--workdir", str(workdir), *args]


def losses(workdir):
  return [(m["step"], m["train/loss"]) for m in read_metrics(workdir) if "train/loss" in m]


def final_params(workdir):
  return jax.tree.leaves(load_run(workdir)[2]["params"])


def test_train_writes_metrics_config_tensorboard_checkpoint(tmp_path):
  summary = train(tiny_mqar_config(), tmp_path, quiet=True)
  assert summary["step"] == 40 and summary["status"] in ("completed", "early_stopped")
  metrics = read_metrics(tmp_path)
  assert {"step", "train/loss", "throughput/tokens_per_s"} <= set(metrics[0])
  assert any("eval/accuracy/L32_kv4" in m for m in metrics)
  assert json.loads((tmp_path / "config.json").read_text())["model"]["mixer"] == "attention"
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  assert Checkpoints(tmp_path / "checkpoints", 2).latest_step() == 40
  # training again in a finished workdir returns its summary and trains nothing
  assert train(tiny_mqar_config(), tmp_path, quiet=True) == summary


def test_sigkill_and_resume_is_bit_exact_and_four_devices_match_one(tmp_path):
  """A run killed by SIGKILL and resumed equals an uninterrupted run bit for bit; the same
  config on 4 (fake CPU) devices, batch sharded over `data`, logs the same losses."""
  steps = 100
  reference, killed, four = tmp_path / "reference", tmp_path / "killed", tmp_path / "four"
  env = {**os.environ, "PYTHONUNBUFFERED": "1"}
  env4 = {**env, "XLA_FLAGS": f"--xla_force_host_platform_device_count=4 {FAST_XLA_FLAGS}"}
  logs = {n: (tmp_path / f"{n}.log").open("w") for n in ("reference", "four")}
  # the uninterrupted runs go on beside the killed and resumed ones
  uninterrupted = [
    subprocess.Popen(cli(d, steps), env=e, stdout=logs[n], stderr=logs[n])
    for n, d, e in (("reference", reference, env), ("four", four, env4))
  ]
  process = subprocess.Popen(
    cli(killed, steps), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
  )
  deadline = time.time() + 120
  while time.time() < deadline and not any(
    p.name.isdigit() and int(p.name) >= 30 for p in (killed / "checkpoints").glob("*")
  ):
    time.sleep(0.01)
  process.send_signal(signal.SIGKILL)
  process.wait()
  assert not (killed / "summary.json").exists(), "the run finished before it could be killed"
  subprocess.run(cli(killed, steps), check=True, env=env, capture_output=True)
  for name, run in zip(logs, uninterrupted):
    assert run.wait() == 0, (tmp_path / f"{name}.log").read_text()[-2000:]
  assert losses(killed) == losses(reference)
  assert len(losses(reference)) == steps // 5
  for a, b in zip(final_params(killed), final_params(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert [s for s, _ in losses(four)] == [s for s, _ in losses(reference)]
  np.testing.assert_allclose(
    [l for _, l in losses(four)], [l for _, l in losses(reference)], rtol=1e-4
  )


def test_half_written_checkpoint_is_never_restored(tmp_path):
  config = tiny_mqar_config(**{"train.num_steps": 20})
  train(config, tmp_path, quiet=True)
  checkpoints = tmp_path / "checkpoints"
  # what a crash during an orbax save leaves: a temporary directory, partly written
  partial = checkpoints / "30.orbax-checkpoint-tmp-1234567"
  shutil.copytree(checkpoints / "20", partial)
  for file in list(partial.rglob("*"))[::2]:
    if file.is_file():
      file.unlink()
  (tmp_path / "summary.json").unlink()
  config = tiny_mqar_config(**{"train.num_steps": 40})
  (tmp_path / "config.json").unlink()
  assert Checkpoints(checkpoints, 2).latest_step() == 20
  summary = train(config, tmp_path, quiet=True)
  assert summary["step"] == 40


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """From step 23 on the loss is NaN (injected): training stops with one clear error and the
  checkpoint of step 20 is kept, with finite parameters."""
  from attnzoo.tasks.mqar import MQAR

  clean_batch, clean_loss = MQAR.train_batch, MQAR.loss

  def poisoned_batch(self, step):
    batch = clean_batch(self, step)
    if step >= 23:
      batch["targets"] = -np.ones_like(batch["targets"])
    return batch

  def nan_on_poison(self, outputs, batch):
    loss, aux = clean_loss(self, outputs, batch)
    return loss + jax.numpy.where((batch["targets"] < 0).any(), jax.numpy.nan, 0.0), aux

  monkeypatch.setattr(MQAR, "train_batch", poisoned_batch)
  monkeypatch.setattr(MQAR, "loss", nan_on_poison)
  with pytest.raises(TrainingError, match="not finite.*between steps 21 and 25.*step 20"):
    train(tiny_mqar_config(), tmp_path, quiet=True)
  assert Checkpoints(tmp_path / "checkpoints", 2).latest_step() == 20
  state = load_run(tmp_path)[2]
  assert all(np.isfinite(np.asarray(p)).all() for p in jax.tree.leaves(state["params"]))


def test_workdir_with_another_config_is_refused(tmp_path):
  # a config that fails leaves nothing behind: the corrected one trains in the same workdir
  with pytest.raises(ConfigError, match="train.lr must be positive"):
    train(tiny_mqar_config(**{"train.num_steps": 10, "train.lr": -1.0}), tmp_path, quiet=True)
  assert not (tmp_path / "config.json").exists()
  train(tiny_mqar_config(**{"train.num_steps": 10}), tmp_path, quiet=True)
  with pytest.raises(ValueError, match="different config"):
    train(tiny_mqar_config(**{"train.num_steps": 10, "train.lr": 1e-4}), tmp_path, quiet=True)


def test_sown_losses_are_added_to_the_task_loss():
  """A mixer's auxiliary loss sown into "losses" (SSA's alignment on nsa) is added to the
  task's loss in training and logged as train/aux_loss; evaluation runs without it."""
  from attnzoo.train.trainer import Experiment

  config = tiny_mqar_config(**{"model.mixer": "nsa", "model.num_layers": 1})
  config.model.mixer_kwargs = ml_collections.ConfigDict(
    dict(num_heads=2, block_cmp=4, stride=2, block_slc=4, num_selected=2, window=4, ssa_alpha=10.0)
  )
  exp = Experiment(config)
  params = exp.init_state()["params"]
  batch = exp.task.train_batch(0)
  rng = jax.random.key(0)

  @jax.jit
  def run(params):
    loss, aux = exp._loss(params, batch, rng)
    return loss, aux, exp.task.loss(exp._outputs(params, batch, rng), batch)[0]

  loss, aux, task_loss = run(params)
  assert float(aux["aux_loss"]) > 0
  np.testing.assert_allclose(loss, task_loss + aux["aux_loss"], rtol=1e-6)
