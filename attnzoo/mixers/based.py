"""Based (Arora et al. 2024, "Simple linear attention language models balance the
recall-throughput tradeoff"): Taylor linear attention on low-dimensional projected queries/keys.

  q, k = x W_q, x W_k  in R^{H x feature_dim}  (feature_dim 16 by default; 8/16/24 in the paper)
  phi(q).phi(k) = 1 + q.k / sqrt(d') + (q.k)^2 / (2 d')        (d' = feature_dim)
  o_i = sum_{j<=i} phi(q_i).phi(k_j) v_j / (sum_{j<=i} phi(q_i).phi(k_j) + eps)
  y = o W_o                                                     (v: d_model / H per head)

The Taylor map keeps the unique quadratic terms (1 + d' + d'(d'+1)/2 = 153 features at
d' = 16), so the decoding state is H x 153 x (d_model/H + 1) floats (the +1: the normaliser).

The published layer recipe is a hybrid: gated short convolutions (BaseConv, kernel 3), Based
linear attention, and sliding-window softmax attention, cycled over the layers:

  configs/mqar.py:mixer=base_conv+based            (Zoology/Based MQAR figures: [BaseConv, X])
  configs/mqar.py:mixer=base_conv+based+sliding_window,num_layers=3   (the LM recipe)

with per-mixer options keyed by name, e.g.
  --config.model.mixer_kwargs.based.feature_dim=16
  --config.model.mixer_kwargs.sliding_window.window=64
  --config.model.mixer_kwargs.base_conv.kernel_size=3
configs/sweeps/based.py builds these. (The 360M LM interleaves 1 Based : 1 sliding window :
3 BaseConv over 27 layers, i.e. mixer=based+sliding_window+base_conv+base_conv+base_conv.)
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  LinearAttentionOp,
  state_bytes,
  taylor_feature_map,
  taylor_feature_size,
)
from attnzoo.mixers.registry import dense_init, head_output, per_head, register


@register("based")
class Based(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  feature_dim: int = 16
  eps: float = 1e-12
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _head_dim(self):
    return per_head(self.d_model, self.num_heads)

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the state [H, F, V+1] with its normaliser column."""
    return state_bytes(
      (self.num_heads, taylor_feature_size(self.feature_dim), self._head_dim() + 1)
    )

  def setup(self):
    heads, head_dim = self.num_heads, self._head_dim()
    dense = lambda n: nn.DenseGeneral(
      (heads, n), use_bias=False, dtype=self.dtype, kernel_init=dense_init
    )
    self.q, self.k = dense(self.feature_dim), dense(self.feature_dim)
    self.v = dense(head_dim)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(
      causal=self.causal,
      scale=1.0,
      normalize=True,
      eps=self.eps,
      implementation=self.implementation,
    )

  def _features(self, x):
    return taylor_feature_map(self.q(x)), taylor_feature_map(self.k(x))

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k = self._features(x)
    return self.out(self.attn(q, k, self.v(x), segment_ids=segment_ids, decode=decode))

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: the normalised Taylor-kernel weights (rows sum to 1)."""
    q, k = self._features(x)
    return self.attn.attention_matrix(q, k, segment_ids=segment_ids)
