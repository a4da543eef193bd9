"""Tuning of the NSA selected-attention kernels: Triton launch knobs and the query tile of the
dk/dv kernel (`Tuning`), and `default_tuning`."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """`fwd`, `dq`, `dkv`: Triton (num_warps, num_stages) of each kernel. `block_q_dkv`: query
  tokens per step of the dk/dv kernel (a power of two); each step takes their rows of all the
  group's query heads, block_q_dkv * padded group size rows, and masks the tokens that did not
  select the program's block. `dkv_splits`: programs per key block, each taking an equal share
  of its query tiles and writing a float32 partial dk/dv (summed after): the initial block is
  selected by every token, so one program per block would leave it a long serial tail.
  `scores`, `block_q_scores`: launch knobs and query tokens per program of the selection-scores
  kernel (>= 16 on GPU). Not tuned on a GPU yet: chosen for 16 heads per group, head dim 128,
  blocks of 64 keys (the paper's configuration)."""

  fwd: tuple[int, int] = (4, 2)
  dq: tuple[int, int] = (4, 2)
  dkv: tuple[int, int] = (8, 2)
  block_q_dkv: int = 8
  dkv_splits: int = 8
  scores: tuple[int, int] = (8, 2)
  block_q_scores: int = 16

  def __post_init__(self):
    b = self.block_q_dkv
    if b < 1 or b & (b - 1):
      raise ValueError(f"Tuning.block_q_dkv must be a power of two, got {b}")
    if self.dkv_splits < 1:
      raise ValueError(f"Tuning.dkv_splits must be >= 1, got {self.dkv_splits}")


def default_tuning() -> Tuning:
  return Tuning()
