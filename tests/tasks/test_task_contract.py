"""The task contract, run over every registered task: batches depend only on (seed, step), eval
sets are fixed, the model head is one the models provide, the loss is finite and every declared
metric is reported per segment and pooled."""

import jax
import numpy as np
import pytest

from attnzoo.config import load_config_file, set_typed
from attnzoo.models import MODELS
from attnzoo.tasks import TASKS, build_task
from attnzoo.train.trainer import Experiment
from tests.conftest import REPO

# A small config of every registered task: (config spec, overrides). A new task adds a row.
SMALL = {
  "icl": (
    f"{REPO}/configs/icl/icl.py:dim=3,n_points=6,d_model=16,num_layers=1,batch_size=8",
    {"data.eval_examples": 16},
  ),
  "induction": (
    f"{REPO}/configs/icl/induction.py:d_model=16,num_layers=1,span=5,repeats=3,batch_size=8",
    {"data.vocab_size": 16, "data.eval_examples": 16},
  ),
  "mqar": (
    f"{REPO}/configs/mqar.py:mixer=attention,d_model=16,num_layers=1,seq_len=32,"
    "num_kv_pairs=4,train_examples=256,batch_size=32",
    {"data.vocab_size": 128, "data.test_segments": ((32, 4, 48, 32), (16, 2, 32, 32))},
  ),
  "lm": (
    f"{REPO}/configs/lm.py:mixer=attention,d_model=16,num_layers=1,seq_len=32,batch_size=8",
    {"data.eval_windows": 16, "data.eval_batch_size": 8},
  ),
  "lra/listops": (
    f"{REPO}/configs/lra/listops.py:d_model=16,num_layers=1,num_heads=2,batch_size=4,"
    "num_train=16,num_val=4,num_test=4,min_length=5,max_length=40",
    {},
  ),
  "lra/pathfinder": (
    f"{REPO}/configs/lra/pathfinder.py:d_model=16,num_layers=1,num_heads=2,batch_size=2,"
    "num_train=8,num_val=2,num_test=2,difficulty=easy",
    {},
  ),
  "lra/text": (
    f"{REPO}/configs/lra/text.py:d_model=16,num_layers=1,num_heads=2,batch_size=3,"
    f"max_length=48,source={REPO}/tests/fixtures/lra/aclImdb",
    {"data.eval_batch_size": 2},
  ),
  "lra/image": (
    f"{REPO}/configs/lra/image.py:d_model=16,num_layers=1,num_heads=2,batch_size=2,"
    f"source={REPO}/tests/fixtures/lra/cifar-10-batches-py",
    {"data.eval_batch_size": 2},
  ),
  "lra/retrieval": (
    f"{REPO}/configs/lra/retrieval.py:d_model=16,num_layers=1,num_heads=2,batch_size=2,"
    f"max_length=40,source={REPO}/tests/fixtures/lra/tsv_data",
    {"data.eval_batch_size": 2},
  ),
}


def small_config(name, seed=0):
  spec, overrides = SMALL[name]
  config = load_config_file(spec)
  for key, value in {**overrides, "seed": seed}.items():
    set_typed(config, key, value)
  return config


def same_batch(a, b):
  return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_every_registered_task_has_a_small_config():
  assert set(TASKS) == set(SMALL)


@pytest.mark.parametrize("name", sorted(TASKS))
def test_batches_depend_only_on_seed_and_step(name):
  a, b = build_task(small_config(name)), build_task(small_config(name))
  steps = [3, 0, 17, 3, 1]
  first = [a.train_batch(s) for s in steps]
  assert all(same_batch(x, b.train_batch(s)) for x, s in zip(first, steps))
  assert same_batch(first[0], first[3])  # the same step again, after others
  assert not same_batch(first[0], first[2])
  other = build_task(small_config(name, seed=1))
  assert not same_batch(first[0], other.train_batch(3))
  ea, eb = a.eval_sets(), b.eval_sets()
  assert ea.keys() == eb.keys()
  assert all(same_batch(x, y) for k in ea for x, y in zip(ea[k], eb[k], strict=True))


@pytest.mark.parametrize("name", sorted(TASKS))
def test_loss_is_finite_and_declared_metrics_are_reported(name):
  exp = Experiment(small_config(name))
  task = exp.task
  assert task.model_kind in MODELS and task.metric_names
  params = exp.init_state()["params"]
  batch = task.train_batch(0)
  loss, aux = exp._loss(params, batch)
  assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in aux.values())
  per_example = exp.eval_step(params, batch)
  assert set(per_example) == set(task.metric_names)
  for values in jax.device_get(per_example).values():
    assert np.shape(values) == (len(batch["inputs"]),) and np.isfinite(values).all()
  metrics = exp.evaluate(params)
  for metric in task.metric_names:
    assert f"eval/{metric}" in metrics
    assert all(f"eval/{metric}/{segment}" in metrics for segment in task.eval_sets())
  if task.early_stop_metric is not None:
    assert task.early_stop_metric in metrics
  assert task.max_seq_len >= max(b["inputs"].shape[1] for v in task.eval_sets().values() for b in v)
