"""Gated Linear Attention (GLA; Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training").

Per head, with a data-dependent decay on each key channel:
  alpha_t = sigmoid(x_t W_a1 W_a2 + b_a) ** (1 / tau)          (low-rank gate, tau = 16)
  S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)
  y_t = W_o [RMSNorm(o_t) * swish(W_r x_t)]                     (per-head norm, output gate)
so log alpha_t = logsigmoid(x_t W_a1 W_a2 + b_a) / tau, the gate of fla's GLA layer.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import GatedRMSNorm, LinearAttentionOp, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, register


@register("gla")
class GLA(nn.Module):
  """Gated Linear Attention with a low-rank data-dependent key-channel gate.

  Key dim d_model * expand_k and value dim d_model * expand_v are split over num_heads.
  """

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  output_gate: bool = True
  norm_eps: float = 1e-5
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _dims(self):
    k_total, v_total = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
    for what, n in (("d_model * expand_k", k_total), ("d_model * expand_v", v_total)):
      if n % self.num_heads or n == 0:
        raise ValueError(
          f"gla: {what} ({n}) must be a positive multiple of num_heads ({self.num_heads})"
        )
    return self.num_heads, k_total // self.num_heads, v_total // self.num_heads

  def state_size(self, seq_len: int) -> int:
    """Recurrent-state bytes at float32 (independent of seq_len): [H, K, V]."""
    return state_bytes(self._dims())

  def setup(self):
    heads, k_dim, v_dim = self._dims()
    dense = lambda shape, **kw: nn.DenseGeneral(
      shape, dtype=self.dtype, use_bias=False, kernel_init=dense_init, **kw
    )
    self.q, self.k = dense((heads, k_dim)), dense((heads, k_dim))
    self.v = dense((heads, v_dim))
    self.gate_down = dense(self.gate_low_rank_dim)
    self.gate_up = nn.DenseGeneral((heads, k_dim), dtype=jnp.float32, kernel_init=dense_init)
    if self.output_gate:
      self.g = dense((heads, v_dim))
      self.norm = GatedRMSNorm(norm_before_gate=True, eps=self.norm_eps)
    else:
      self.norm = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(
      causal=self.causal, scale=k_dim**-0.5, implementation=self.implementation
    )

  def _features(self, x):
    log_decay = jax.nn.log_sigmoid(self.gate_up(self.gate_down(x)).astype(jnp.float32))
    return self.q(x), self.k(x), self.v(x), log_decay / self.gate_logit_normalizer

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k, v, log_decay = self._features(x)
    o = self.attn(q, k, v, log_decay, segment_ids=segment_ids, decode=decode)
    o = self.norm(o, self.g(x)) if self.output_gate else self.norm(o)
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Hidden attention [B,H,T,T] of the gated recurrence (before norm and output gate)."""
    q, k, _, log_decay = self._features(x)
    return self.attn.attention_matrix(q, k, log_decay, segment_ids=segment_ids)
