"""Tuning of the selective-scan kernels: the chunk, the channel block and the Triton launch
knobs (`Tuning`), the defaults (`default_tuning`) and their validation (`check`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Static knobs. `chunk`: time steps per unrolled loop iteration (the backward keeps the
  chunk's states in registers); `block_d`: channels per program (GPU; TPU takes 128 or all of
  D). `forward` / `backward`: Triton's (num_warps, num_stages) of the two kernels."""

  chunk: int = 16
  block_d: int = 32
  forward: tuple[int, int] = (2, 2)
  backward: tuple[int, int] = (4, 2)


def default_tuning(batch: int, d_inner: int) -> Tuning:
  """Fixed defaults (not yet swept on a GPU): 32 channels a program, halved down to 16 while
  the grid has under 256 programs (an H200 has 132 SMs)."""
  block = 32
  while block > 16 and batch * -(-d_inner // block) < 256:
    block //= 2
  return Tuning(block_d=block)


def check(tuning: Tuning) -> str | None:
  """Why `tuning` is invalid, or None."""
  if tuning.chunk < 8 or tuning.chunk % 8:
    return f"chunk must be a multiple of 8 (>= 8), got {tuning.chunk}"
  if tuning.block_d < 16 or tuning.block_d & (tuning.block_d - 1):
    return f"block_d must be a power of two >= 16, got {tuning.block_d}"
  return None
