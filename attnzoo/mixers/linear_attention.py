"""Kernelised linear attention (Katharopoulos et al. 2020) with a choice of feature maps, and
plain linear self-attention (LSA) of in-context-learning theory.

  o_i = sum_{j<=i} phi(q_i).phi(k_j) v_j  [ / sum_{j<=i} phi(q_i).phi(k_j) ]   (normalize)

feature_map (on the projected queries/keys of `feature_dim` channels per head):
  identity  phi(x) = x
  elu       phi(x) = elu(x) + 1                              (Katharopoulos et al.)
  relu      phi(x) = max(x, 0)
  performer phi(x) = exp(w^T x' - |x'|^2/2) / sqrt(m), x' = x / d^(1/4), w orthogonal random
            features (Choromanski et al. 2021), `num_features` of them, drawn from the fixed
            seed `performer_seed + layer_idx` (a constant, not a parameter): an unbiased
            estimate of the softmax kernel exp(q.k / sqrt(d))
  cosformer phi(x_i) = [relu(x_i) cos(pi i / 2M), relu(x_i) sin(pi i / 2M)] so that
            phi(q_i).phi(k_j) = relu(q_i).relu(k_j) cos(pi (i - j) / 2M) (Qin et al. 2022),
            M = `cosformer_horizon` (fixed, so that decoding equals the full forward)
  taylor    Based's 1 + x + x^2/2 map: phi(q).phi(k) = 1 + q.k/sqrt(d) + (q.k)^2/(2d)

`scale` multiplies the scores (None: 1 with the normaliser, where it cancels, else
feature_dim^-1/2). Decoding keeps the state [H, F, head_dim (+1 with the normaliser)].
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  FEATURE_MAPS,
  LinearAttentionOp,
  default_positions,
  feature_map,
  feature_size,
  performer_projection,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, head_output, per_head, register


@register("linear_attention")
class LinearAttention(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  feature_dim: int | None = None  # q/k channels per head (default d_model // num_heads)
  feature_map: str = "elu"
  normalize: bool = True
  scale: float | None = None
  eps: float = 1e-6
  num_features: int | None = None  # performer: random features (default 2 * feature_dim)
  performer_seed: int = 0
  cosformer_horizon: int = 1024
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _dims(self):
    head_dim = per_head(self.d_model, self.num_heads)
    if self.feature_map not in FEATURE_MAPS:
      raise ValueError(
        f"unknown feature_map {self.feature_map!r}; use one of {', '.join(FEATURE_MAPS)}"
      )
    qk_dim = self.feature_dim or head_dim
    num_features = self.num_features or 2 * qk_dim
    return head_dim, qk_dim, num_features

  def _scale(self):
    if self.scale is not None:
      return float(self.scale)
    return 1.0 if self.normalize else self._dims()[1] ** -0.5

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the state [H, F, V (+1 with the normaliser)]."""
    head_dim, qk_dim, m = self._dims()
    features = feature_size(self.feature_map, qk_dim, m)
    return state_bytes((self.num_heads, features, head_dim + (1 if self.normalize else 0)))

  def setup(self):
    head_dim, qk_dim, _ = self._dims()
    heads = self.num_heads
    dense = lambda n: nn.DenseGeneral(
      (heads, n), use_bias=False, dtype=self.dtype, kernel_init=dense_init
    )
    self.q, self.k, self.v = dense(qk_dim), dense(qk_dim), dense(head_dim)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(
      causal=self.causal,
      scale=self._scale(),
      normalize=self.normalize,
      eps=self.eps,
      implementation=self.implementation,
    )

  def _features(self, x, positions):
    _, qk_dim, m = self._dims()
    positions = default_positions(x, positions)
    projection = None
    if self.feature_map == "performer":
      projection = jnp.asarray(
        performer_projection(self.performer_seed + self.layer_idx, qk_dim, m)
      )
    phi = lambda y: feature_map(
      self.feature_map,
      y,
      positions=positions,
      projection=projection,
      horizon=self.cosformer_horizon,
    )
    return phi(self.q(x)), phi(self.k(x))

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k = self._features(x, positions)
    o = self.attn(q, k, self.v(x), segment_ids=segment_ids, decode=decode)
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: the (normalised, when normalize) linear-attention weights."""
    q, k = self._features(x, positions)
    return self.attn.attention_matrix(q, k, segment_ids=segment_ids)


@register("lsa")
class LSA(LinearAttention):
  """Linear self-attention of in-context-learning theory (e.g. von Oswald et al. 2023,
  Ahn et al. 2023): o_i = scale * sum_{j<=i} (q_i . k_j) v_j, no feature map, no normaliser,
  causal. scale defaults to 1 (set 1/T for the 1/n-normalised variants)."""

  feature_map: str = "identity"
  normalize: bool = False
  scale: float | None = 1.0
