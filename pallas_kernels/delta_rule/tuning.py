"""Tuning of the delta-rule kernels: Triton launch knobs and blocks (`Tuning`) and the defaults
for a problem size (`default_tuning`)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch knobs: (num_warps, num_stages) per kernel; the V block of the two
  sequential kernels; the K block and inner V block of `grad_qk_kernel`. Blocks are clipped
  to the (padded) head dims. The knobs are the fastest in experiments/gpu/profile_delta_rule.py's
  sweep on one H200 (gated, bf16, H=16, K=V=128; experiments/results/kernels/
  linear_nvidia_h200.md). TPU ignores them (whole head-dim blocks, one chunk per grid step)."""

  wy: tuple[int, int] = (4, 3)
  state: tuple[int, int] = (4, 3)
  output: tuple[int, int] = (4, 3)
  wu: tuple[int, int] = (8, 2)
  dv_local: tuple[int, int] = (4, 2)
  dstate: tuple[int, int] = (4, 2)
  grad_qk: tuple[int, int] = (4, 2)
  grad_wy: tuple[int, int] = (4, 2)
  state_block_v: int = 64
  dstate_block_v: int = 64
  grad_block_k: int = 64
  grad_block_v: int = 64


def default_tuning(batch: int, heads: int, v_dim: int) -> Tuning:
  """The defaults for B x H sequences of (padded) value dim V: the V blocks of the two
  sequential kernels are the largest of 64, 32, 16 that give at least 128 (states), resp. 256
  (state gradients), programs, since B*H alone can leave most of the GPU idle."""

  def block_v(programs):
    block = 64
    while block > 16 and batch * heads * (v_dim // block) < programs:
      block //= 2
    return block

  return Tuning(state_block_v=block_v(128), dstate_block_v=block_v(256))
