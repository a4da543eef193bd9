"""Diagonal state-space layers: S4D (Gu et al. 2022, "On the Parameterization and
Initialization of Diagonal State Space Models") and DSS (Gupta et al. 2022, "Diagonal State
Spaces are as Effective as Structured State Spaces", seed #94), as the state-spaces repo's
standalone S4D layer wraps them:

  y = GLU(W_out GELU(SSM(x) + D ⊙ x))        (one SSM per channel, N/2 complex modes each)

S4D: A = -exp(log_A_real) + i A_imag from S4D-Lin or S4D-Inv, B = 1, C complex randn, ZOH (default)
or bilinear discretisation (attnzoo.mixers.layers.S4DKernel). DSS: Λ from the diagonal approximation
of HiPPO-LegS (the normal part's eigenvalues), W complex randn, ZOH with DSS-softmax's normalisation
over `l_max` positions, K_l = Re Σ W_n Λ_n^-1 (e^{Λ_n Δ} - 1) / (e^{Λ_n Δ l_max} - 1) e^{Λ_n Δ l}
(Re Λ unconstrained: a mode that learns Re Λ Δ l_max >> 1 overflows float32, which the s4 repo's
max-shift avoids and this form does not), or DSS-exp (Re Λ = -exp(·), no normalisation). Deviation:
Λ is a parameter per channel (initialised identically), as the state-spaces repo's DSS does with its
copies. The SSM parameters are not weight-decayed (the default mask decays only "kernel" leaves).
Training uses the closed-form convolution kernel (FFT); decoding the recurrence, state [D, N/2]
complex.

causal=False (encoders): S4's bidirectional kernel (state-spaces `bidirectional=True`): a second
SSM with its own parameters (names ending "_backward") runs over the time-reversed sequence and
sees only the tokens after t, y_t = Σ_{s<=t} K_{t-s} u_s + Σ_{s>t} K'_{s-t-1} u_s.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import DiagSSMOp, S4DKernel, lax_complex, reversed_pass, state_bytes
from attnzoo.mixers.registry import dense_init, register
from attnzoo.ops import diag_ssm as ssm_ops

F32 = jnp.float32


class _DiagonalLayer(nn.Module):
  """The layer around a diagonal SSM: D skip, GELU, Dense(2D) and GLU (s4d.py's wrapper)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  d_state: int = 64
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  causal: bool = True
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32 of the SSM state [D, N/2] complex."""
    return state_bytes((self.d_model, self.d_state // 2, 2))

  def _ssm(self, x, segment_ids, decode, suffix=""):
    """The SSM over x (no D term); `suffix` names a second set of its parameters."""
    raise NotImplementedError

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    if self.d_state < 2 or self.d_state % 2:
      raise ValueError(f"{self.mixer_name}: d_state must be even and >= 2, got {self.d_state}")
    d = self.param("D", nn.initializers.normal(1.0), (self.d_model,), F32)
    y = self._ssm(x, segment_ids, decode)
    if not self.causal:
      if decode:
        raise ValueError(f"{self.mixer_name}: the bidirectional (non-causal) form does not decode")
      backward = lambda u, s: self._ssm(u, s, False, suffix="_backward")
      y = y + reversed_pass(backward, x, segment_ids, strictly_future=True)
    y = y + d * x.astype(F32)
    y = nn.gelu(y.astype(self.dtype), approximate=False)
    y = nn.Dense(2 * self.d_model, dtype=self.dtype, kernel_init=dense_init, name="out")(y)
    return nn.glu(y, axis=-1).astype(x.dtype)


@register("s4d")
class S4D(_DiagonalLayer):
  a_init: str = "lin"  # "lin" | "inv"
  discretization: str = "zoh"  # "zoh" | "bilinear"

  def _ssm(self, x, segment_ids, decode, suffix=""):
    kernel = S4DKernel(
      groups=self.d_model,
      d_state=self.d_state,
      a_init=self.a_init,
      discretization=self.discretization,
      dt_min=self.dt_min,
      dt_max=self.dt_max,
      implementation=self.implementation,
      name="kernel" + suffix,
    )
    return kernel(x, segment_ids=segment_ids, decode=decode)


DSS_KERNELS = ("softmax", "exp")


@register("dss")
class DSS(_DiagonalLayer):
  kernel: str = "softmax"  # "softmax" | "exp"
  l_max: int = 1024  # the length DSS-softmax normalises over

  def _ssm(self, x, segment_ids, decode, suffix=""):
    if self.kernel not in DSS_KERNELS:
      raise ValueError(f"dss: unknown kernel {self.kernel!r}; use one of {', '.join(DSS_KERNELS)}")
    eig = ssm_ops.legs_eigenvalues(self.d_state)
    shape = (self.d_model, self.d_state // 2)
    const = lambda value: lambda *_: jnp.broadcast_to(jnp.asarray(value, F32), shape)
    lo, hi = math.log(self.dt_min), math.log(self.dt_max)
    log_dt = self.param(
      "log_dt" + suffix, lambda key: jax.random.uniform(key, shape[:1], F32, lo, hi)
    )
    if self.kernel == "softmax":
      lam_re = self.param("Lambda_re" + suffix, const(eig.real))
    else:
      lam_re = -jnp.exp(self.param("log_Lambda_re" + suffix, const(jnp.log(-eig.real))))
    lam = lax_complex(lam_re, self.param("Lambda_im" + suffix, const(eig.imag)))
    w = self.param("W" + suffix, lambda key: jax.random.normal(key, shape + (2,), F32))
    w = lax_complex(w[..., 0], w[..., 1])
    log_da = jnp.exp(log_dt)[:, None] * lam  # ZOH: dA = exp(Λ Δ)
    w = w * jnp.expm1(log_da) / lam
    if self.kernel == "softmax":  # / (e^{Λ Δ l_max} - 1), as x̄ / (|x|^2 + 1e-7)
      den = jnp.expm1(log_da * self.l_max)
      w = w * jnp.conj(den) / (jnp.abs(den) ** 2 + 1e-7)
    # the op's kernel is 2 Re Σ W dA^l, DSS's Re Σ
    op = DiagSSMOp(self.implementation, name="ssm" + suffix)
    return op(x, log_da, w / 2, segment_ids=segment_ids, decode=decode)
