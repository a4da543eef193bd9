"""LAWCAT (Liu et al. 2025, "LAWCAT: Efficient Distillation from Quadratic to Linear Attention
with Convolution across Tokens for Long Context Modeling"): linear attention with causal
Conv1D across time and normalised gated linear attention.

  q~ = Conv1D_q(W_q x),  k~ = Conv1D_k(W_k x)        (causal depthwise, kernel r+1 = 4, no
                                                      nonlinearity between conv and phi)
  phi(u) = [softmax(u W_phi), softmax(-u W_phi)]     (one learned map per head, shared by q
                                                      and k, so phi(q).phi(k) is a kernel)
  S_t = diag(alpha_t) S_{t-1} + phi(k~_t) v_t^T,  z_t = diag(alpha_t) z_{t-1} + phi(k~_t)
  o_t = S_t^T phi(q~_t) / (z_t . phi(q~_t) + eps),   y_t = W_o o_t
The decay is GLA's low-rank gate, log alpha_t = logsigmoid(x_t W_a1 W_a2 + b) / 16, on every
feature channel (gate="vector"), one per head (gate="scalar"), or none (gate="none").

What the paper fixes: the causal conv on q and k, the shared linear+nonlinear feature map
after it, and gating plus normalisation of the linear attention. What it leaves to its code,
and we chose: the map's nonlinearity (Hedgehog's +/- softmax, as in LoLCATs, whose
distillation LAWCAT extends, initialised at the identity) and the gate's parameterisation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import LinearAttentionOp, ShortConv, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, register

GATES = ("vector", "scalar", "none")


def _feature_init(key, shape, dtype=jnp.float32):
  """Identity per head where the shapes allow it (LoLCATs' choice), else N(0, 0.02)."""
  heads, d_in, d_out = shape
  if d_in == d_out:
    return jnp.broadcast_to(jnp.eye(d_in, dtype=dtype), shape)
  return dense_init(key, shape, dtype)


class HedgehogMap(nn.Module):
  """Hedgehog feature map per head (Zhang et al. 2024, as in LoLCATs): u [B,T,H,d] ->
  [softmax(u W_h), softmax(-u W_h)] [B,T,H,2F], positive, float32. Param "kernel" [H,d,F]."""

  features: int

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    kernel = self.param("kernel", _feature_init, u.shape[-2:] + (self.features,), jnp.float32)
    proj = jnp.einsum("bthd,hdf->bthf", u.astype(jnp.float32), kernel)
    return jnp.concatenate([jax.nn.softmax(proj, axis=-1), jax.nn.softmax(-proj, axis=-1)], axis=-1)


@register("lawcat")
class LAWCAT(nn.Module):
  """LAWCAT attention: num_heads heads of head_dim (default d_model // num_heads); the
  feature map gives 2 * feature_dim features per head (default feature_dim = head_dim)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  head_dim: int | None = None
  feature_dim: int | None = None
  conv_size: int = 4
  conv_bias: bool = False
  gate: str = "vector"
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _dims(self):
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"lawcat: d_model ({self.d_model}) must be divisible by num_heads "
        f"({self.num_heads}), or set head_dim"
      )
    if self.gate not in GATES:
      raise ValueError(f"lawcat: unknown gate {self.gate!r}; use one of {', '.join(GATES)}")
    head_dim = self.head_dim or self.d_model // self.num_heads
    return self.num_heads, head_dim, self.feature_dim or head_dim

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the state [H, 2F, V] with its normaliser column, and the q/k conv
    buffers."""
    heads, head_dim, feat = self._dims()
    return state_bytes((heads, 2 * feat, head_dim + 1), (self.conv_size - 1, 2 * heads * head_dim))

  def setup(self):
    heads, head_dim, feat = self._dims()
    dense = lambda: nn.Dense(
      heads * head_dim, dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    self.q, self.k = dense(), dense()
    self.v = nn.DenseGeneral(
      (heads, head_dim), dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    conv = lambda: ShortConv(
      self.conv_size, use_bias=self.conv_bias, activation=None, dtype=self.dtype
    )
    self.q_conv, self.k_conv = conv(), conv()
    self.feature_map = HedgehogMap(feat)
    if self.gate != "none":
      self.gate_down = nn.Dense(
        self.gate_low_rank_dim, dtype=self.dtype, use_bias=False, kernel_init=dense_init
      )
      gate_shape = (heads, 2 * feat) if self.gate == "vector" else (heads,)
      self.gate_up = nn.DenseGeneral(gate_shape, dtype=jnp.float32, kernel_init=dense_init)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(scale=1.0, normalize=True, implementation=self.implementation)

  def phi(self, u: jax.Array) -> jax.Array:
    """The shared feature map: u [B,T,H,d] -> [B,T,H,2F], positive, float32."""
    return self.feature_map(u)

  def _features(self, x, segment_ids=None, decode=False):
    heads, head_dim, _ = self._dims()
    conv = dict(segment_ids=segment_ids, decode=decode)
    q, k = self.q_conv(self.q(x), **conv), self.k_conv(self.k(x), **conv)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
    v = self.v(x)
    q, k = self.phi(split(q)).astype(v.dtype), self.phi(split(k)).astype(v.dtype)
    log_decay = None
    if self.gate != "none":
      log_decay = jax.nn.log_sigmoid(self.gate_up(self.gate_down(x)).astype(jnp.float32))
      log_decay = log_decay / self.gate_logit_normalizer
    return q, k, v, log_decay

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k, v, log_decay = self._features(x, segment_ids, decode)
    return self.out(self.attn(q, k, v, log_decay, segment_ids=segment_ids, decode=decode))

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Normalised hidden attention [B,H,T,T] (rows sum to one up to eps)."""
    q, k, _, log_decay = self._features(x, segment_ids)
    return self.attn.attention_matrix(q, k, log_decay, segment_ids=segment_ids)
