"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs"): the SSD layer on the decayed linear
attention op.

  [z, x, B, C, dt] = u W_in                      (d_inner = expand d_model, H = d_inner / P)
  x, B, C = silu(conv1d([x, B, C]))              (causal depthwise, d_conv taps, with bias)
  dt = softplus(dt + dt_bias),  a_t = exp(-exp(A_log) dt)          (a scalar decay per head)
  h_t = a_t h_{t-1} + B_t (dt_t x_t)^T,  y_t = C_t^T h_t + D x_t   (state N x P per head)
  out = W_out RMSNorm(y ⊙ silu(z))               (gated RMSNorm in groups of d_inner/ngroups)

i.e. linear_attention(q=C, k=B, v=x dt, log_decay=-exp(A_log) dt, scale=1). B and C have
`ngroups` heads shared by H/ngroups SSM heads each (GVA). Inits follow the reference: A ~
U[1, 16] (A_log = log A), dt_bias = softplus^-1(dt) with dt log-uniform in [1e-3, 1e-1] floored
at 1e-4, D = 1; projections N(0, 0.02) (out: 0.02 / sqrt(2 L)) as in Zoology.
Decoding keeps the SSM state H x N x P and the conv buffer (d_conv - 1) x (d_inner + 2 G N).

causal=False (encoders): the bidirectional form of Vision Mamba (Zhu et al. 2024): the conv +
SSM branch also runs on the time-reversed input, reversed back, and the two outputs are summed
before the gate; unlike Vim the two directions share their parameters (apples-to-apples sizes).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  GatedRMSNorm,
  LinearAttentionOp,
  ShortConv,
  dt_bias_init,
  reversed_matrix,
  reversed_pass,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, output_init, register


@register("mamba2")
class Mamba2(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  d_state: int = 64
  d_conv: int = 4
  expand: int = 2
  head_dim: int = 64
  ngroups: int = 1
  A_init_range: tuple = (1.0, 16.0)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  norm_eps: float = 1e-5
  implementation: str = "auto"
  causal: bool = True
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True  # forward + reverse conv and SSM (Vim)

  def _dims(self):
    d_inner = self.expand * self.d_model
    if d_inner % self.head_dim:
      raise ValueError(
        f"mamba2: head_dim ({self.head_dim}) must divide d_inner = expand * d_model ({d_inner})"
      )
    heads = d_inner // self.head_dim
    if heads % self.ngroups:
      raise ValueError(
        f"mamba2: ngroups ({self.ngroups}) must divide the number of heads ({heads})"
      )
    return d_inner, heads

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the SSM state [H, N, P] and the conv buffer [d_conv-1, C]."""
    d_inner, heads = self._dims()
    conv_channels = d_inner + 2 * self.ngroups * self.d_state
    return state_bytes((heads, self.d_state, self.head_dim), (self.d_conv - 1, conv_channels))

  def setup(self):
    d_inner, heads = self._dims()
    self.in_proj = nn.Dense(
      2 * d_inner + 2 * self.ngroups * self.d_state + heads,
      use_bias=False,
      dtype=self.dtype,
      kernel_init=dense_init,
    )
    self.conv = ShortConv(
      kernel_size=self.d_conv,
      use_bias=True,
      activation="silu",
      dtype=self.dtype,
      implementation=self.implementation,
    )
    lo, hi = self.A_init_range
    self.A_log = self.param(
      "A_log",
      lambda key, shape: jnp.log(jax.random.uniform(key, shape, jnp.float32, lo, hi)),
      (heads,),
    )

    dt_init = dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)
    self.dt_bias = self.param("dt_bias", dt_init, (heads,))
    self.D = self.param("D", nn.initializers.ones, (heads,))
    self.norm = GatedRMSNorm(
      group_size=d_inner // self.ngroups, norm_before_gate=False, eps=self.norm_eps
    )
    self.out_proj = nn.Dense(
      self.d_model, use_bias=False, dtype=self.dtype, kernel_init=output_init(self.num_layers)
    )
    self.ssd = LinearAttentionOp(scale=1.0, implementation=self.implementation)

  def _ssm_inputs(self, u, segment_ids, decode):
    d_inner, heads = self._dims()
    gn = self.ngroups * self.d_state
    zxbcdt = self.in_proj(u)
    z, xbc, dt = jnp.split(zxbcdt, [d_inner, 2 * d_inner + 2 * gn], axis=-1)
    xbc = self.conv(xbc, segment_ids=segment_ids, decode=decode)
    x, b, c = jnp.split(xbc, [d_inner, d_inner + gn], axis=-1)
    batch, steps = u.shape[:2]
    x = x.reshape(batch, steps, heads, self.head_dim)
    per_group = heads // self.ngroups
    b = jnp.repeat(b.reshape(batch, steps, self.ngroups, self.d_state), per_group, axis=2)
    c = jnp.repeat(c.reshape(batch, steps, self.ngroups, self.d_state), per_group, axis=2)
    dt = jax.nn.softplus(dt.astype(jnp.float32) + self.dt_bias)  # [B,T,H]
    log_decay = -jnp.exp(self.A_log) * dt
    return z, x, b, c, dt, log_decay

  def __call__(
    self,
    u: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    z, y = self._scan(u, segment_ids, decode)
    if not self.causal:
      if decode:
        raise ValueError("the bidirectional (non-causal) form does not decode")
      y = y + reversed_pass(lambda v, s: self._scan(v, s, False)[1], u, segment_ids)
    return self.out_proj(self.norm(y, z))

  def _scan(self, u, segment_ids, decode):
    """(gate z, SSM output with the D skip [B, T, d_inner]) of one causal pass."""
    z, x, b, c, dt, log_decay = self._ssm_inputs(u, segment_ids, decode)
    v = (x * dt[..., None]).astype(x.dtype)
    y = self.ssd(c, b, v, log_decay, segment_ids=segment_ids, decode=decode)
    y = y + (self.D[:, None] * x).astype(y.dtype)
    return z, y.reshape(*y.shape[:2], -1)

  def attention_matrix(
    self, u: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: the hidden attention of the SSM, (C_t . B_s) exp(sum_{s<r<=t} log a_r) dt_s
    (y = A x + D x; the D skip and the gate are not included)."""
    a = self._causal_matrix(u, segment_ids)
    if not self.causal:  # the reverse pass's matrix, mapped back to the original order
      a = a + reversed_matrix(self._causal_matrix, u, segment_ids)
    return a

  def _causal_matrix(self, u, segment_ids):
    _, _, b, c, dt, log_decay = self._ssm_inputs(u, segment_ids, False)
    a = self.ssd.attention_matrix(c, b, log_decay, segment_ids=segment_ids)
    return a * jnp.transpose(dt, (0, 2, 1))[:, :, None, :]
