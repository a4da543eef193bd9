"""RWKV-6 "Finch" time mixing (Peng et al. 2024, "Eagle and Finch: RWKV with Matrix-Valued
States and Dynamic Recurrence"). Channel mixing is the block's state mixer, not part of it.

Token shift with data-dependent linear interpolation (ddlerp), for * in {w, k, v, r, g}:
  dx_t = x_{t-1} - x_t
  m_*  = (tanh((x_t + dx_t * mu_x) A) B_*)                      (shared low-rank LoRA, 5 heads)
  x*_t = x_t + dx_t * (mu_* + m_*)
Projections r = W_r xr, k = W_k xk, v = W_v xv, g = silu(W_g xg); data-dependent decay
  w_t = exp(-exp(d + tanh(xw_t D_1) D_2))                     (LoRA on the decay)
and the WKV recurrence with bonus u (the op's `bonus` readout), per head:
  o_t = r_t^T (S_{t-1} + diag(u) k_t v_t^T),   S_t = diag(w_t) S_{t-1} + k_t v_t^T
  y_t = W_o (GroupNorm_H(o_t) * g_t)
Initialisation follows RWKV-6's layer-dependent schedules for mu, d and u.
Decoding keeps the recurrent state and the last input (token shift) in the cache.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import HeadNorm, LinearAttentionOp, RWKVHeads, TokenShift, token_shift
from attnzoo.mixers.registry import dense_init, head_output, register

MIXES = ("w", "k", "v", "r", "g")


def _schedules(layer_idx, num_layers, dim, heads):
  """RWKV-6's layer-dependent initial values (mu [5+1, D], decay d [D], bonus u [H, K])."""
  r01 = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
  r10 = 1.0 - layer_idx / num_layers
  frac = np.arange(dim) / dim
  base = np.power(frac, r10)
  mu = {
    "x": 1 - base,
    "w": 1 - base,
    "k": 1 - base,
    "v": 1 - (base + 0.3 * r01),
    "r": 1 - np.power(frac, 0.5 * r10),
    "g": 1 - np.power(frac, 0.5 * r10),
  }
  n = np.arange(dim) / max(dim - 1, 1)
  decay = -6 + 5 * np.power(n, 0.7 + 1.3 * r01)
  zigzag = ((np.arange(dim) + 1) % 3 - 1) * 0.1
  bonus = (r01 * (1 - n) + zigzag).reshape(heads, dim // heads)
  return mu, decay, bonus


@register("rwkv6")
class RWKV6(RWKVHeads, nn.Module):
  """RWKV-6 time mixing with num_heads heads (default: heads of size 64, at least one)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int | None = None
  mix_lora_dim: int = 32
  decay_lora_dim: int = 64
  norm_eps: float = 64e-5
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def setup(self):
    heads, head_dim = self._dims()
    d = self.d_model
    mu, decay, bonus = _schedules(self.layer_idx, self.num_layers, d, heads)
    const = lambda value: lambda *_: jnp.asarray(value, jnp.float32)
    small = nn.initializers.uniform(0.02)  # U(0, 0.02) - 0.01 below
    centred = lambda key, shape, dtype=jnp.float32: small(key, shape, dtype) - 0.01
    self.mu_x = self.param("mu_x", const(mu["x"]))
    self.mu = self.param("mu", const(np.stack([mu[m] for m in MIXES])))  # [5, D]
    self.mix_a = self.param("mix_a", nn.initializers.zeros, (d, len(MIXES) * self.mix_lora_dim))
    self.mix_b = self.param("mix_b", centred, (len(MIXES), self.mix_lora_dim, d))
    self.decay = self.param("decay", const(decay.reshape(heads, head_dim)))
    self.decay_a = self.param("decay_a", nn.initializers.zeros, (d, self.decay_lora_dim))
    self.decay_b = self.param("decay_b", centred, (self.decay_lora_dim, heads, head_dim))
    self.bonus = self.param("bonus", const(bonus))
    dense = lambda: nn.DenseGeneral(
      (heads, head_dim), dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    self.r, self.k, self.v, self.g = dense(), dense(), dense(), dense()
    # GroupNorm with one group per head: normalise each head, affine per channel.
    self.group_norm = HeadNorm(kind="layernorm", affine=True, eps=self.norm_eps)
    self.out = head_output(d, self.num_layers, self.dtype)
    self.attn = LinearAttentionOp(scale=1.0, implementation=self.implementation)
    self.shift = TokenShift()

  def _features(self, x, x_prev):
    """(r, k, v, g, log_decay) from the input and its token shift."""
    dx = x_prev - x
    lora_in = jnp.tanh((x + dx * self.mu_x.astype(x.dtype)) @ self.mix_a.astype(x.dtype))
    lora_in = lora_in.reshape(x.shape[:2] + (len(MIXES), self.mix_lora_dim))
    m = jnp.einsum("btfl,fld->btfd", lora_in, self.mix_b.astype(x.dtype))
    mixed = x[:, :, None] + dx[:, :, None] * (self.mu.astype(x.dtype) + m)  # [B,T,5,D]
    xw, xk, xv, xr, xg = (mixed[:, :, i] for i in range(len(MIXES)))
    ww = self.decay + jnp.einsum(
      "btl,lhk->bthk", jnp.tanh(xw.astype(jnp.float32) @ self.decay_a), self.decay_b
    )
    log_decay = -jnp.exp(ww)
    return self.r(xr), self.k(xk), self.v(xv), nn.silu(self.g(xg)), log_decay

  def _output(self, o, g):
    return self.out(self.group_norm(o) * g)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    x_prev = self.shift(x, segment_ids=segment_ids, decode=decode)
    r, k, v, g, log_decay = self._features(x, x_prev)
    o = self.attn(r, k, v, log_decay, self.bonus, segment_ids=segment_ids, decode=decode)
    return self._output(o, g)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Hidden attention [B,H,T,T] of the WKV recurrence: decayed r.k off the diagonal and the
    bonus r.(u*k) on it (before GroupNorm and the gate)."""
    r, k, _, _, log_decay = self._features(x, token_shift(x, segment_ids))
    return self.attn.attention_matrix(r, k, log_decay, self.bonus, segment_ids=segment_ids)
