"""Tuning of the flash-attention kernels: tile sizes and launch parameters of the portable
(Triton / Mosaic TPU) kernels and of the Hopper forward in one `Tuning`, their defaults
(`default_tuning`) and validation."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Tile sizes (powers of two, >= 16; >= 128 on TPU) and Triton launch parameters, and the
  knobs of the Hopper (Mosaic GPU) forward (`hopper_*`).

  Forward: one program per (q tile of `block_q` rows, head, batch), looping over kv tiles of
  `block_k`. Backward: a dq kernel tiled like the forward (`block_q_dq` x `block_k_dq`) and a
  dk/dv kernel with one program per kv tile of `block_k_dkv`, looping over q tiles of
  `block_q_dkv` (and over the query heads of its kv-head group).

  Hopper forward (hopper.py): `hopper_block_q` query rows per consumer warpgroup (a CTA holds
  2 * hopper_block_q rows; a multiple of 64); `hopper_block_kv` keys per K/V tile (the N of
  QK^T, the K of PV; a multiple of 64, <= 256); `hopper_stages` K/V tiles in flight
  (shared-memory ring slots, >= 2); `hopper_pingpong` orders the two consumers' GEMMs against
  each other's softmax (FA3 section 3.1); `hopper_overlap` instead overlaps each consumer's
  softmax of one tile with its own QK^T of the next (FA3 section 3.2; one more float32 S tile
  live: 64 x 128 tiles take ~192 registers). Its defaults, 64 x 128 with 2 slots, take 160 KiB
  of shared memory at D=128 (the float32 O and S accumulators of 64 rows take 128 registers a
  thread); 3 slots (224 KiB) also fit.
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
  hopper_block_q: int = 64
  hopper_block_kv: int = 128
  hopper_stages: int = 2
  hopper_pingpong: bool = True
  hopper_overlap: bool = False

  def __post_init__(self):
    for f in dataclasses.fields(self):
      if f.name.startswith("block_"):
        b = getattr(self, f.name)
        if b < 16 or b & (b - 1):
          raise ValueError(f"Tuning.{f.name} must be a power of two >= 16, got {b}")
    if self.head_group < 1:
      raise ValueError(f"Tuning.head_group must be >= 1, got {self.head_group}")
    if self.hopper_block_q % 64 or self.hopper_block_q <= 0:
      raise ValueError(
        f"Tuning.hopper_block_q must be a positive multiple of 64, got {self.hopper_block_q}"
      )
    if self.hopper_block_kv % 64 or not 0 < self.hopper_block_kv <= 256:
      raise ValueError(
        f"Tuning.hopper_block_kv must be a multiple of 64 in [64, 256], got {self.hopper_block_kv}"
      )
    if self.hopper_overlap and self.hopper_pingpong:
      raise ValueError(
        "Tuning: hopper_overlap and hopper_pingpong are alternatives; set hopper_pingpong=False"
      )
    if self.hopper_stages < 2:
      raise ValueError(f"Tuning.hopper_stages must be >= 2, got {self.hopper_stages}")


# Mosaic TPU: 128-row tiles everywhere (multiples of the 128 lanes; not tuned on a TPU). The
# Triton launch fields and the Hopper knobs are unused there.
TPU_TUNING = Tuning(
  block_q=128, block_k=128, block_q_dq=128, block_k_dq=128, block_q_dkv=128, block_k_dkv=128
)


def default_tuning(
  head_dim: int, dtype_bytes: int, *, local: bool = False, causal: bool = True
) -> Tuning:
  """GPU defaults by head dim and dtype; larger rows take smaller tiles to fit shared memory
  (TPU: `TPU_TUNING`).

  `local`: a sliding window much shorter than the keys. Each query tile then visits few kv
  tiles, so per-program start-up and the partly visible edge tiles weigh more; bf16/f16 take
  smaller forward tiles (64-row query tiles waste ~6% of a 1024 window's pairs, 128-row ones
  ~12%; half the shared memory per program). The bf16/f16 head_dim<=128 entries are the ones
  to time on a GPU (`attnzoo bench attention --sweep` ranks the candidates); the others are
  chosen to fit the H100/H200 shared memory (227 KiB) and have not been tuned.
  The bf16 forward tiles are the H200 sweep's winners
  (experiments/results/kernels/attention_nvidia_h200_sweep.md): 128x64 w8 s3 causal,
  128x128 w8 s3 one head at a time without a causal mask, 128x64 w4 s2 for local windows.
  The Hopper forward takes 64 x 64 tiles at head_dim 256 (shared memory and registers).
  """
  hopper = dict(hopper_block_kv=64) if head_dim > 128 else {}
  if head_dim <= 128 and dtype_bytes <= 2:
    if local:
      return Tuning(block_q=128, block_k=64, num_warps=4, num_stages=2)
    if causal:
      return Tuning(block_k=64)
    return Tuning(head_group=1)
  if head_dim <= 64:  # float32
    return Tuning(block_q=64, block_k=64, num_warps=4, num_stages=2)
  if head_dim <= 128 or dtype_bytes <= 2:  # f32 head_dim 128, or bf16/f16 head_dim 256
    return Tuning(
      block_q=64,
      block_k=32,
      num_warps=4,
      num_stages=2,
      block_q_dq=64,
      block_k_dq=32,
      num_warps_dq=4,
      num_stages_dq=1,
      block_q_dkv=32,
      block_k_dkv=64,
      num_warps_dkv=4,
      num_stages_dkv=1,
      **hopper,
    )
  return Tuning(
    block_q=32,
    block_k=32,
    num_warps=4,
    num_stages=1,  # f32 head_dim 256
    block_q_dq=32,
    block_k_dq=32,
    num_warps_dq=4,
    num_stages_dq=1,
    block_q_dkv=32,
    block_k_dkv=32,
    num_warps_dkv=4,
    num_stages_dkv=1,
    **hopper,
  )
