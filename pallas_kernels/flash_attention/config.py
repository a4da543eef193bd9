"""Block sizes and launch parameters of the flash-attention kernels."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockSizes:
  """Tile sizes (powers of two, >= 16; >= 128 on TPU) and Triton launch parameters.

  Forward: one program per (q tile of `block_q` rows, head, batch), looping over kv tiles of
  `block_k`. Backward: a dq kernel tiled like the forward (`block_q_dq` x `block_k_dq`) and a
  dk/dv kernel with one program per kv tile of `block_k_dkv`, looping over q tiles of
  `block_q_dkv` (and over the query heads of its kv-head group).
  """
  # Defaults: the best of the candidates timed on one H200 (bf16, D=128, causal 4x4096;
  # experiments/results/kernels/attention_nvidia_h200.md).
  block_q: int = 128
  block_k: int = 128
  num_warps: int = 8
  num_stages: int = 3
  block_q_dq: int = 64
  block_k_dq: int = 64
  num_warps_dq: int = 4
  num_stages_dq: int = 2
  block_q_dkv: int = 64
  block_k_dkv: int = 64
  num_warps_dkv: int = 4
  num_stages_dkv: int = 2
  # Index fully visible tiles arithmetically (no schedule load in the loop) when the mask
  # guarantees they are one contiguous run (causal / window on default positions).
  direct_full: bool = True
  # Launch order: programs go out in groups of `head_group` heads (its gcd with the head
  # count); within a group the query tiles with the most kv tiles under a causal mask go first
  # for all of the group's heads, so the causal tail is short while few heads' K/V are live
  # in L2. 1 = one head at a time (heaviest tile first).
  head_group: int = 4

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.startswith("block_"):
        b = getattr(self, f.name)
        if b < 16 or b & (b - 1):
          raise ValueError(f"BlockSizes.{f.name} must be a power of two >= 16, got {b}")
    if self.head_group < 1:
      raise ValueError(f"BlockSizes.head_group must be >= 1, got {self.head_group}")


# Mosaic TPU: 128-row tiles everywhere (multiples of the 128 lanes; not tuned on a TPU). The
# Triton launch fields are unused there.
TPU_BLOCK_SIZES = BlockSizes(block_q=128, block_k=128, block_q_dq=128, block_k_dq=128,
                             block_q_dkv=128, block_k_dkv=128)


def default_block_sizes(head_dim: int, dtype_bytes: int, local: bool = False,
                        causal: bool = True) -> BlockSizes:
  """Defaults by head dim and dtype; larger rows take smaller tiles to fit shared memory.

  `local`: a sliding window much shorter than the keys. Each query tile then visits few kv
  tiles, so per-program start-up and the partly visible edge tiles weigh more; bf16/f16 take
  smaller forward tiles (64-row query tiles waste ~6% of a 1024 window's pairs, 128-row ones
  ~12%; half the shared memory per program). The bf16/f16 head_dim<=128 entries are the ones
  to time on a GPU (`attnzoo bench attention --sweep` ranks the candidates); the others are
  chosen to fit the H100/H200 shared memory (227 KiB) and have not been tuned.
  The bf16 forward tiles are the H200 sweep's winners
  (experiments/results/kernels/attention_nvidia_h200_sweep.md): 128x64 w8 s3 causal,
  128x128 w8 s3 one head at a time without a causal mask, 128x64 w4 s2 for local windows.
  """
  if head_dim <= 128 and dtype_bytes <= 2:
    if local:
      return BlockSizes(block_q=128, block_k=64, num_warps=4, num_stages=2)
    if causal:
      return BlockSizes(block_k=64)
    return BlockSizes(head_group=1)
  if head_dim <= 64:  # float32
    return BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=2)
  if head_dim <= 128 or dtype_bytes <= 2:  # f32 head_dim 128, or bf16/f16 head_dim 256
    return BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2,
                      block_q_dq=64, block_k_dq=32, num_warps_dq=4, num_stages_dq=1,
                      block_q_dkv=32, block_k_dkv=64, num_warps_dkv=4, num_stages_dkv=1)
  return BlockSizes(block_q=32, block_k=32, num_warps=4, num_stages=1,  # f32 head_dim 256
                    block_q_dq=32, block_k_dq=32, num_warps_dq=4, num_stages_dq=1,
                    block_q_dkv=32, block_k_dkv=32, num_warps_dkv=4, num_stages_dkv=1)
