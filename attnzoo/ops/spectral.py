"""Token mixing by Fourier transforms over the sequence (bidirectional: every output depends on
every input of its sequence), layout channels last.

fourier_mix(x[B,T,C], *, segment_ids=None) -> y[B,T,C]  (FNet, Lee-Thorp et al. 2022):
  y = Re(DFT_time(DFT_channels(x))); with segment_ids each packed segment is transformed on its
  own (the DFT of its length), so segments never mix.
spectral_filter(x[B,T,H,K], weight[B,H,F], bias[H,F], *, length) -> y  (FFTNet, Fein-Ashley
  et al. 2025, "The FFT Strikes Back"): X = rfft(x zero-padded to `length`) over time
  (orthonormal, F = length // 2 + 1 bins), Y = modReLU(X * weight) with the per-bin bias,
  y = irfft(Y, length)[:T] (orthonormal). modReLU(z) = relu(|z| + b) z / (|z| + 1e-6) (the
  official code), with |z| = sqrt(re^2 + im^2 + 1e-12) so that it is differentiable at z = 0.

Implementations: "reference" (explicit real DFT matrices, float32, O(T^2): the ground truth;
the only one that takes segment_ids) and "fft" (jnp.fft, float32, O(T log T)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import canonical_segments, position_in_segment

F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST

fourier_dispatcher = Dispatcher("fourier_mix", auto_order={"default": ("fft", "reference")})
filter_dispatcher = Dispatcher("spectral_filter", auto_order={"default": ("fft", "reference")})


def _angles(rows: jax.Array, cols: jax.Array, n) -> tuple[jax.Array, jax.Array]:
  """cos and sin of 2 pi rows cols / n (broadcast), in float32."""
  angle = (2 * math.pi) * jnp.mod(rows.astype(F32) * cols.astype(F32), n) / n
  return jnp.cos(angle), jnp.sin(angle)


def _fourier_reference(*, x, segment_ids):
  """Re(F_T (x F_C)) with F = cos - i sin: Cos_T x Cos_C - Sin_T x Sin_C, the time DFT taken per
  segment (positions within the segment, its length)."""
  b, t, c = x.shape
  idx = jnp.arange(c)
  cos_c, sin_c = _angles(idx[:, None], idx[None, :], c)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else canonical_segments(segment_ids)
  same = seg[:, :, None] == seg[:, None, :]  # [B,T,T]
  size = jnp.sum(same, axis=-1)  # the length of each token's segment
  pos = position_in_segment(seg)
  cos_t, sin_t = _angles(pos[:, :, None], pos[:, None, :], size[:, :, None])
  cos_t, sin_t = jnp.where(same, cos_t, 0.0), jnp.where(same, sin_t, 0.0)
  xf = x.astype(F32)
  mix = lambda m_t, m_c: jnp.einsum("bts,bsd,dc->btc", m_t, xf, m_c, precision=_HI, optimize=True)
  return (mix(cos_t, cos_c) - mix(sin_t, sin_c)).astype(x.dtype)


fourier_dispatcher.register("reference")(_fourier_reference)


@fourier_dispatcher.register(
  "fft", supports=lambda segment_ids, **_: None if segment_ids is None else "no segment_ids"
)
def _fourier_fft(*, x, segment_ids):
  return jnp.real(jnp.fft.fft2(x.astype(F32), axes=(1, 2))).astype(x.dtype)


def fourier_mix(
  x: jax.Array, *, segment_ids: jax.Array | None = None, implementation: str = "auto"
) -> jax.Array:
  """FNet's token mixing (module docstring). implementation: "auto" | "fft" | "reference"
  ("auto" takes the reference for packed segments)."""
  if x.ndim != 3:
    raise ValueError(f"fourier_mix wants x [B,T,C]; got {x.shape}")
  if segment_ids is not None and segment_ids.shape != x.shape[:2]:
    raise ValueError(
      f"fourier_mix: segment_ids must be [B,T]={x.shape[:2]}; got {segment_ids.shape}"
    )
  return fourier_dispatcher(implementation, x=x, segment_ids=segment_ids)


def mod_relu(re: jax.Array, im: jax.Array, bias: jax.Array) -> tuple[jax.Array, jax.Array]:
  """modReLU of z = re + i im: relu(|z| + bias) z / (|z| + 1e-6); keeps the phase."""
  mag = jnp.sqrt(re * re + im * im + 1e-12)
  scale = jax.nn.relu(mag + bias) / (mag + 1e-6)
  return re * scale, im * scale


def _weights(weight, bias):
  """[B,H,F] filter and [H,F] bias -> broadcastable over [B,F,H,K]."""
  return jnp.swapaxes(weight.astype(F32), 1, 2)[..., None], bias.astype(F32).T[..., None]


def _filter_reference(*, x, weight, bias, length):
  b, t, h, k = x.shape
  bins = length // 2 + 1
  cos, sin = _angles(jnp.arange(bins)[:, None], jnp.arange(t)[None, :], length)  # [F,T]
  xf = x.astype(F32) / math.sqrt(length)
  re = jnp.einsum("ft,bthk->bfhk", cos, xf, precision=_HI)
  im = -jnp.einsum("ft,bthk->bfhk", sin, xf, precision=_HI)
  w, beta = _weights(weight, bias)
  re, im = mod_relu(re * w, im * w, beta)
  # irfft: bins 1 .. ceil(length/2) - 1 count twice (their conjugates); DC and Nyquist once.
  f = jnp.arange(bins)
  twice = jnp.where((f == 0) | (2 * f == length), 1.0, 2.0)[:, None] / math.sqrt(length)
  y = jnp.einsum("ft,bfhk->bthk", twice * cos, re, precision=_HI)
  y = y - jnp.einsum("ft,bfhk->bthk", twice * sin, im, precision=_HI)
  return y.astype(x.dtype)


filter_dispatcher.register("reference")(_filter_reference)


@filter_dispatcher.register("fft")
def _filter_fft(*, x, weight, bias, length):
  t = x.shape[1]
  spectrum = jnp.fft.rfft(x.astype(F32), n=length, axis=1, norm="ortho")
  w, beta = _weights(weight, bias)
  re, im = mod_relu(spectrum.real * w, spectrum.imag * w, beta)
  y = jnp.fft.irfft(jax.lax.complex(re, im), n=length, axis=1, norm="ortho")[:, :t]
  return y.astype(x.dtype)


def spectral_filter(
  x: jax.Array,
  weight: jax.Array,
  bias: jax.Array,
  *,
  length: int,
  implementation: str = "auto",
) -> jax.Array:
  """FFTNet's adaptive spectral filter (module docstring). implementation: "auto" | "fft" |
  "reference"."""
  if x.ndim != 4:
    raise ValueError(f"spectral_filter wants x [B,T,H,K]; got {x.shape}")
  b, t, h, _ = x.shape
  bins = length // 2 + 1
  if t > length:
    raise ValueError(f"spectral_filter: the sequence ({t}) is longer than length ({length})")
  if weight.shape != (b, h, bins) or bias.shape != (h, bins):
    raise ValueError(
      f"spectral_filter: weight must be [B,H,F]={b, h, bins} and bias [H,F]={h, bins}; "
      f"got {weight.shape}, {bias.shape}"
    )
  return filter_dispatcher(implementation, x=x, weight=weight, bias=bias, length=length)
