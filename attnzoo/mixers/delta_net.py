"""DeltaNet (Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
Sequence Length") and Gated DeltaNet (Yang et al. 2025, "Gated Delta Networks: Improving
Mamba2 with Delta Rule"), on the delta-rule op.

  q, k, v = SiLU(ShortConv(W_q x)), SiLU(ShortConv(W_k x)), SiLU(ShortConv(W_v x))
  q, k    = q / |q|, k / |k|                                  (per head, L2)
  beta_t  = sigmoid(W_beta x_t)                               (x2 with allow_neg_eigval)
  S_t     = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = S_t^T q_t / sqrt(d_k)
  y_t     = W_o [RMSNorm(o_t) * swish(W_g x_t)]                (per-head norm, output gate)
DeltaNet has a_t = 1; Gated DeltaNet has the Mamba-2 decay
  a_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))        (one per head)
with A ~ U(0, 16) and dt_bias the inverse softplus of dt ~ logU(1e-3, 1e-1), as in Mamba-2.
Decoding keeps the delta-rule state [H,K,V] and the three short-conv buffers in the cache.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import DeltaRuleOp, GatedRMSNorm, ShortConv, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, register


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / |x| over the last axis, in float32, cast back to x's dtype."""
  xf = x.astype(jnp.float32)
  return (xf * jax.lax.rsqrt(jnp.sum(xf * xf, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def _dt_bias_init(dt_min=1e-3, dt_max=0.1, floor=1e-4):
  def init(key, shape, dtype=jnp.float32):
    u = jax.random.uniform(key, shape, dtype)
    dt = jnp.maximum(jnp.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)), floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^{-1}(dt)

  return init


def _a_log_init(key, shape, dtype=jnp.float32):
  return jnp.log(jax.random.uniform(key, shape, dtype, 1e-4, 16.0))


class _DeltaNetBase(nn.Module):
  """Shared body of DeltaNet and Gated DeltaNet; `gated` switches on the decay."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  head_dim: int | None = None
  expand_v: float = 1.0
  use_short_conv: bool = True
  conv_size: int = 4
  conv_bias: bool = False
  use_gate: bool = True
  allow_neg_eigval: bool = False
  norm_eps: float = 1e-5
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False
  gated: ClassVar[bool] = False

  def _dims(self):
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"{self.mixer_name}: d_model ({self.d_model}) must be divisible by "
        f"num_heads ({self.num_heads}), or set head_dim"
      )
    k_dim = self.head_dim or self.d_model // self.num_heads
    v_dim = int(k_dim * self.expand_v)
    if v_dim < 1:
      raise ValueError(f"{self.mixer_name}: expand_v ({self.expand_v}) gives no value dims")
    return self.num_heads, k_dim, v_dim

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the delta-rule state [H,K,V] and the q/k/v conv buffers."""
    heads, k_dim, v_dim = self._dims()
    convs = [(self.conv_size - 1, heads * (2 * k_dim + v_dim))] if self.use_short_conv else []
    return state_bytes((heads, k_dim, v_dim), *convs)

  def setup(self):
    heads, k_dim, v_dim = self._dims()
    dense = lambda n, dtype=self.dtype: nn.Dense(
      n, dtype=dtype, use_bias=False, kernel_init=dense_init
    )
    self.q, self.k, self.v = dense(heads * k_dim), dense(heads * k_dim), dense(heads * v_dim)
    if self.use_short_conv:
      conv = lambda: ShortConv(
        self.conv_size,
        use_bias=self.conv_bias,
        activation="silu",
        dtype=self.dtype,
        implementation="auto",
      )
      self.q_conv, self.k_conv, self.v_conv = conv(), conv(), conv()
    self.b = dense(heads, jnp.float32)
    if self.gated:
      self.a = dense(heads, jnp.float32)
      self.A_log = self.param("A_log", _a_log_init, (heads,), jnp.float32)
      self.dt_bias = self.param("dt_bias", _dt_bias_init(), (heads,), jnp.float32)
    if self.use_gate:
      self.g = nn.DenseGeneral(
        (heads, v_dim), dtype=self.dtype, use_bias=False, kernel_init=dense_init
      )
      self.norm = GatedRMSNorm(norm_before_gate=True, eps=self.norm_eps)
    else:
      self.norm = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = DeltaRuleOp(scale=k_dim**-0.5, implementation=self.implementation)

  def _features(self, x, segment_ids=None, decode=False):
    """(q, k, v, beta, log_decay): q, k L2-normalised [B,T,H,K], v [B,T,H,V], beta and the
    log decay (None for DeltaNet) [B,T,H] float32."""
    heads, k_dim, v_dim = self._dims()
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.use_short_conv:
      conv = dict(segment_ids=segment_ids, decode=decode)
      q, k, v = self.q_conv(q, **conv), self.k_conv(k, **conv), self.v_conv(v, **conv)
    else:
      q, k, v = nn.silu(q), nn.silu(k), nn.silu(v)
    split = lambda t, d: t.reshape(t.shape[:2] + (heads, d))
    q, k, v = l2_normalize(split(q, k_dim)), l2_normalize(split(k, k_dim)), split(v, v_dim)
    beta = jax.nn.sigmoid(self.b(x.astype(jnp.float32)))
    if self.allow_neg_eigval:
      beta = 2.0 * beta
    log_decay = None
    if self.gated:
      dt = jax.nn.softplus(self.a(x.astype(jnp.float32)) + self.dt_bias)
      log_decay = -jnp.exp(self.A_log) * dt
    return q, k, v, beta, log_decay

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k, v, beta, log_decay = self._features(x, segment_ids, decode)
    o = self.attn(q, k, v, beta, log_decay, segment_ids=segment_ids, decode=decode)
    o = self.norm(o, self.g(x)) if self.use_gate else self.norm(o)
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Hidden attention [B,H,T,T] of the delta rule (before the output norm and gate)."""
    q, k, _, beta, log_decay = self._features(x, segment_ids)
    return self.attn.attention_matrix(q, k, beta, log_decay, segment_ids=segment_ids)


@register("deltanet")
class DeltaNet(_DeltaNetBase):
  """DeltaNet: the delta rule with short convs, L2-normalised q/k, sigmoid beta."""


@register("gated_deltanet")
class GatedDeltaNet(_DeltaNetBase):
  """Gated DeltaNet: DeltaNet with a Mamba-2 style data-dependent decay per head."""

  gated: ClassVar[bool] = True
