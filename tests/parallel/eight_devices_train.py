"""The trainer on 8 forced CPU devices: run by tests/parallel/test_parallel.py in a subprocess
with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax starts). One tiny MQAR
model (1 attention layer, d=16, T=32, batch 8) trained for 2 steps on one device and on a
(2 data, 2 fsdp, 2 context) mesh; the tests share the runs."""

import jax
import numpy as np
import pytest

from attnzoo.config import load_config_file, set_typed
from attnzoo.mixers.registry import causal_mixers
from attnzoo.train.checkpoint import Checkpoints
from attnzoo.train.trainer import Experiment
from tests.conftest import REPO, slow

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (forced) devices")


def config(mixer="attention", **settings):
  c = load_config_file(
    f"{REPO}/configs/mqar.py:mixer={mixer},d_model=16,num_layers=1,seq_len=32,"
    "num_kv_pairs=4,train_examples=64,batch_size=8,num_steps=2"
  )
  set_typed(c, "data.vocab_size", 64)
  set_typed(c, "train.warmup_steps", 0)
  for key, value in settings.items():
    set_typed(c, key, value)
  return c


def run(exp, steps=2):
  state, losses = exp.init_state(), []
  for step in range(steps):
    state, metrics = exp.train_step(state, exp.shardable(exp.task.train_batch(step)))
    losses.append(float(metrics["train/loss"]))
  return state, losses


MESH = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.context": 2}


@pytest.fixture(scope="module")
def runs():
  """One device, plain; 8 devices on (2 data, 2 fsdp, 2 context) with 2 micro-batches."""
  one = Experiment(config(), devices=jax.devices()[:1])
  eight = Experiment(config(**MESH, **{"train.grad_accum": 2}))
  return {"one": (one, *run(one)), "eight": (eight, *run(eight))}


def test_two_steps_on_data_fsdp_context_mesh_match_one_device(runs):
  """Batch over data x fsdp, tokens over context (ring attention, zig-zag), parameters and
  Adam moments over fsdp, 2 accumulated micro-batches (MQAR's loss is a mean over query
  positions and every example has as many, so this is the whole batch's step): the losses
  and parameters of 2 steps equal one device's."""
  exp, state8, losses8 = runs["eight"]
  _, state1, losses1 = runs["one"]
  assert exp.plan is not None and exp.plan.batch_axes == ("data", "fsdp")
  assert tuple(exp.state_shardings["params"]["embed"]["embedding"].spec) == (None, "fsdp")
  batch = exp.shardable(exp.task.train_batch(0))
  assert tuple(batch["inputs"].sharding.spec) == (("data", "fsdp"), "context")
  np.testing.assert_allclose(losses8, losses1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(state8["params"]), jax.tree.leaves(state1["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_parameter_memory_per_device_scales_with_fsdp(runs):
  """Compiled train step: per-device argument bytes (parameters, Adam moments, the batch) on
  2-way FSDP are at most 1/2 of one device's plus what stays replicated (norms, biases)."""
  (one, state1, _), (eight, state8, _) = runs["one"], runs["eight"]

  def argument_bytes(exp, state):
    batch = exp.shardable(exp.task.train_batch(0))
    return exp.train_step.lower(state, batch).compile().memory_analysis().argument_size_in_bytes

  replicated = sum(
    leaf.size * leaf.dtype.itemsize
    for leaf, s in zip(jax.tree.leaves(state1), jax.tree.leaves(eight.state_shardings))
    if s.is_fully_replicated
  )
  total = argument_bytes(one, state1)
  assert argument_bytes(eight, state8) <= total / 2 + replicated
  assert replicated < total / 4  # most bytes are sharded


def test_checkpoint_saved_on_one_mesh_restores_on_another(runs, tmp_path):
  """Saved from the (2 data, 2 fsdp, 2 context) mesh, restored onto (2 data, 4 tensor): the
  same values, laid out by the new mesh."""
  _, state, _ = runs["eight"]
  checkpoints = Checkpoints(tmp_path, 2)
  checkpoints.save(2, state)
  checkpoints.close()
  loader = Experiment(config(**{"mesh.data": 2, "mesh.tensor": 4}))
  checkpoints = Checkpoints(tmp_path, 2)
  restored = checkpoints.restore(loader.init_state())
  checkpoints.close()
  shardings = jax.tree.leaves(loader.state_shardings)
  assert any("tensor" in str(s.spec) for s in shardings)
  for a, b, s in zip(jax.tree.leaves(restored), jax.tree.leaves(state), shardings):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert a.sharding == s


# mixers whose attention takes explicit positions, an additive bias or queries other than the
# keys (HAT's segment tokens, LTE's retention gate, NSA's branches, RAN's cells): the sequence-
# parallel softmax attention does not serve those and says so in one line
NOT_SERVED = ("hat", "lte", "nsa", "ran")


@slow
@pytest.mark.parametrize("mixer", causal_mixers())
def test_every_mixer_trains_on_context_shards_as_on_one_device(mixer):
  """Each causal mixer, 2 steps on (2 data, 4 context): its ops run their sequence-parallel
  forms (the rest of the mixer is partitioned by XLA) and the losses equal one device's."""
  if mixer in NOT_SERVED:
    with pytest.raises(ValueError, match="under context parallelism does not take"):
      run(Experiment(config(mixer, **{"mesh.data": 2, "mesh.context": 4})))
    return
  wide = {"model.d_model": 32} if mixer == "mamba2" else {}  # its 64-wide heads
  _, one = run(Experiment(config(mixer, **wide), devices=jax.devices()[:1]))
  _, eight = run(Experiment(config(mixer, **wide, **{"mesh.data": 2, "mesh.context": 4})))
  np.testing.assert_allclose(eight, one, rtol=1e-5)
