"""Lightweight and dynamic convolutions (Wu et al. 2019, "Pay Less Attention with Lightweight
and Dynamic Convolutions"; defaults from the paper and fairseq's LightConv decoder), causal:

  h   = GLU(W_in x)                                 (Linear(d, 2d), then a GLU)
  lightweight_conv: W = softmax_K(w)   [H,K]       one kernel per head, shared by its d/H
                                                    channels (xavier-uniform w)
  dynamic_conv:     W_t = softmax_K(W_dyn h_t)     [H,K] predicted from the current step only
                                                    (Linear(d, H K), no bias, xavier-uniform)
  W   = DropConnect(W)                              (weight_dropout, only with a "dropout" rng)
  y_t[c] = sum_j W[h(c), j] h_{t-K+1+j}[c]          (h(c) = c // (d/H); zero before the start
                                                    and across packed segments)
  out = W_out y
on attnzoo.ops.short_conv (static [K,C] or per-position [B,T,K,C] weights). H = 16 heads;
kernel_size by layer as the paper's decoder (3, 7, 15, then 31) unless given. The projections
start N(0, 0.02) (W_out scaled by 1/sqrt(2 L)) like every projection here. Decoding keeps the
last K-1 inputs of the convolution (a window cache).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import DepthwiseConvOp, state_bytes
from attnzoo.mixers.registry import dense_init, output_init, per_head, register

F32 = jnp.float32
KERNEL_SIZES = (3, 7, 15, 31)  # the paper's decoder, by layer (31 from the fourth on)


def _xavier_uniform(fan_in: int, fan_out: int):
  bound = math.sqrt(6.0 / (fan_in + fan_out))
  return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


class _PayLessAttention(nn.Module):
  """The block both share; `_weights(h)` gives the softmax-normalised kernels [.., H, K]."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 16
  kernel_size: int | None = None
  weight_dropout: float = 0.1
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _kernel_size(self) -> int:
    k = self.kernel_size or KERNEL_SIZES[min(self.layer_idx, len(KERNEL_SIZES) - 1)]
    if k < 1:
      raise ValueError(f"{self.mixer_name}: kernel_size must be >= 1, got {k}")
    return k

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the last K-1 inputs of the convolution."""
    return state_bytes((self._kernel_size() - 1, self.d_model))

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    d = self.d_model
    per_head(d, self.num_heads)
    dense = lambda n, name: nn.Dense(n, dtype=self.dtype, kernel_init=dense_init, name=name)
    h = nn.glu(dense(2 * d, "in_proj")(x))
    logits = self._logits(h)  # [H,K] or [B,T,H,K]
    w = jax.nn.softmax(logits.astype(F32), axis=-1)
    w = nn.Dropout(self.weight_dropout)(w, deterministic=not self.has_rng("dropout"))
    w = jnp.swapaxes(jnp.repeat(w, d // self.num_heads, axis=-2), -1, -2)  # [..., K, C]
    y = DepthwiseConvOp(self.implementation, name="conv")(
      h, w.astype(self.dtype), segment_ids=segment_ids, decode=decode
    )
    out = nn.Dense(d, dtype=self.dtype, kernel_init=output_init(self.num_layers), name="out_proj")
    return out(y)


@register("lightweight_conv")
class LightweightConv(_PayLessAttention):
  def _logits(self, h: jax.Array) -> jax.Array:
    k = self._kernel_size()
    init = _xavier_uniform(k, self.num_heads * k)  # torch's fans of the (H, 1, K) weight
    return self.param("kernel", init, (self.num_heads, k), F32)


@register("dynamic_conv")
class DynamicConv(_PayLessAttention):
  def _logits(self, h: jax.Array) -> jax.Array:
    k = self._kernel_size()
    heads = self.num_heads
    linear = nn.Dense(
      heads * k,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=_xavier_uniform(self.d_model, heads * k),
      name="weight_linear",
    )
    return linear(h).reshape(h.shape[:2] + (heads, k))
