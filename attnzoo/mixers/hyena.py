"""Hyena (Poli et al. 2023, "Hyena Hierarchy: Towards Larger Convolutional Language Models",
seed #87), order N, as safari's `HyenaOperator` and Zoology's `mixers/hyena.py` (order 2):

  x^0, ..., x^{N-1}, v = split(short_conv(W_in x))   (causal depthwise conv of 3 taps over all
                                                       (N+1) d channels)
  for i = N-1 .. 1:  v <- h_i * (v ⊙ x^i) + bias_i ⊙ (v ⊙ x^i)   (long causal FFT convolutions)
  y = W_out (v ⊙ x^0)

For order 2 this is Zoology's v <- h * (v ⊙ x1) + bias ⊙ (v ⊙ x1); y = W_out(v ⊙ x2) up to
the names of the gates. The filters h_i [l_max, d] are implicit (layers.ImplicitFilter:
positional features -> Sin MLP of width filter_order -> exponential modulation; trainable
positions), computed at l_max and sliced to T; biases randn(d). Zoology's defaults:
filter_order 64, emb_dim 3, w 1, short filter 3; set l_max to the task's sequence length (its
Figure 2 does). Per-parameter learning rates of the filter (safari's `_optim` hints) are not
applied (Zoology ignores them too).

Decoding keeps the short-conv buffer [2, (N+1) d] and, per long filter, every past input
[S, d] (the naive cache, O(S) per token); attnzoo.ops.conv_decode has FutureFill and the
distilled-SSM alternatives for generation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import ImplicitFilter, LongConvOp, ShortConv, state_bytes
from attnzoo.mixers.registry import dense_init, output_init, register

F32 = jnp.float32


@register("hyena")
class Hyena(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  l_max: int = 1024
  order: int = 2
  filter_order: int = 64
  emb_dim: int = 3
  w: float = 1.0
  short_filter_order: int = 3
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the short-conv buffer and seq_len past inputs per long filter."""
    return state_bytes(
      (self.short_filter_order - 1, (self.order + 1) * self.d_model),
      (self.order - 1, seq_len, self.d_model),
    )

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    if self.order < 2:
      raise ValueError(f"hyena: order must be >= 2, got {self.order}")
    if x.shape[1] > self.l_max:
      raise ValueError(f"hyena: sequence length {x.shape[1]} exceeds l_max={self.l_max}")
    d = self.d_model
    u = nn.Dense((self.order + 1) * d, dtype=self.dtype, kernel_init=dense_init, name="in_proj")(x)
    u = ShortConv(self.short_filter_order, use_bias=True, dtype=self.dtype, name="short_conv")(
      u, segment_ids=segment_ids, decode=decode
    )
    *gates, v = jnp.split(u, self.order + 1, axis=-1)
    for i in range(self.order - 1, 0, -1):
      h = ImplicitFilter(
        d, self.l_max, self.emb_dim, self.filter_order, w=self.w, name=f"filter_{i}"
      )()
      bias = self.param(f"filter_bias_{i}", nn.initializers.normal(1.0), (d,), F32)
      v = v * gates[i]
      conv = LongConvOp(self.implementation, name=f"long_conv_{i}")
      v = conv(v, h, segment_ids=segment_ids, decode=decode) + (bias * v).astype(v.dtype)
    y = (v * gates[0]).astype(self.dtype)
    return nn.Dense(d, dtype=self.dtype, kernel_init=output_init(self.num_layers), name="out_proj")(
      y
    )
