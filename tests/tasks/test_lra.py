"""LRA generators (ListOps, Pathfinder / Path-X) tested for their statistics, and the shards
`attnzoo data prepare` writes."""

import json
import os

import numpy as np
import pytest

from attnzoo.cli import main
from attnzoo.config import load_config_file
from attnzoo.tasks import build_task
from attnzoo.tasks.lra import listops, pathfinder
from attnzoo.tasks.lra.common import read_split
from tests.conftest import REPO


def evaluate_listops(row):
  """An independent evaluator: a stack over the tokens. Returns (value, depth)."""
  stack, depth, value = [], 0, None
  for t in row:
    t = int(t)
    if t in (listops.PAD, listops.CLS):
      continue
    if listops.OP0 <= t < listops.OP0 + 4:
      stack.append((t - listops.OP0, []))
      depth = max(depth, len(stack))
    elif t == listops.CLOSE:
      op, args = stack.pop()
      result = [min(args), max(args), int(np.floor(np.median(args))), sum(args) % 10][op]
      (stack[-1][1] if stack else [None]).append(result)
      value = result if not stack else value
    else:
      digit = t - listops.DIGIT0
      if stack:
        stack[-1][1].append(digit)
      else:
        value = digit
  assert not stack
  return value, depth


def test_listops_matches_the_lra_distribution():
  tokens, labels = listops.generate(150, (0, 0, 0))
  lengths = (tokens > listops.PAD).sum(1) - 1  # without CLS
  assert np.all(tokens[:, 0] == listops.CLS)
  assert lengths.min() > 500 and lengths.max() < 2000 and 750 < np.median(lengths) < 1250
  for row, label in zip(tokens, labels):
    value, depth = evaluate_listops(row)
    assert value == label and 1 <= depth <= 9  # no operator at max_depth (10)
  # LRA's label skew: 0 and 9 are each about 17%, the others about 8%
  freq = np.bincount(labels, minlength=10) / len(labels)
  assert freq[0] + freq[9] > 0.25 and freq[1:9].max() < 0.15 and freq.min() > 0
  assert len({r.tobytes() for r in tokens}) == len(tokens)
  again, _ = listops.generate(150, (0, 0, 0))
  other, _ = listops.generate(150, (1, 0, 0))
  assert np.array_equal(tokens, again) and not np.array_equal(tokens, other)


def test_listops_depth_and_arguments_are_bounded():
  tokens, labels = listops.generate(60, 1, min_length=5, max_length=300, max_depth=3, max_args=3)
  for row, label in zip(tokens, labels):
    value, depth = evaluate_listops(row)
    assert value == label and depth <= 2  # operators sit at depths 1..max_depth-1
  text = listops.to_text(tokens[0])
  lra_tsv = "( " + text.replace("]", "X )")  # LRA's released notation
  assert np.array_equal(listops.from_text(lra_tsv, 300), tokens[0])


def _dash_gaps(snake):
  return np.linalg.norm(snake[1:, 0] - snake[:-1, 1], axis=-1)


@pytest.mark.parametrize("resolution,difficulty,count", [(32, "hard", 24), (128, "easy", 2)])
def test_pathfinder_labels_paths_and_visible_markers(resolution, difficulty, count):
  p = pathfinder.params_for(resolution, difficulty)
  labels = []
  for i in range(count):
    ex = pathfinder.sample(p, (3, i))
    targets, markers, image = ex["targets"], ex["markers"], ex["image"]
    labels.append(ex["label"])
    assert image.shape == (resolution, resolution) and image.dtype == np.uint8
    assert targets.shape == (2, pathfinder.DIFFICULTY[difficulty], 2, 2)
    # connected paths: each dash starts `margin` after the previous one ends
    for snake in (*targets, *ex["distractors"]):
      np.testing.assert_allclose(_dash_gaps(snake), p.margin, atol=1e-6)
    np.testing.assert_allclose(
      np.linalg.norm(targets[0, 0, 0] - targets[1, 0, 0]), p.seed_distance, atol=1e-6
    )
    # label 1: the markers are the two ends of one target; label 0: ends of different ones
    ends = [(0, 0, 0), (1, 0, 0)], [(0, -1, 1), (1, -1, 1)]
    first = [j for j, e in enumerate(ends[0]) if np.allclose(markers[0], targets[e])]
    last = [j for j, e in enumerate(ends[1]) if np.allclose(markers[1], targets[e])]
    assert len(first) == len(last) == 1 and (first[0] == last[0]) == (ex["label"] == 1)
    # markers are visible: discs of bright pixels (not only the dash under them)
    centres = np.stack(np.meshgrid(np.arange(resolution), np.arange(resolution), indexing="ij"), -1)
    for m in markers:
      disc = np.linalg.norm(centres + 0.5 - m, axis=-1) <= p.marker_radius
      assert disc.sum() >= 4 and image[disc].mean() >= 0.6 * 255, (i, image[disc])
    # every target dash is drawn
    mids = targets.mean(2).reshape(-1, 2).astype(int)
    assert np.all(image[mids[:, 0], mids[:, 1]] > 0)
  if count >= 20:
    assert 0.3 <= np.mean(labels) <= 0.7


def test_pathfinder_dashes_keep_clear_of_each_other():
  p = pathfinder.params_for(32)
  ex = pathfinder.sample(p, (5, 0), render=False)
  snakes = [*ex["targets"], *ex["distractors"]]
  dashes = np.concatenate(snakes)
  owner = np.concatenate([[i] * len(s) for i, s in enumerate(snakes)])
  index = np.concatenate([np.arange(len(s)) for s in snakes])
  points = (
    dashes[:, None, 0]
    + np.linspace(0, 1, 9)[None, :, None] * (dashes[:, 1] - dashes[:, 0])[:, None]
  )
  for a in range(len(dashes)):
    d = pathfinder._distance(points[a], dashes).min(0)
    neighbour = (owner == owner[a]) & (np.abs(index - index[a]) <= 1)
    # the occupancy raster is 1/antialias_scale pixel coarse
    assert d[~neighbour].min() > p.margin + p.thickness - 1.5 / p.antialias_scale


SMALL_LISTOPS = [
  "--config.data.num_train=6",
  "--config.data.num_val=3",
  "--config.data.num_test=2",
  "--config.data.shard_size=4",
  "--config.data.min_length=5",
  "--config.data.max_length=40",
]


def test_prepare_writes_whole_shards_once_and_training_reads_them(tmp_path, capsys):
  out = tmp_path / "listops"
  argv = ["data", "prepare", "lra/listops", "--out", str(out), "--quiet", *SMALL_LISTOPS]
  assert main(argv) == 0
  names = sorted(os.listdir(out))
  assert names == [
    "meta.json",
    "spec.json",
    "test-00000.npz",
    "train-00000.npz",
    "train-00001.npz",
    "val-00000.npz",
  ]
  assert json.loads((out / "meta.json").read_text())["examples"] == {
    "train": 6,
    "val": 3,
    "test": 2,
  }
  # idempotent: nothing is rewritten; a missing shard (a killed run) is made again, the same
  stamps = {n: os.stat(out / n).st_mtime_ns for n in names if n.endswith(".npz")}
  before = read_split(out, "train", "lra/listops")
  (out / "train-00001.npz").unlink()
  assert main(argv) == 0
  assert os.stat(out / "train-00000.npz").st_mtime_ns == stamps["train-00000.npz"]
  after = read_split(out, "train", "lra/listops")
  assert all(np.array_equal(a, b) for a, b in zip(before, after))
  assert not [n for n in os.listdir(out) if "tmp" in n]
  # other parameters into the same directory: one error line
  capsys.readouterr()
  assert main([*argv, "--config.data.seed=1"]) == 2
  assert capsys.readouterr().err.startswith("error: ")
  # a task reading the shards sees the data generated in memory from the same spec
  spec = f"{REPO}/configs/lra/listops.py:d_model=16,num_layers=1,num_heads=2,batch_size=2"
  config = load_config_file(spec)
  for item in SMALL_LISTOPS:
    key, value = item[len("--config.") :].split("=")
    config.data[key.split(".")[1]] = int(value)
  in_memory = build_task(config)
  config.data.dir = str(out)
  from_shards = build_task(config)
  for split in ("train", "val", "test"):
    for a, b in zip(in_memory.data[split], from_shards.data[split]):
      assert np.array_equal(a, b)
