"""Timing for the benchmark commands: warm up, then the median over timed batches."""

from __future__ import annotations

import json
import time

import jax
import numpy as np


def median_seconds(fn, *args, min_rep_s: float = 0.02, reps: int = 7) -> float:
  """Median seconds per call of fn(*args): two warm-up calls (compilation stays out), then
  `reps` batches of enough calls to last about min_rep_s each."""
  jax.block_until_ready(fn(*args))
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  one = max(time.perf_counter() - start, 1e-6)
  iters = max(1, min(200, int(min_rep_s / one)))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    for _ in range(iters):
      out = fn(*args)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / iters)
  return float(np.median(times))


def write_results(stem: str, payload: dict, markdown: str) -> None:
  """Writes stem.json (payload) and stem.md (markdown): called after every measurement, so a
  run cut short keeps what it measured."""
  with open(stem + ".json", "w") as f:
    json.dump(payload, f, indent=1)
  with open(stem + ".md", "w") as f:
    f.write(markdown)
