"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces"):
the Mamba-1 block on the selective-scan op (`mamba2` is the SSD layer of Mamba-2).

  [x, z] = u W_in                                     (d_inner = expand d_model, no bias)
  x = silu(conv1d(x))                                 (causal depthwise, d_conv taps, bias)
  [dt, B, C] = x W_x                                  (dt_rank = ceil(d_model / 16), N, N)
  y = selective_scan(x, dt W_dt, A, B, C, D, delta_bias=dt_bias)      (state [d_inner, N])
  out = W_out (y * silu(z))

Inits as mamba_ssm's mamba_simple.py: A = -exp(A_log) with A_log = log(1..N) for every channel
(S4D-Real), D = 1, dt_proj weight U(+-dt_scale / sqrt(dt_rank)), dt_bias = softplus^-1(dt)
with dt log-uniform in [dt_min, dt_max] floored at dt_init_floor. Deviation: in_proj, x_proj
and out_proj use the project's Zoology initialisation (N(0, 0.02); out N(0, 0.02/sqrt(2 L)))
as every other mixer does, not PyTorch's kaiming-uniform default. A_log, D and dt_bias are
not weight-decayed (their names are not "kernel"), as mamba_ssm marks them _no_weight_decay.
Decoding keeps the SSM state [d_inner, N] and the conv buffer [d_conv - 1, d_inner].

causal=False (encoders): the bidirectional form of Vision Mamba (Zhu et al. 2024, "bimamba
v2"): the conv + SSM branch also runs on the time-reversed input, reversed back; the two
outputs are averaged before the gate (Vim's if_devide_out). Unlike Vim the two directions share
their parameters, as `mamba2`'s bidirectional form does (apples-to-apples sizes).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  SelectiveScanOp,
  ShortConv,
  dt_bias_init,
  reversed_matrix,
  reversed_pass,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, output_init, register

F32 = jnp.float32


@register("mamba")
class Mamba(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  dt_rank: int | None = None  # None: ceil(d_model / 16)
  dt_min: float = 0.001
  dt_max: float = 0.1
  dt_init_floor: float = 1e-4
  dt_scale: float = 1.0
  conv_bias: bool = True
  causal: bool = True
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True

  def _dims(self) -> tuple[int, int]:
    rank = self.dt_rank if self.dt_rank is not None else math.ceil(self.d_model / 16)
    if rank < 1 or self.d_state < 1 or self.expand < 1:
      raise ValueError(
        f"mamba: dt_rank ({rank}), d_state ({self.d_state}) and expand ({self.expand}) must be >= 1"
      )
    return self.expand * self.d_model, rank

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the SSM state [d_inner, N] and the conv buffer [d_conv-1, d_inner]."""
    d_inner, _ = self._dims()
    return state_bytes((d_inner, self.d_state), (self.d_conv - 1, d_inner))

  def setup(self):
    d_inner, rank = self._dims()
    dense = lambda width, **kw: nn.Dense(width, use_bias=False, dtype=self.dtype, **kw)
    self.in_proj = dense(2 * d_inner, kernel_init=dense_init)
    self.conv = ShortConv(
      kernel_size=self.d_conv,
      use_bias=self.conv_bias,
      activation="silu",
      dtype=self.dtype,
      implementation="xla",
    )
    self.x_proj = dense(rank + 2 * self.d_state, kernel_init=dense_init)
    bound = self.dt_scale * rank**-0.5
    self.dt_proj = dense(
      d_inner,
      kernel_init=lambda key, shape, dtype=F32: jax.random.uniform(
        key, shape, dtype, -bound, bound
      ),
    )

    dt_init = dt_bias_init(self.dt_min, self.dt_max, self.dt_init_floor)
    self.dt_bias = self.param("dt_bias", dt_init, (d_inner,))
    self.A_log = self.param(
      "A_log",
      lambda key, shape: jnp.log(jnp.broadcast_to(jnp.arange(1, shape[1] + 1, dtype=F32), shape)),
      (d_inner, self.d_state),
    )
    self.D = self.param("D", nn.initializers.ones, (d_inner,))
    self.out_proj = dense(self.d_model, kernel_init=output_init(self.num_layers))
    self.ssm = SelectiveScanOp(implementation=self.implementation)

  def _scan_inputs(self, u, segment_ids, decode):
    """z (the gate) and the scan's x, delta, A, B, C."""
    _, rank = self._dims()
    x, z = jnp.split(self.in_proj(u), 2, axis=-1)
    x = self.conv(x, segment_ids=segment_ids, decode=decode)
    dt, b, c = jnp.split(self.x_proj(x), [rank, rank + self.d_state], axis=-1)
    return z, x, self.dt_proj(dt), -jnp.exp(self.A_log), b, c

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
        raise ValueError("mamba: the bidirectional (non-causal) form does not decode")
      y = (y + reversed_pass(lambda v, s: self._scan(v, s, False)[1], u, segment_ids)) / 2
    return self.out_proj(y * nn.silu(z))

  def _scan(self, u, segment_ids, decode):
    """(gate z, scan output with the D skip) of one causal pass."""
    z, x, delta, a, b, c = self._scan_inputs(u, segment_ids, decode)
    y = self.ssm(x, delta, a, b, c, self.D, self.dt_bias, segment_ids=segment_ids, decode=decode)
    return z, y

  def attention_matrix(
    self, u: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,d_inner,T,T]: the hidden attention of the selective scan per channel (Ali et al.
    2024; without the D skip and the gate); causal=False: the mean of both directions'."""
    a = self._causal_matrix(u, segment_ids)
    if not self.causal:
      a = (a + reversed_matrix(self._causal_matrix, u, segment_ids)) / 2
    return a

  def _causal_matrix(self, u, segment_ids):
    _, x, delta, a, b, c = self._scan_inputs(u, segment_ids, False)
    return self.ssm.attention_matrix(x, delta, a, b, c, self.dt_bias, segment_ids=segment_ids)
