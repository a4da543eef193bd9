"""RetNet multi-scale retention (Sun et al. 2023, "Retentive Network").

  q, k = rotate(x W_q), rotate(x W_k)       (RoPE on positions: the xPos-style e^{i n theta})
  v, g = x W_v, x W_g                       (value head dim = value_factor x key head dim)
  S_n = gamma_h S_{n-1} + k_n^T v_n,   o_n = d^-1/2 q_n S_n,   gamma_h = 1 - 2^(-5-h)
  y = W_o ( swish(g) ⊙ GroupNorm_h(o) )     (GroupNorm: one group per head, no affine)

The per-head decays are fixed (log_decay [H] in the op). The parallel form's decay-mask and
score normalisations of the reference implementation are not applied: GroupNorm is invariant to
a per-row rescaling of the retention output, so they only matter through the norm's eps.
Rotary positions use attnzoo.ops.rotary (half-split layout, base^(-2i/d) frequencies).
Decoding keeps S: H x d_k x d_v floats.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import HeadNorm, LinearAttentionOp, default_positions, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, per_head, register
from attnzoo.ops.rotary import apply_rope


def retnet_log_decay(num_heads: int) -> jax.Array:
  """log gamma_h = log(1 - 2^(-5-h)), h = 0..H-1."""
  return jnp.log1p(-(2.0 ** (-5.0 - jnp.arange(num_heads, dtype=jnp.float32))))


@register("retnet")
class RetNet(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  value_factor: int = 2
  rope: bool = True
  rope_base: float = 10000.0
  norm: str = "layernorm"  # per-head GroupNorm; "rmsnorm" as in later implementations
  norm_eps: float = 1e-5
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _dims(self):
    key_dim = per_head(self.d_model, self.num_heads)
    return key_dim, key_dim * self.value_factor

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the state [H, d_k, d_v]."""
    key_dim, value_dim = self._dims()
    return state_bytes((self.num_heads, key_dim, value_dim))

  def setup(self):
    key_dim, value_dim = self._dims()
    heads = self.num_heads
    dense = lambda n: nn.DenseGeneral(
      (heads, n), use_bias=False, dtype=self.dtype, kernel_init=dense_init
    )
    self.q, self.k = dense(key_dim), dense(key_dim)
    self.v, self.g = dense(value_dim), dense(value_dim)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    self.group_norm = HeadNorm(kind=self.norm, affine=False, eps=self.norm_eps)
    self.attn = LinearAttentionOp(
      causal=self.causal, scale=key_dim**-0.5, implementation=self.implementation
    )

  def _qk(self, x, positions):
    q, k = self.q(x), self.k(x)
    if self.rope:
      positions = default_positions(x, positions)
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    return q, k

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    q, k = self._qk(x, positions)
    o = self.attn(
      q, k, self.v(x), retnet_log_decay(self.num_heads), segment_ids=segment_ids, decode=decode
    )
    o = nn.silu(self.g(x)) * self.group_norm(o)
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: the retention scores d^-1/2 (q_n . k_m) gamma^(n-m) (before GroupNorm)."""
    q, k = self._qk(x, positions)
    return self.attn.attention_matrix(
      q, k, retnet_log_decay(self.num_heads), segment_ids=segment_ids
    )
