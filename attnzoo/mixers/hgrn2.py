"""HGRN-2 (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion").

HGRN's forget gate with a learned lower bound, and an outer-product state expansion that
makes it a gated linear attention whose key is 1 - forget gate:
  f_t = beta + (1 - beta) * sigmoid(x_t W_f)                  (forget gate >= lower bound beta)
  S_t = diag(f_t) S_{t-1} + (1 - f_t) i_t^T,   i_t = x_t W_i  (input = value)
  o_t = S_t^T q_t,  q_t = swish(x_t W_q)                       (output gate = query)
  y_t = W_o RMSNorm(o_t)
on the vector-decay linear-attention op (log decay log f_t on each key channel).

Lower bound. HGRN shares one cumulative-softmax parameter over layers so the bounds rise
with depth, from 0 at the first layer. A mixer here holds only its own parameters, so each
layer above the first learns its own bound per forget channel, beta = sigmoid(theta),
initialised at layer_idx / num_layers (the value HGRN's cumax gives at initialisation);
the first layer has no bound (beta = 0), as in HGRN.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import LinearAttentionOp, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, per_head, register


@register("hgrn2")
class HGRN2(nn.Module):
  """HGRN-2 token mixer. Each of num_heads heads has a forget/query dim of expand_ratio
  (default d_model // num_heads) and a value dim of d_model // num_heads."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  expand_ratio: int | None = None
  lower_bound: bool = True
  norm_eps: float = 1e-5
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _dims(self):
    head_v = per_head(self.d_model, self.num_heads)
    return self.num_heads, self.expand_ratio or head_v, head_v

  def state_size(self, seq_len: int) -> int:
    """Recurrent-state bytes at float32 (independent of seq_len): [H, F, V]."""
    return state_bytes(self._dims())

  def has_lower_bound(self) -> bool:
    return self.lower_bound and self.layer_idx > 0

  def setup(self):
    heads, f_dim, v_dim = self._dims()
    dense = lambda shape: nn.DenseGeneral(
      shape, dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    self.q, self.f, self.i = dense((heads, f_dim)), dense((heads, f_dim)), dense((heads, v_dim))
    if self.has_lower_bound():
      start = self.layer_idx / max(self.num_layers, self.layer_idx + 1)
      logit = math.log(start) - math.log1p(-start)
      self.bound_logit = self.param(
        "bound_logit", nn.initializers.constant(logit), (heads, f_dim), jnp.float32
      )
    self.norm = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(
      causal=self.causal, scale=f_dim**-0.5, implementation=self.implementation
    )

  def gates(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(log forget gate, key = 1 - forget gate), float32 [B,T,H,F]."""
    z = self.f(x).astype(jnp.float32)
    if not self.has_lower_bound():
      return jax.nn.log_sigmoid(z), jax.nn.sigmoid(-z)
    # f = beta + (1 - beta) sigmoid(z), in log space: logaddexp(log beta, log(1-beta) + ls(z)).
    log_beta = jax.nn.log_sigmoid(self.bound_logit)
    log_1m_beta = jax.nn.log_sigmoid(-self.bound_logit)
    log_f = jnp.logaddexp(log_beta, log_1m_beta + jax.nn.log_sigmoid(z))
    key = jnp.exp(log_1m_beta + jax.nn.log_sigmoid(-z))  # (1 - beta) sigmoid(-z)
    return log_f, key

  def _features(self, x):
    log_f, key = self.gates(x)
    q = nn.silu(self.q(x))
    return q, key.astype(q.dtype), self.i(x), log_f

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k, v, log_f = self._features(x)
    o = self.attn(q, k, v, log_f, segment_ids=segment_ids, decode=decode)
    # One RMSNorm over all heads together (HGRN-2 normalises the whole output).
    o = self.norm(o.reshape(o.shape[:2] + (-1,))).reshape(o.shape)
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Hidden attention [B,H,T,T] of the gated recurrence (before the norm)."""
    q, k, _, log_f = self._features(x)
    return self.attn.attention_matrix(q, k, log_f, segment_ids=segment_ids)
