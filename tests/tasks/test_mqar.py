import numpy as np
import pytest

from attnzoo.tasks.mqar import IGNORE, MQAR, Segment, generate, with_targets


@pytest.mark.parametrize("random_non_queries", [False, True])
def test_token_ranges_and_structure(random_non_queries):
  V, L, K, N = 8192, 128, 8, 500
  inputs, labels = generate(V, N, L, K, seed=3, random_non_queries=random_non_queries)
  assert inputs.shape == labels.shape == (N, L)
  keys, values = inputs[:, 0 : 2 * K : 2], inputs[:, 1 : 2 * K : 2]
  assert ((keys >= 1) & (keys < V // 2)).all()
  assert ((values >= V // 2) & (values < V)).all()
  for row in range(N):  # keys and values are distinct within an example
    assert len(set(keys[row])) == K and len(set(values[row])) == K
  # Labels: exactly K per example, each the value of the key that stands at that position.
  mask = labels != IGNORE
  assert (mask.sum(1) == K).all()
  assert not mask[:, : 2 * K].any()
  for row in range(N):
    lookup = dict(zip(keys[row], values[row]))
    for pos in np.flatnonzero(mask[row]):
      assert inputs[row, pos] in lookup
      assert labels[row, pos] == lookup[inputs[row, pos]]
  query_region = inputs[:, 2 * K :]
  if random_non_queries:
    assert (query_region != 0).mean() > 0.9
  else:  # filler is 0 everywhere except the K query keys
    assert ((query_region != 0).sum(1) == K).all()
  # queries sit at even offsets of the query region
  offsets = np.argwhere(mask[:, 2 * K :])[:, 1]
  assert (offsets % 2 == 0).all()


def test_query_placement_follows_power_law():
  """p(gap i) ∝ i^(a-1) with a = 0.01: small gaps are far more likely than large ones."""
  V, L, K, N = 8192, 256, 1, 20000
  _, labels = generate(V, N, L, K, seed=0, random_non_queries=False)
  gaps = (np.argmax(labels != IGNORE, axis=1) - 2 * K) // 2
  space = (L - 2 * K) // 2
  p = np.arange(1, space + 1) ** (0.01 - 1)
  p /= p.sum()
  counts = np.bincount(gaps, minlength=space)
  expected = N * p
  for i in (0, 1, 2, 10):  # the commonest slots, within 5 standard deviations
    assert abs(counts[i] - expected[i]) < 5 * np.sqrt(expected[i]), (i, counts[i], expected[i])
  assert counts[: space // 4].sum() > counts[space // 4 :].sum() * 0.9


def test_seeded():
  a = generate(8192, 100, 64, 4, seed=1)
  b = generate(8192, 100, 64, 4, seed=1)
  c = generate(8192, 100, 64, 4, seed=2)
  assert all((x == y).all() for x, y in zip(a, b))
  assert not (a[0] == c[0]).all()


def test_targets_match_labels():
  inputs, labels = generate(512, 50, 64, 6, seed=0)
  batch = with_targets(inputs, labels, 6)
  assert (np.take_along_axis(labels, batch["target_positions"], 1) == batch["targets"]).all()
  assert (batch["targets"] != IGNORE).all()


def test_batches_are_a_function_of_seed_and_step():
  segments = [Segment(32, 4, 96, 16), Segment(64, 8, 64, 16)]
  make = lambda: MQAR(vocab_size=256, train_segments=segments, test_segments=segments, seed=5)
  a, b = make(), make()
  assert a.steps_per_epoch == 6 + 4
  for step in (0, 3, 9, 10, 27):  # step 27 is in epoch 2
    x, y = a.train_batch(step), b.train_batch(step)
    assert (x["inputs"] == y["inputs"]).all() and (x["targets"] == y["targets"]).all()
  # each epoch visits every example of every segment once
  seen = [a.train_batch(s)["inputs"] for s in range(10, 20)]
  assert sum(len(x) for x in seen) == 96 + 64
  assert sorted(len(x[0]) for x in seen) == [32] * 6 + [64] * 4


def test_impossible_shapes_are_errors():
  with pytest.raises(ValueError, match="num_kv_pairs=20 does not fit seq_len=64"):
    generate(8192, 10, 64, 20, seed=0)
  with pytest.raises(ValueError, match="vocab_size"):
    generate(60, 10, 64, 4, seed=0)
