"""H3 (Fu et al. 2023, "Hungry Hungry Hippos: Towards Language Modeling with State Space
Models", seed #84), as Zoology's `mixers/h3/h3.py` configures it:

  q, k, v = W_q x, W_k x, W_v x                        (Linear(d, d) with bias each)
  k <- shift_ssm(k) + D_k ⊙ k                           (a learned FIR of d_state taps per channel)
  kv[h, i, j] = k[h, i] v[h, j]                         (H = d / head_dim heads)
  y[h] = diag_ssm_h(kv[h]) + D_h kv[h]                  (one S4D SSM per head, shared by its
                                                         head_dim^2 entries; S4D-Lin, bilinear)
  out[h, j] = Σ_i q[h, i] y[h, i, j];  output = W_o out

The shift SSM (A = shift, B = e_1) is exactly a causal depthwise conv whose taps are C (Conv1d
init U(±1/sqrt(N))); it runs on attnzoo.ops.short_conv. The diagonal SSM runs its closed-form
kernel through the FFT long convolution for training and its recurrence for decoding. Zoology's
Figure 2 uses d_state = L and head_dim = 2. Decoding keeps the last d_state - 1 keys [N-1, d]
and the diagonal state [H, hd^2, N/2] complex.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import S4DKernel, ShortConv, conv_kernel_init, state_bytes
from attnzoo.mixers.registry import dense_init, per_head, register

F32 = jnp.float32


@register("h3")
class H3(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  d_state: int = 64
  head_dim: int = 1
  discretization: str = "bilinear"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the shift buffer [N-1, d] and the diagonal state [d hd, N/2, 2]."""
    return state_bytes(
      (self.d_state - 1, self.d_model), (self.d_model * self.head_dim, self.d_state // 2, 2)
    )

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    heads = per_head(self.d_model, self.head_dim)
    hd = self.head_dim
    dense = lambda name: nn.Dense(self.d_model, dtype=self.dtype, kernel_init=dense_init, name=name)
    q, k, v = dense("q")(x), dense("k")(x), dense("v")(x)
    shift = ShortConv(
      kernel_size=self.d_state,
      use_bias=False,
      kernel_init=conv_kernel_init(self.d_state),
      dtype=self.dtype,
      name="shift_ssm",
    )
    d_k = self.param("D_k", nn.initializers.normal(1.0), (self.d_model,), F32)
    k = shift(k, segment_ids=segment_ids, decode=decode) + (d_k * k).astype(k.dtype)
    batch, steps = x.shape[:2]
    k = k.reshape(batch, steps, heads, hd)
    kv = k[..., :, None] * v.reshape(batch, steps, heads, 1, hd)  # [B,T,H,i,j]
    kv = kv.reshape(batch, steps, heads * hd * hd)
    ssm = S4DKernel(
      groups=heads,
      d_state=self.d_state,
      a_init="lin",
      discretization=self.discretization,
      dt_min=self.dt_min,
      dt_max=self.dt_max,
      implementation=self.implementation,
      name="ssm",
    )
    d = self.param("D", nn.initializers.normal(1.0), (heads,), F32)
    y = ssm(kv, segment_ids=segment_ids, decode=decode).reshape(batch, steps, heads, hd, hd)
    y = y + d[:, None, None] * kv.reshape(y.shape).astype(F32)
    out = jnp.einsum("bthi,bthij->bthj", q.reshape(batch, steps, heads, hd).astype(F32), y)
    out = out.reshape(batch, steps, self.d_model).astype(self.dtype)
    # Zoology's output_linear is not an "out_proj": N(0, 0.02) without the depth scaling
    return nn.Dense(self.d_model, dtype=self.dtype, kernel_init=dense_init, name="out")(out)
