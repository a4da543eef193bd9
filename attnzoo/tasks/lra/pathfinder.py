"""Pathfinder (Linsley et al. 2018, "Learning long-range spatial dependencies with horizontal
gated-recurrent units") at LRA's resolutions: Pathfinder-32 and Path-X (128 x 128).

An image holds two target "snakes" of `contour_length` dashes ("paddles") whose first dashes
start `seed_distance` apart, plus distractor snakes of contour_length/3 dashes, and two round
markers. Label 1 (p = 1/2): the markers sit on the two ends of the same target snake; label 0:
on the start of one and the end of the other. Difficulty is the contour length: 6 (easy,
"curv_baseline"), 9 (intermediate), 14 (hard, the set LRA uses).

Growth follows drewlinsley/pathfinder `snakes2.py`: each next dash turns by an angle drawn from
candidates around the last end with weight cos(min(continuity * |turn|, pi/2))^2, among those
that keep `margin` clear of every dash already drawn (a snake that cannot grow is redrawn).
Deviations, by design: the geometry is a polyline (dash, gap of `margin`, dash) rather than the
upstream pivot construction; dashes and markers are rasterised analytically at
`antialias_scale` and box-filtered down (upstream: PIL lines, Lanczos); randomness is numpy's,
seeded per example, so any slice of a split is generated alone and in any process. The image
is min-max scaled to 0-255 as the old `scipy.misc` bytescale did, so the markers are visible
(the current upstream generator divides them by 255 and loses them).

Parameters per resolution are LRA's (`lra_benchmarks/data/pathfinder.py` docstrings); the
paddle length at 128 px is the upstream script's default (5), which LRA's note does not give.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from attnzoo.tasks.base import register_task
from attnzoo.tasks.lra.common import SPLITS, LRATask

DIFFICULTY = {"easy": 6, "intermediate": 9, "hard": 14}


@dataclasses.dataclass(frozen=True)
class Params:
  size: int
  contour_length: int
  padding: int
  margin: float
  paddle_length: float
  thickness: float
  marker_radius: float
  seed_distance: float
  continuity: float
  num_distractors: int
  antialias_scale: int = 4
  max_snake_trials: int = 20

  @property
  def distractor_length(self) -> int:
    return max(1, self.contour_length // 3)


def params_for(resolution: int, difficulty: str = "hard") -> Params:
  """LRA's generator settings for a 32 or 128 pixel image at a difficulty."""
  if difficulty not in DIFFICULTY:
    raise ValueError(f"unknown Pathfinder difficulty {difficulty!r}; use {', '.join(DIFFICULTY)}")
  length = DIFFICULTY[difficulty]
  if resolution == 32:
    return Params(32, length, 1, 1.0, 2.0, 0.5, 1.5, 7.0, 1.0, 5)
  if resolution == 128:
    return Params(128, length, 2, 2.0, 5.0, 1.5, 3.0, 20.0, 1.8, int(35 / (length / 3)))
  raise ValueError(f"Pathfinder resolution must be 32 or 128, got {resolution!r}")


def _distance(points: np.ndarray, segments: np.ndarray) -> np.ndarray:
  """[P, 2] points, [S, 2, 2] segments -> [P, S] Euclidean distances."""
  a, b = segments[:, 0], segments[:, 1]
  ab = b - a
  t = np.einsum("psk,sk->ps", points[:, None] - a[None], ab) / np.maximum((ab * ab).sum(-1), 1e-12)
  closest = a[None] + np.clip(t, 0, 1)[..., None] * ab[None]
  return np.linalg.norm(points[:, None] - closest, axis=-1)


@functools.lru_cache(maxsize=8)
def _tables(p: Params):
  """(directions [num, 2] (y, x), turn weights [previous, next], sample points of a dash from
  the origin [num, K, 2], the occupancy stamp of such a dash: cell offsets per direction)."""
  a = p.antialias_scale
  num = max(8, int(round(2 * math.pi * (p.paddle_length + p.margin))))
  angles = np.arange(num) * (2 * math.pi / num)
  directions = np.stack([np.sin(angles), np.cos(angles)], -1)
  turn = np.abs((angles[None] - angles[:, None] + math.pi) % (2 * math.pi) - math.pi)
  turn_weights = np.cos(np.minimum(turn * p.continuity, math.pi / 2)) ** 2
  along = np.linspace(0, p.paddle_length, max(3, int(p.paddle_length * 2) + 1))
  offsets = along[None, :, None] * directions[:, None]
  reach = int(math.ceil((p.paddle_length + p.margin + p.thickness) * a)) + 1
  cells = np.stack(np.meshgrid(*(np.arange(-reach, reach + 1),) * 2, indexing="ij"), -1)
  cells = cells.reshape(-1, 2)
  dashes = np.stack([np.zeros_like(directions), p.paddle_length * directions], 1)
  near = _distance(cells / a, dashes) <= p.margin + p.thickness  # [cells, num]
  return directions, turn_weights, offsets, [cells[near[:, k]] for k in range(num)]


class _Canvas:
  """What is drawn so far: the dashes (segments) and an occupancy raster at `antialias_scale`
  marking every point within margin + thickness of a dash, where new dashes may not go.

  Dash directions are discrete (about one per pixel of the circle a dash-plus-gap sweeps, as
  upstream samples one candidate per pixel of arc), so the turn weights, the sample points of a
  candidate dash and its occupancy stamp are tables computed once."""

  def __init__(self, p: Params, rng: np.random.Generator):
    self.p, self.rng = p, rng
    self.segments = np.zeros((0, 2, 2))
    self.occupied = np.zeros((p.size * p.antialias_scale,) * 2, bool)
    self.directions, self.turn_weights, self.offsets, self.stamps = _tables(p)

  def _stamp(self, occupied: np.ndarray, start: np.ndarray, k: int):
    cells = self.stamps[k] + (start * self.p.antialias_scale).astype(int)
    cells = np.clip(cells, 0, occupied.shape[0] - 1)
    occupied[cells[:, 0], cells[:, 1]] = True

  def free_point(self) -> np.ndarray:
    """A uniformly random point inside the padding and off the occupied raster."""
    a, n = self.p.antialias_scale, self.occupied.shape[0]
    lo, hi = self.p.padding * a, n - self.p.padding * a
    cells = np.argwhere(~self.occupied[lo:hi, lo:hi]) + lo
    if not len(cells):
      return np.full(2, self.p.size / 2)
    return (cells[self.rng.integers(len(cells))] + self.rng.random(2)) / a

  def grow(self, num_dashes: int, start: np.ndarray) -> np.ndarray | None:
    """A snake of num_dashes dashes from `start` in any first direction ([num_dashes, 2, 2]),
    or None when it cannot grow there without touching what is drawn; commits it if it grows."""
    p, rng, a = self.p, self.rng, self.p.antialias_scale
    occupied = self.occupied.copy()
    lo, hi, n = p.padding, p.size - p.padding, occupied.shape[0]
    dashes = []
    point, heading = np.asarray(start, float), None
    for _ in range(num_dashes):
      pts = point + self.offsets  # [num, K, 2]
      cells = np.clip((pts * a).astype(int), 0, n - 1)
      free = np.all((pts >= lo) & (pts <= hi), axis=(1, 2))
      free &= ~occupied[cells[..., 0], cells[..., 1]].any(-1)
      # the previous dash of this snake is its neighbour, not an obstacle: it is stamped only
      # once the next one is placed (as upstream)
      weights = free if heading is None else self.turn_weights[heading] * free
      total = weights.sum()
      if total < 1e-9:
        return None
      k = int(np.searchsorted(np.cumsum(weights), rng.random() * total, side="right"))
      k = min(k, len(weights) - 1)
      if dashes:
        self._stamp(occupied, dashes[-1][0], heading)
      heading = k
      end = point + p.paddle_length * self.directions[k]
      dashes.append(np.stack([point, end]))
      point = end + p.margin * self.directions[k]
    self._stamp(occupied, dashes[-1][0], heading)
    self.occupied = occupied
    self.segments = np.concatenate([self.segments, dashes])
    return np.asarray(dashes)


def _stamp(raster: np.ndarray, scale: int, lo: np.ndarray, hi: np.ndarray, inside) -> None:
  """raster |= inside(points) on the cells of the box lo..hi (pixel units, (y, x)); `inside`
  maps [h, w, 2] cell-centre coordinates to booleans or coverage."""
  n = raster.shape[0]
  ys = slice(max(0, int(lo[0] * scale)), min(n, int(math.ceil(hi[0] * scale)) + 1))
  xs = slice(max(0, int(lo[1] * scale)), min(n, int(math.ceil(hi[1] * scale)) + 1))
  if ys.start >= ys.stop or xs.start >= xs.stop:
    return
  coords = (np.arange(n) + 0.5) / scale
  grid = np.stack(np.meshgrid(coords[ys], coords[xs], indexing="ij"), -1)
  raster[ys, xs] = np.maximum(raster[ys, xs], inside(grid))


def _render(p: Params, segments: np.ndarray, markers: np.ndarray) -> np.ndarray:
  """Dashes of width `thickness` and discs of `marker_radius`, rasterised at antialias_scale,
  box-filtered to [size, size], then min-max scaled to uint8."""
  a = p.antialias_scale
  fine = np.zeros((p.size * a, p.size * a), np.float32)
  half, r = p.thickness / 2, p.marker_radius
  for seg in segments:
    _stamp(
      fine,
      a,
      seg.min(0) - half,
      seg.max(0) + half,
      lambda g, s=seg: _distance(g.reshape(-1, 2), s[None]).reshape(g.shape[:2]) <= half,
    )
  for m in markers:
    _stamp(fine, a, m - r, m + r, lambda g, m=m: np.linalg.norm(g - m, axis=-1) <= r)
  image = fine.reshape(p.size, a, p.size, a).mean((1, 3))
  lo, hi = image.min(), image.max()
  return np.round((image - lo) * (255 / max(hi - lo, 1e-12))).astype(np.uint8)


def sample(p: Params, seed, *, render: bool = True) -> dict:
  """One example from the seed: {"image" [size, size] uint8 (if render), "label",
  "targets" [2, contour_length, 2, 2] (dash endpoints, (y, x) pixels), "distractors" [...],
  "markers" [2, 2]}."""
  rng = np.random.default_rng(seed)
  label = int(rng.integers(2))
  snake1 = None
  while snake1 is None:
    canvas = _Canvas(p, rng)
    lo, hi = p.padding + p.seed_distance, p.size - p.padding - p.seed_distance
    first = rng.uniform(min(lo, hi), max(lo, hi), 2)
    snake0 = canvas.grow(p.contour_length, first)
    if snake0 is None:
      continue
    for _ in range(p.max_snake_trials):  # the second seed, seed_distance from the first
      turn = rng.uniform(0, 2 * math.pi)
      second = first + p.seed_distance * np.array([math.sin(turn), math.cos(turn)])
      snake1 = canvas.grow(p.contour_length, second)
      if snake1 is not None:
        break
  distractors = []
  for _ in range(p.num_distractors):
    for _ in range(p.max_snake_trials):
      snake = canvas.grow(p.distractor_length, canvas.free_point())
      if snake is not None:
        distractors.append(snake)
        break
  targets = np.stack([snake0, snake1])
  origin = int(rng.integers(2))
  end = origin if label == 1 else 1 - origin
  markers = np.stack([targets[origin, 0, 0], targets[end, -1, 1]])
  out = {
    "label": label,
    "targets": targets,
    "distractors": np.asarray(distractors).reshape(-1, p.distractor_length, 2, 2),
    "markers": markers,
  }
  if render:
    out["image"] = _render(p, canvas.segments, markers)
  return out


def generate(p: Params, num_examples: int, seed) -> tuple[np.ndarray, np.ndarray]:
  """(pixels [N, size * size] int32 in 0..255, labels [N] int32); example i from (*seed, i)."""
  seed = tuple(np.atleast_1d(seed).tolist())
  pixels = np.zeros((num_examples, p.size * p.size), np.int32)
  labels = np.zeros(num_examples, np.int32)
  for i in range(num_examples):
    example = sample(p, (*seed, i))
    pixels[i], labels[i] = example["image"].reshape(-1), example["label"]
  return pixels, labels


def make_shard(spec: dict, split: str, index: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Shard `index` of `split`: example j from the seed (spec seed, split, index, j)."""
  p = params_for(spec["resolution"], spec["difficulty"])
  return generate(p, count, (spec["seed"], SPLITS.index(split), index))


@register_task("lra/pathfinder")
class Pathfinder(LRATask):
  """LRA Pathfinder-32 (resolution 32) and Path-X (resolution 128): are the two markers joined
  by one path? Pixels are the tokens (vocab 256), no padding (LRA's `inputs > 0` mask, which
  hides the black background, is not reproduced); LRA pools by the mean."""

  pad_id = None
  vocab_size = 256
  num_classes = 2

  @staticmethod
  def data_spec(data) -> dict:
    params_for(data.resolution, data.difficulty)  # checks both
    return {
      "task": "lra/pathfinder",
      "seed": data.seed,
      "resolution": data.resolution,
      "difficulty": data.difficulty,
    }
