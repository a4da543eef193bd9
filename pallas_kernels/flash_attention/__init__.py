"""Flash attention in Pallas (portable subset: Triton on GPU, Mosaic on TPU, interpret on CPU).

Pure JAX + Pallas: no Flax, no attnzoo imports. The op-level contract (mask semantics, the
float32 reference) lives in attnzoo.ops.softmax_attention, which dispatches here.
"""
from pallas_kernels.flash_attention.attention import (flash_attention, hopper_reason,
                                                       unsupported_reason)
from pallas_kernels.flash_attention.config import BlockSizes, default_block_sizes
from pallas_kernels.flash_attention.hopper import HopperConfig
from pallas_kernels.flash_attention.schedule import EMPTY

__all__ = ["flash_attention", "unsupported_reason", "hopper_reason", "BlockSizes",
           "default_block_sizes", "HopperConfig", "EMPTY"]
