"""RWKV-7 "Goose" time mixing (Peng et al. 2025, "RWKV-7 "Goose" with Expressive Dynamic State
Evolution"; defaults from the official RWKV-LM `RWKV-v7/train_temp` code, `RWKV_Tmix_x070`).
Channel mixing is the block's state mixer (the model's MLP), not part of it.

Token shift with static lerps, for * in {r, w, k, v, a, g}: x*_t = x_t + (x_{t-1} - x_t) mu_*.
  r, k, v = W_r xr, W_k xk, W_v xv
  w_t     = exp(-exp(-softplus(-(w0 + tanh(xw W1) W2)) - 0.5))     vector decay in (0.545, 1)
  alpha_t = sigmoid(a0 + xa A1 A2)                                   in-context learning rate
  g_t     = sigmoid(xg G1) G2                                        output gate
  kappa   = L2-normalise_per_head(k * k_k),   k~ = k * (1 + (alpha - 1) * k_a)
  S_t     = S_{t-1} (diag(w_t) - kappa_t (kappa_t * alpha_t)^T) + v_t k~_t^T,  o_t = S_t r_t
  y_t     = W_o [(GroupNorm_H(o_t) + (sum_head r_t * k~_t * r_k) v_t) * g_t]
on attnzoo.ops.dplr_delta (a = -kappa, b = kappa * alpha; chunked for training, the recurrence
for decoding). Init as the official code (r01 = l/(n-1), r10 = 1 - l/n, i/C the channel
fraction): mu_* = 1 - (i/C)^(p r10) with p = 0.2 (r, g), 0.9 (w, a), 0.7 (k, v); w0 = -6 +
6 (n/(C-1))^(1 + r01^0.3) + 0.5 + 2.5 zigzag; a0 = -0.19 + 0.3 zigzag + 0.4 linear; k_k =
0.71 - 0.1 linear; k_a = 1.02; r_k = -0.04; W1, A1, G1 zero and W2, A2, G2 orthogonal (gain
0.1); W_r, W_v ~ U(+-0.5/sqrt(C)), W_k ~ U(+-0.05/sqrt(C)); GroupNorm eps 64e-5; LoRA ranks
max(32, round(c sqrt(C) / 32) 32) with c = 2.5 (decay, a) and 5 (gate); heads of size 64.
Only W_r, W_k, W_v, W_o decay (as in RWKV-LM's optimiser groups).

Deviations: (1) the value residual (layers after the first mix their v towards the first
layer's v) needs a tensor passed between layers, which the mixer contract does not carry; it
is left out, so every layer acts as RWKV-7's first layer (no v LoRA). (2) W_o starts from the
project's scaled N(0, 0.02 / sqrt(2 L)) instead of zeros (a zero output projection would make
a fresh mixer's output, and the gradient into its input, vanish).
Decoding keeps the state [H,K,K] and the last input (token shift) in the cache.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import DPLRDeltaOp, HeadNorm, RWKVHeads, TokenShift, token_shift
from attnzoo.mixers.registry import head_output, register

F32 = jnp.float32
MIXES = ("r", "w", "k", "v", "a", "g")
MIX_POWERS = (0.2, 0.9, 0.7, 0.7, 0.9, 0.2)


def rwkv7_schedules(layer_idx: int, num_layers: int, dim: int, head_dim: int) -> dict:
  """The official layer-dependent initial values: mu [6, C] (rows r, w, k, v, a, g), w0, a0,
  k_k [C]."""
  r01 = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
  r10 = 1.0 - layer_idx / num_layers
  n = np.arange(dim)
  frac = n / dim
  linear = n / max(dim - 1, 1) - 0.5
  half = max(head_dim - 1, 1) / 2
  zigzag = ((n % head_dim) - half) / half
  zigzag = zigzag * np.abs(zigzag)
  decay = -6 + 6 * np.power(n / max(dim - 1, 1), 1 + r01**0.3)
  return {
    "mu": np.stack([1 - np.power(frac, p * r10) for p in MIX_POWERS]),
    "w0": decay + 0.5 + 2.5 * zigzag,
    "a0": -0.19 + 0.3 * zigzag + 0.4 * linear,
    "k_k": 0.71 - 0.1 * linear,
  }


def lora_rank(factor: float, dim: int) -> int:
  """RWKV-7's suggested LoRA rank: max(32, round(factor sqrt(C) / 32) * 32)."""
  return max(32, int(round(factor * math.sqrt(dim) / 32) * 32))


def _orthogonal(scale: float):
  """The official ortho_init: orthogonal rows/columns times scale, gain sqrt(rows / cols) when
  there are more rows than columns."""

  def init(key, shape, dtype=F32):
    gain = math.sqrt(shape[0] / shape[1]) if shape[0] > shape[1] else 1.0
    return nn.initializers.orthogonal(scale=gain * scale)(key, shape, dtype)

  return init


def _symmetric_uniform(bound: float):
  return lambda key, shape, dtype=F32: jax.random.uniform(key, shape, dtype, -bound, bound)


@register("rwkv7")
class RWKV7(RWKVHeads, nn.Module):
  """RWKV-7 time mixing with num_heads heads (default: heads of size 64, at least one); LoRA
  ranks default to the official suggestion for d_model."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int | None = None
  decay_lora_dim: int | None = None
  a_lora_dim: int | None = None
  gate_lora_dim: int | None = None
  norm_eps: float = 64e-5
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def setup(self):
    heads, head_dim = self._dims()
    d = self.d_model
    init = rwkv7_schedules(self.layer_idx, self.num_layers, d, head_dim)
    const = lambda value: lambda *_: jnp.asarray(value, F32)
    zeros = nn.initializers.zeros
    rank = lambda given, factor: given or lora_rank(factor, d)
    r_decay, r_a, r_gate = (
      rank(self.decay_lora_dim, 2.5),
      rank(self.a_lora_dim, 2.5),
      rank(self.gate_lora_dim, 5.0),
    )
    self.mu = self.param("mu", const(init["mu"]))
    self.w0 = self.param("w0", const(init["w0"]))
    self.w1 = self.param("w1", zeros, (d, r_decay), F32)
    self.w2 = self.param("w2", _orthogonal(0.1), (r_decay, d), F32)
    self.a0 = self.param("a0", const(init["a0"]))
    self.a1 = self.param("a1", zeros, (d, r_a), F32)
    self.a2 = self.param("a2", _orthogonal(0.1), (r_a, d), F32)
    self.g1 = self.param("g1", zeros, (d, r_gate), F32)
    self.g2 = self.param("g2", _orthogonal(0.1), (r_gate, d), F32)
    self.k_k = self.param("k_k", const(init["k_k"]))
    self.k_a = self.param("k_a", nn.initializers.constant(1.02), (d,), F32)
    self.r_k = self.param("r_k", nn.initializers.constant(-0.04), (heads, head_dim), F32)
    dense = lambda bound: nn.DenseGeneral(
      (heads, head_dim),
      dtype=self.dtype,
      use_bias=False,
      kernel_init=_symmetric_uniform(bound / math.sqrt(d)),
    )
    self.r, self.k, self.v = dense(0.5), dense(0.05), dense(0.5)
    self.group_norm = HeadNorm(kind="layernorm", affine=True, eps=self.norm_eps)
    self.out = head_output(d, self.num_layers, self.dtype)
    self.op = DPLRDeltaOp(scale=1.0, implementation=self.implementation)
    self.shift = TokenShift()

  def _features(self, x, x_prev):
    """(r, k~, v, log_decay, a, b, g): per-head [B,T,H,K] (g [B,T,D]); log_decay, a, b f32."""
    heads, head_dim = self._dims()
    heads_of = lambda t: t.reshape(t.shape[:-1] + (heads, head_dim))
    mixed = x[:, :, None] + (x_prev - x)[:, :, None] * self.mu.astype(x.dtype)  # [B,T,6,D]
    xr, xw, xk, xv, xa, xg = (mixed[:, :, i] for i in range(len(MIXES)))
    r, k, v = self.r(xr), self.k(xk), self.v(xv)
    f32 = lambda t: t.astype(F32)
    w = self.w0 + jnp.tanh(f32(xw) @ self.w1) @ self.w2
    log_decay = -jnp.exp(-jax.nn.softplus(-w) - 0.5)
    alpha = jax.nn.sigmoid(self.a0 + (f32(xa) @ self.a1) @ self.a2)
    g = (jax.nn.sigmoid(f32(xg) @ self.g1) @ self.g2).astype(self.dtype)
    kappa = f32(k) * heads_of(self.k_k)
    kappa = kappa * jax.lax.rsqrt(jnp.maximum(jnp.sum(kappa * kappa, -1, keepdims=True), 1e-24))
    alpha = heads_of(alpha)
    k = (f32(k) * (1 + (alpha - 1) * heads_of(self.k_a))).astype(self.dtype)
    return r, k, v, heads_of(log_decay), -kappa, kappa * alpha, g

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    x_prev = self.shift(x, segment_ids=segment_ids, decode=decode)
    r, k, v, log_decay, a, b, g = self._features(x, x_prev)
    o = self.op(r, k, v, log_decay, a, b, segment_ids=segment_ids, decode=decode)
    bonus = jnp.sum(r.astype(F32) * k.astype(F32) * self.r_k, -1, keepdims=True) * v.astype(F32)
    o = (self.group_norm(o).astype(F32) + bonus).astype(self.dtype)
    return self.out(o * g.reshape(o.shape))

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Hidden attention [B,H,T,T] of the generalised delta rule (before GroupNorm, the bonus
    and the gate)."""
    r, k, _, log_decay, a, b, _ = self._features(x, token_shift(x, segment_ids))
    return self.op.attention_matrix(r, k, log_decay, a, b, segment_ids=segment_ids)
