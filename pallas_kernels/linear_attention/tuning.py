"""Tuning of the linear-attention kernels: block sizes and launch knobs (`Tuning`), the fixed
defaults per decay kind and size (`default_tuning`, `default_splits`) and their validation."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Tuning knobs (static), GPU only except `chunk` and `sub`.
  `block_k`/`block_v`: the state tile of the sequential kernels (1, 3); `block_v_out`: the V
  tile of the output and dv kernels (2, 4) and of the dq/dk/dg kernel's loop over V (5);
  `block_k_grad`: the K tile of the dq/dk/dg kernel's grid without decay or with vector decay,
  whose key columns are independent there (None: all of K; scalar decay always takes all of
  K). Warps and pipeline stages: `state_*` for kernels 1 and 3 (`dstates_stages` for kernel 3
  if set), `num_*` for the others (None: default). `state_splits`: how many pieces of the
  sequence the sequential kernels walk in parallel (see `calls.sequential`; a power of two;
  None: `default_splits`). `sub`: query rows per intra-chunk sub-block for vector decay (see
  kernels.py); None: the whole chunk where that is exact, else 16."""

  chunk: int = 64
  sub: int | None = None
  block_k: int = 64
  block_v: int = 64
  block_v_out: int = 64
  block_k_grad: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  state_warps: int | None = None
  state_stages: int | None = None
  dstates_stages: int | None = None
  state_splits: int | None = None


def default_tuning(batch: int, heads: int, k_dim: int, v_dim: int, kind: str = "scalar") -> Tuning:
  """A fixed block configuration per decay kind ("none" | "scalar" | "vector") and size (no
  autotuning), from the H200 sweeps in experiments/results/kernels/linear_nvidia_h200.md.
  Scalar decay with few sequences (under 128 state tiles of 64x64, e.g. 1x16384x16: 64
  programs for 132 SMs) takes 32x32 state tiles; vector decay measured no gain from them."""
  if kind == "vector":
    return Tuning(block_v_out=128, block_k_grad=64, state_stages=3, dstates_stages=2)
  tuning = Tuning(block_v_out=128, num_stages=3, state_stages=3)
  if kind == "scalar" and batch * heads * -(-k_dim // 64) * -(-v_dim // 64) < 128:
    tuning = dataclasses.replace(tuning, block_k=32, block_v=32)
  return tuning


def default_splits(programs: int, chunks: int) -> int:
  """Pieces of the sequence for the sequential kernels when the tuning leaves it open: doubled
  while their grid has under 256 programs (an H200 has 132 SMs) and each piece keeps 8 or more
  chunks."""
  splits = 1
  while programs * splits < 256 and chunks % (2 * splits) == 0 and chunks // (2 * splits) >= 8:
    splits *= 2
  return splits


def check(tuning: Tuning) -> str | None:
  """Why `tuning` is invalid, or None."""
  if (tuning.sub or 16) > tuning.chunk:
    return f"sub ({tuning.sub or 16}) must not exceed chunk ({tuning.chunk})"
  for name in ("chunk", "sub", "block_k", "block_v", "block_v_out", "block_k_grad"):
    x = getattr(tuning, name) or 16
    if x < 16 or x & (x - 1):
      return f"{name} must be a power of two >= 16, got {x}"
  x = tuning.state_splits or 1
  if x < 1 or x & (x - 1):
    return f"state_splits must be a power of two, got {x}"
  return None
