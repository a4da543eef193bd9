"""BaseConv (Arora et al. 2023, Zoology): a gated short convolution,

  y = conv(u) ⊙ Linear(u) + u          (use_act: silu(conv(u)) ⊙ silu(Linear(u)) + u)

with a causal depthwise conv of `kernel_size` taps (with bias) and a biased linear projection.
As in Zoology, the mixer adds its own input back (on top of the block's residual) and has no
output projection. Only the short-conv form (kernel_size >= 1) is provided, not Zoology's FFT
long conv (kernel_size = -1). Decoding keeps the conv's last kernel_size - 1 inputs.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import ShortConv, state_bytes
from attnzoo.mixers.registry import dense_init, register


@register("base_conv")
class BaseConv(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  kernel_size: int = 3
  use_act: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the conv buffer [K-1, D]."""
    return state_bytes((self.kernel_size - 1, self.d_model))

  def setup(self):
    if self.kernel_size < 1:
      raise ValueError(
        f"base_conv: kernel_size must be >= 1 (the long conv, -1, is not "
        f"implemented), got {self.kernel_size}"
      )
    self.conv = ShortConv(
      kernel_size=self.kernel_size,
      use_bias=True,
      dtype=self.dtype,
      implementation=self.implementation,
    )
    self.projection = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=dense_init)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    u_conv = self.conv(x, segment_ids=segment_ids, decode=decode)
    u_proj = self.projection(x)
    if self.use_act:
      u_conv, u_proj = nn.silu(u_conv), nn.silu(u_proj)
    return (u_conv * u_proj + x).astype(x.dtype)
