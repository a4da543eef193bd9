"""Fast autoregressive generation through a causal long convolution y_t = Σ_{s<=t} k[t-s] u_s
(per channel; u [B,C] per step, k [L,C]), where the next input depends on the output:
u_{t+1} = next_input(t, y_t).

- `generate_naive`: the naive cache (every past input; O(L) per token, O(L^2) in total).
- `generate_futurefill`: FutureFill, epoched (Agarwal et al. 2024, "FutureFill: Fast Generation
  from Convolutional Sequence Models", seed #88): every `epoch` tokens one FFT convolution adds
  the contribution of the epoch just finished to every future position (the "future fill"
  buffer); inside an epoch each token adds the direct sum over at most `epoch` recent inputs.
  O(L^2 log L / K + L K) in total for epoch K (K ≈ sqrt(L log L) gives O(L^1.5 sqrt(log L)));
  exact up to FFT round-off. The paper's continuous O(L log^2 L) variant is not implemented.
- `distill_modal`: Laughing-Hyena-style distillation (Massaroli et al. 2023, "Laughing Hyena
  Distillery", seed #113) of each channel's filter into a small diagonal SSM,
  k_l ≈ 2 Re Σ_n W_n λ_n^l, by the matrix-pencil method (poles from the shift invariance of
  the filter's Hankel matrix, then residues by least squares): a classical model-order
  reduction in place of the paper's gradient-based modal fitting. Then `generate_ssm` decodes
  in O(order) per token with attnzoo.ops.diag_ssm.step.

`next_input(t, y [B,C]) -> u [B,C]` is traced inside lax loops (pure jnp).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnzoo.ops import diag_ssm as ssm_ops
from attnzoo.ops import long_conv as lc_ops

F32 = jnp.float32
NextInput = Callable[[jax.Array, jax.Array], jax.Array]


def generate_naive(
  u0: jax.Array, kernel: jax.Array, next_input: NextInput, steps: int
) -> tuple[jax.Array, jax.Array]:
  """(inputs u [B,steps,C], outputs y [B,steps,C]) with the naive cache: y_t reads all t+1
  cached inputs (a dot over the buffer of `steps` slots)."""
  batch, channels = u0.shape
  k = lc_ops.fit_kernel(kernel, steps)
  k_rev = k[::-1]  # k_rev[steps-1-j] = k[j]

  def body(carry, t):
    buf, u = carry
    buf = buf.at[:, t].set(u.astype(F32))
    # y_t = Σ_s k[t-s] buf[s] = Σ_s k_rev[steps-1-t+s] buf[s]; slots s > t are still zero
    taps = jnp.roll(k_rev, t + 1, axis=0)  # taps[s] = k_rev[s - t - 1 mod steps] = k[t - s]
    y = jnp.einsum("sc,bsc->bc", jnp.where((jnp.arange(steps) <= t)[:, None], taps, 0.0), buf)
    return (buf, next_input(t, y).astype(u.dtype)), (u, y)

  buf = jnp.zeros((batch, steps, channels), F32)
  _, (us, ys) = lax.scan(body, (buf, u0), jnp.arange(steps))
  return us.swapaxes(0, 1), ys.swapaxes(0, 1)


def generate_futurefill(
  u0: jax.Array, kernel: jax.Array, next_input: NextInput, steps: int, epoch: int
) -> tuple[jax.Array, jax.Array]:
  """As generate_naive, by epoched FutureFill; steps must be a multiple of epoch."""
  if steps % epoch:
    raise ValueError(f"futurefill: steps ({steps}) must be a multiple of epoch ({epoch})")
  batch, channels = u0.shape
  k = lc_ops.fit_kernel(kernel, steps)
  n = lc_ops.fft_size(steps)
  k_f = jnp.fft.rfft(k, n=n, axis=0)  # once
  k_rev = k[:epoch][::-1]  # the recent window: k_rev[epoch-1-j] = k[j]

  def token(carry, i):
    future, window, u, start = carry  # window [B,epoch,C]: this epoch's inputs so far
    t = start + i
    window = window.at[:, i].set(u.astype(F32))
    taps = jnp.roll(k_rev, i + 1, axis=0)  # taps[j] = k[i - j] for j <= i
    recent = jnp.einsum(
      "jc,bjc->bc", jnp.where((jnp.arange(epoch) <= i)[:, None], taps, 0.0), window
    )
    y = lax.dynamic_index_in_dim(future, t, axis=1, keepdims=False) + recent
    return (future, window, next_input(t, y).astype(u.dtype), start), (u, y)

  def run_epoch(carry, e):
    future, u = carry
    start = e * epoch
    window = jnp.zeros((batch, epoch, channels), F32)
    (future, window, u, _), out = lax.scan(token, (future, window, u, start), jnp.arange(epoch))
    # FutureFill: the finished epoch's contribution to every later position, by one FFT
    placed = lax.dynamic_update_slice_in_dim(
      jnp.zeros((batch, steps, channels), F32), window, start, 1
    )
    fill = jnp.fft.irfft(jnp.fft.rfft(placed, n=n, axis=1) * k_f[None], n=n, axis=1)[:, :steps]
    later = (jnp.arange(steps) >= start + epoch)[None, :, None]
    return (future + jnp.where(later, fill, 0.0), u), out

  future = jnp.zeros((batch, steps, channels), F32)
  _, (us, ys) = lax.scan(run_epoch, (future, u0), jnp.arange(steps // epoch))
  # [epochs, epoch, B, C] -> [B, steps, C]
  flat = lambda a: a.reshape(steps, batch, channels).swapaxes(0, 1)
  return flat(us), flat(ys)


def distill_modal(
  kernel: np.ndarray, order: int, pencil: int | None = None
) -> tuple[jax.Array, jax.Array]:
  """(log λ [C,order], W [C,order]) complex with k_l ≈ 2 Re Σ_n W_n λ_n^l for each channel of
  kernel [L,C], by the matrix pencil: the top `order` right singular vectors V of the Hankel
  matrix H[i, j] = k[i + j] (j <= pencil) give the poles eig(pinv(V[:-1]) V[1:]); the
  residues solve the least-squares Vandermonde system. Host-side (numpy, float64)."""
  h = np.asarray(kernel, np.float64)
  length, channels = h.shape
  pencil = pencil or min(length // 2, 4 * order)
  rows = length - pencil
  idx = np.arange(rows)[:, None] + np.arange(pencil + 1)[None]
  logs, ws = [], []
  for c in range(channels):
    _, _, vh = np.linalg.svd(h[idx, c], full_matrices=False)
    v = vh[:order].conj().T  # [pencil+1, order]
    poles = np.linalg.eigvals(np.linalg.pinv(v[:-1]) @ v[1:])
    poles = np.where(np.abs(poles) < 1e-12, 1e-12, poles)
    vander = poles[None, :] ** np.arange(length)[:, None]  # [L, order]
    res = np.linalg.lstsq(vander, h[:, c].astype(np.complex128), rcond=None)[0]
    logs.append(np.log(poles.astype(np.complex128)))
    ws.append(res / 2)  # h = Σ res λ^l is real, so h = 2 Re Σ (res / 2) λ^l
  return jnp.asarray(np.stack(logs), jnp.complex64), jnp.asarray(np.stack(ws), jnp.complex64)


def generate_ssm(
  u0: jax.Array, log_da: jax.Array, w: jax.Array, next_input: NextInput, steps: int
) -> tuple[jax.Array, jax.Array]:
  """As generate_naive through the diagonal SSM (log_da, w) [C,order]: O(order) per token."""
  batch, channels = u0.shape

  def body(carry, t):
    state, u = carry
    state, y = ssm_ops.step(state, u.astype(F32), log_da, w)
    return (state, next_input(t, y).astype(u.dtype)), (u, y)

  state = ssm_ops.init_state(batch, channels, log_da.shape[1])
  _, (us, ys) = lax.scan(body, (state, u0), jnp.arange(steps))
  return us.swapaxes(0, 1), ys.swapaxes(0, 1)
