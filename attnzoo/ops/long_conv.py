"""Causal long convolution (H3, Hyena, long BaseConv, S4D's convolution form), per channel:

  y_t[c] = sum_{s <= t} k[t - s, c] * u_s[c]

Layout: u [B,T,C] (channels last), kernel k [L,C] (taps beyond L are zero; L may differ from
T). `segment_ids` [B,T] (packed sequences): u_s contributes to y_t only in the same segment,
and the kernel restarts at each segment's first token.

Implementations: `reference` (direct O(T^2) sum over a Toeplitz gather, pure jnp, any
arguments: the ground truth), "fft" (rfft of u and k zero-padded to n >= 2T, so the circular
product is the linear convolution; O(T log T); float32 FFTs; no segment_ids) and "direct" (the
reference, used by "auto" for packed segments: O(T^2 C) memory, fine for short packed
sequences, not for long ones).

Decoding (`decode_window`): the naive cache keeps every past input (a buffer [B,S,C] and the
number of tokens written); each new token costs O(S) (Massaroli et al. 2023 and Agarwal et al.
2024 call this the naive cache; attnzoo.ops.conv_decode has the fast alternatives).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher

F32 = jnp.float32

DIRECT_MAX_LENGTH = 64
dispatcher = Dispatcher("long_conv", auto_order={"default": ("fft", "direct")})


def _canonical(u, kernel, segment_ids):
  if u.ndim != 3 or kernel.ndim != 2 or kernel.shape[1] != u.shape[2]:
    raise ValueError(
      f"long_conv wants u [B,T,C] and kernel [L,C]; got u{u.shape} kernel{kernel.shape}"
    )
  if segment_ids is not None and segment_ids.shape != u.shape[:2]:
    raise ValueError(f"long_conv: segment_ids must be [B,T]={u.shape[:2]}; got {segment_ids.shape}")


def fit_kernel(kernel: jax.Array, steps: int) -> jax.Array:
  """The first `steps` taps (zero-padded when the kernel is shorter), float32."""
  kernel = kernel.astype(F32)[:steps]
  return jnp.pad(kernel, ((0, steps - kernel.shape[0]), (0, 0)))


def toeplitz(kernel: jax.Array, steps: int) -> jax.Array:
  """[T,T,C] with entry (t, s) = k[t - s] for s <= t, else 0."""
  k = fit_kernel(kernel, steps)
  lag = jnp.arange(steps)[:, None] - jnp.arange(steps)[None, :]
  return jnp.where((lag >= 0)[..., None], k[jnp.clip(lag, 0, steps - 1)], 0.0)


def reference(
  u: jax.Array, kernel: jax.Array, *, segment_ids: jax.Array | None = None
) -> jax.Array:
  """Direct O(T^2) convolution in float32; returns u's dtype."""
  _canonical(u, kernel, segment_ids)
  steps = u.shape[1]
  mat = toeplitz(kernel, steps)[None]  # [1,T,T,C]
  if segment_ids is not None:
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    mat = jnp.where(same[..., None], mat, 0.0)
  return jnp.einsum("btsc,bsc->btc", mat, u.astype(F32)).astype(u.dtype)


def fft_size(steps: int) -> int:
  """The FFT length: the smallest 2^a 3^b 5^c >= 2T (fast radices; >= 2T avoids wrap-around)."""
  n = 2 * steps
  while True:
    m = n
    for p in (2, 3, 5):
      while m % p == 0:
        m //= p
    if m == 1:
      return n
    n += 1


def fft_conv(u: jax.Array, kernel: jax.Array) -> jax.Array:
  """Causal convolution by FFT, zero-padded to fft_size(T) >= 2T; float32 inside."""
  _canonical(u, kernel, None)
  steps = u.shape[1]
  n = fft_size(steps)
  k_f = jnp.fft.rfft(fit_kernel(kernel, steps), n=n, axis=0)
  u_f = jnp.fft.rfft(u.astype(F32), n=n, axis=1)
  y = jnp.fft.irfft(u_f * k_f[None], n=n, axis=1)[:, :steps]
  return y.astype(u.dtype)


@dispatcher.register(
  "fft", supports=lambda segment_ids, **_: None if segment_ids is None else "no segment_ids"
)
def _fft(*, u, kernel, segment_ids):
  return fft_conv(u, kernel)


@dispatcher.register("direct")
def _direct(*, u, kernel, segment_ids):
  return reference(u, kernel, segment_ids=segment_ids)


def long_conv(
  u: jax.Array,
  kernel: jax.Array,
  *,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array:
  """Causal long convolution (module docstring). implementation: "auto" | "fft" | "direct";
  "auto" takes "direct" up to DIRECT_MAX_LENGTH tokens (faster there, and exactly causal: the
  FFT's round-off leaks ~1e-7 relative into the past)."""
  _canonical(u, kernel, segment_ids)
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.long_conv(
      plan, u=u, kernel=kernel, segment_ids=segment_ids, implementation=implementation
    )
  if implementation == "auto" and u.shape[1] <= DIRECT_MAX_LENGTH:
    implementation = "direct"
  return dispatcher(implementation, u=u, kernel=kernel, segment_ids=segment_ids)


def init_state(batch: int, length: int, channels: int) -> dict[str, jax.Array]:
  """The naive decoding cache: every past input (buffer [B,S,C] float32) and the count."""
  return {"inputs": jnp.zeros((batch, length, channels), F32), "index": jnp.zeros((), jnp.int32)}


def decode_window(
  state: dict[str, jax.Array], u: jax.Array, kernel: jax.Array
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Appends u [B,n,C] to the cache and returns y for those n positions from every cached
  input: O(n S) (the naive cache). Writing past the buffer's length S is clamped."""
  buf, index = state["inputs"], state["index"]
  length = buf.shape[1]
  n = u.shape[1]
  buf = jax.lax.dynamic_update_slice_in_dim(buf, u.astype(F32), index, axis=1)
  k = fit_kernel(kernel, length)
  t = index + jnp.arange(n)
  lag = t[:, None] - jnp.arange(length)[None, :]  # [n,S]
  taps = jnp.where((lag >= 0)[..., None], k[jnp.clip(lag, 0, length - 1)], 0.0)
  y = jnp.einsum("nsc,bsc->bnc", taps, buf)
  return {"inputs": buf, "index": index + n}, y.astype(u.dtype)


def positional_features(length: int, emb_dim: int) -> jax.Array:
  """Hyena's positional features [L, emb_dim] (odd emb_dim >= 3): t̂ = linspace(0, 1, L) and
  the bands b = 1..(emb_dim-1)/2 of cos(2π f_b t / L), -sin(2π f_b t / L), with
  f = linspace(1e-4, bands - 1, bands) (Poli et al. 2023; safari/Zoology)."""
  if emb_dim < 3 or emb_dim % 2 == 0:
    raise ValueError(f"positional features need an odd emb_dim >= 3, got {emb_dim}")
  bands = (emb_dim - 1) // 2
  t_hat = jnp.linspace(0.0, 1.0, length, dtype=F32)[:, None]
  t = jnp.arange(length, dtype=F32)[:, None]
  f = jnp.linspace(1e-4, bands - 1, bands, dtype=F32)[None]
  angle = 2 * jnp.pi * f * t / length
  return jnp.concatenate([t_hat, jnp.cos(angle), -jnp.sin(angle)], axis=-1)
