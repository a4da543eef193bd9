"""Lightning attention as the token mixer of TransNormerLLM (Qin et al. 2023, "TransNormerLLM:
A Faster and Better Large Language Model with Improved TransNormer"; the kernel: Qin et al.
2024, "Lightning Attention-2").

  q, k = silu(x W_q), silu(x W_k);  v, u = x W_v, x W_u                (heads of d/H)
  LRPE: q_n -> [q_n ⊙ cos(theta n), q_n ⊙ sin(theta n)], same for k, so that
        q_n'.k_m' = sum_i q_ni k_mi cos(theta_i (n - m))  (theta learnable, one per channel of
        the d = H x d/H, initially 10000^(-2 i / d); `lrpe=False` drops it)
  S_n = lambda_h S_{n-1} + k_n'^T v_n,  o_n = q_n' S_n   (no scale, no softmax normaliser)
  lambda_h = exp(-s_h (1 - l / (L - 1) + 1e-5)): s_h the ALiBi slopes 2^(-8 (h+1) / H) (for
        H a power of 2), l the layer index, L the number of layers (factor 1 + 1e-5 if L = 1)
  y = W_o ( u ⊙ SRMSNorm(o) ),   SRMSNorm(x) = x / RMS(x) over all H x d/H channels.

Decoding keeps S: H x (2 d/H with LRPE, else d/H) x d/H floats.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  LinearAttentionOp,
  default_positions,
  get_activation,
  rms_normalize,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, head_output, per_head, register


def alibi_slopes(num_heads: int) -> list[float]:
  """ALiBi's head slopes (Press et al. 2022), as TransNormerLLM builds its decay rates."""

  def power_of_2(n):
    start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
    return [start * start**i for i in range(n)]

  if math.log2(num_heads).is_integer():
    return power_of_2(num_heads)
  closest = 2 ** math.floor(math.log2(num_heads))
  return power_of_2(closest) + alibi_slopes(2 * closest)[0::2][: num_heads - closest]


def lightning_log_decay(num_heads: int, layer_idx: int, num_layers: int) -> jax.Array:
  """log lambda_h = -slope_h * (1 - layer_idx / (num_layers - 1) + 1e-5), [H]."""
  depth = 1.0 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0
  return -jnp.asarray(alibi_slopes(num_heads), jnp.float32) * (depth + 1e-5)


@register("lightning")
class Lightning(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  lrpe: bool = True
  activation: str = "silu"  # on q and k
  gate_activation: str = "identity"  # on the output gate u (TransNormerLLM: none)
  norm_eps: float = 1e-6
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse scans (LinearAttentionOp)

  def _head_dim(self):
    return per_head(self.d_model, self.num_heads)

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the state [H, K, V] (K = 2 d/H with LRPE, else d/H)."""
    head_dim = self._head_dim()
    key_dim = 2 * head_dim if self.lrpe else head_dim
    return state_bytes((self.num_heads, key_dim, head_dim))

  def setup(self):
    head_dim, heads = self._head_dim(), self.num_heads
    dense = lambda: nn.DenseGeneral(
      (heads, head_dim), use_bias=False, dtype=self.dtype, kernel_init=dense_init
    )
    self.q, self.k, self.v, self.u = dense(), dense(), dense(), dense()
    self.out = head_output(self.d_model, self.num_layers, self.dtype)
    if self.lrpe:
      # Per-channel rates: not a "kernel", so weight decay leaves them alone.
      init = lambda key, shape: (
        10000.0 ** (-2.0 / shape[0] * jnp.arange(shape[0], dtype=jnp.float32))
      )
      self.lrpe_theta = self.param("lrpe_theta", init, (heads * head_dim,))
    self.attn = LinearAttentionOp(causal=self.causal, scale=1.0, implementation=self.implementation)

  def _log_decay(self):
    return lightning_log_decay(self.num_heads, self.layer_idx, self.num_layers)

  def _qk(self, x, positions):
    act = get_activation(self.activation)
    q, k = act(self.q(x)), act(self.k(x))
    if self.lrpe:
      positions = default_positions(x, positions)
      theta = self.lrpe_theta.reshape(self.num_heads, -1)
      angle = positions.astype(jnp.float32)[:, :, None, None] * theta
      cos, sin = jnp.cos(angle), jnp.sin(angle)
      rotate = lambda y: jnp.concatenate([y * cos, y * sin], axis=-1).astype(y.dtype)
      q, k = rotate(q), rotate(k)
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
    o = self.attn(q, k, self.v(x), self._log_decay(), segment_ids=segment_ids, decode=decode)
    shape = o.shape
    o = rms_normalize(o.reshape(*shape[:2], -1), self.norm_eps).reshape(shape).astype(o.dtype)
    o = get_activation(self.gate_activation)(self.u(x)) * o
    return self.out(o)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: the decayed scores (q_n'.k_m') lambda^(n-m) (before SRMSNorm)."""
    q, k = self._qk(x, positions)
    return self.attn.attention_matrix(q, k, self._log_decay(), segment_ids=segment_ids)
