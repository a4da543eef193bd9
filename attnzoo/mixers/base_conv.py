"""BaseConv (Arora et al. 2023, Zoology): a gated short convolution,

  y = conv(u) ⊙ Linear(u) + u          (use_act: silu(conv(u)) ⊙ silu(Linear(u)) + u)

with a causal depthwise conv of `kernel_size` taps (with bias) and a biased linear projection.
As in Zoology, the mixer adds its own input back (on top of the block's residual) and has no
output projection. kernel_size = -1 is Zoology's long convolution (`ImplicitLongConvolution`,
convolution.py): conv(u) = h * u + u with an implicit filter h [l_max, D] (layers.
ImplicitFilter: fixed positional features, a Sin MLP of width 16, exponential modulation), by
FFT. Zoology's list of per-layer kernel sizes (Figure 2: [3, -1]) is `layer_kernel_sizes`,
indexed by layer_idx (cycled); when empty, every layer uses kernel_size. Decoding
keeps the conv's last kernel_size - 1 inputs (short) or every past input (long, naive cache).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import ImplicitFilter, LongConvOp, ShortConv, state_bytes
from attnzoo.mixers.registry import dense_init, register


@register("base_conv")
class BaseConv(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  kernel_size: int = 3
  layer_kernel_sizes: tuple[int, ...] = ()
  use_act: bool = False
  l_max: int = 1024
  filter_order: int = 16
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _kernel_size(self) -> int:
    sizes = tuple(self.layer_kernel_sizes)
    k = sizes[self.layer_idx % len(sizes)] if sizes else self.kernel_size
    if k < 1 and k != -1:
      raise ValueError(f"base_conv: kernel_size must be >= 1 or -1 (long), got {k}")
    return k

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the conv buffer [K-1, D] (long: [seq_len, D])."""
    k = self._kernel_size()
    return state_bytes((seq_len if k == -1 else k - 1, self.d_model))

  def setup(self):
    k = self._kernel_size()
    if k == -1:
      self.filter = ImplicitFilter(
        self.d_model, self.l_max, order=self.filter_order, train_positions=False
      )
      self.long_conv = LongConvOp(self.implementation)
    else:
      self.conv = ShortConv(
        kernel_size=k, use_bias=True, dtype=self.dtype, implementation=self.implementation
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
    if self._kernel_size() == -1:
      if x.shape[1] > self.l_max:
        raise ValueError(f"base_conv: sequence length {x.shape[1]} exceeds l_max={self.l_max}")
      u_conv = self.long_conv(x, self.filter(), segment_ids=segment_ids, decode=decode) + x
    else:
      u_conv = self.conv(x, segment_ids=segment_ids, decode=decode)
    u_proj = self.projection(x)
    if self.use_act:
      u_conv, u_proj = nn.silu(u_conv), nn.silu(u_proj)
    return (u_conv * u_proj + x).astype(x.dtype)
