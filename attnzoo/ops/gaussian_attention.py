"""Gaussian adaptive attention (Ioannides et al. 2024, "Gaussian Adaptive Attention is All You
Need", GAAM), over time. For x [B,T,H,d], per head h learned offsets δ [H,G] and scaled
variances c [H,G] (G Gaussians), with μ, σ² the mean and variance of each feature over time:

  log m_t = Σ_g [ -(x_t - μ - δ_g)² / (2 σ² c_g²) - ½ log(2π c_g²) ]   (product of Gaussians)
  w_t = m_t / Σ_s m_s,    y_t = x_t ⊙ w_t

(elementwise in the features; σ² gets + eps, eps = 1e-8, as the official code). causal=False is
the paper's form (statistics and normalisation over the whole sequence, within segments).
causal=True (ours): μ_t, σ²_t are the statistics of the prefix x_{<=t} (population variance, so
t = 0 is defined), each token is scored once with the statistics of its own prefix, and the
normalisation runs over the prefix: w_t = m_t / Σ_{s<=t} m_s. That is a recurrence with state
(n, Σx, Σx², log Σ m) per feature, [B,H,d,4] float32.

Forms: `reference` (masked [T,T] sums), `recurrent` (lax.scan of `step`), "xla" = `scan`
(segmented associative scans of the sums and of logaddexp). Causal forms take `initial_state`
and return `final_state`; causal=False has no state.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.prefix_attention import segmented_scan
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32
EMPTY_LOG = -1e38
EPS = 1e-8

dispatcher = Dispatcher("gaussian_attention", auto_order={"default": ("xla",)})


def log_density(x, mean, var, offsets, c):
  """log Π_g N(x; mean + δ_g, var c_g²) up to the variance's own normaliser (as the official
  code): x, mean, var [...,H,d]; offsets, c [H,G]."""
  z = (x[..., None] - mean[..., None] - offsets[:, None, :]) * lax.rsqrt(var + EPS)[..., None]
  c2 = (c * c)[:, None, :]
  return jnp.sum(-z * z / (2 * c2) - 0.5 * jnp.log(2 * math.pi * c2), axis=-1)


def init_state(batch: int, heads: int, dim: int) -> jax.Array:
  """(n, Σx, Σx², log Σ m) = (0, 0, 0, -1e38): [B,H,d,4] float32."""
  zeros = jnp.zeros((batch, heads, dim, 3), F32)
  return jnp.concatenate([zeros, jnp.full((batch, heads, dim, 1), EMPTY_LOG, F32)], -1)


def _stats(n, sx, sxx):
  mean = sx / n
  return mean, jnp.maximum(sxx / n - mean * mean, 0.0)


def _canonical(x, offsets, c, initial_state, segment_ids, causal):
  if x.ndim != 4 or offsets.shape != c.shape or offsets.shape[0] != x.shape[2]:
    raise ValueError(
      f"gaussian_attention wants x [B,T,H,d], offsets and c [H,G]; got {x.shape}, "
      f"{offsets.shape}, {c.shape}"
    )
  if initial_state is not None and not causal:
    raise ValueError("gaussian_attention: causal=False takes no initial_state")
  if segment_ids is not None and segment_ids.shape != x.shape[:2]:
    raise ValueError(f"gaussian_attention: segment_ids must be [B,T]; got {segment_ids.shape}")


def reference(
  x: jax.Array,
  offsets: jax.Array,
  c: jax.Array,
  *,
  causal: bool = True,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Masked [T,T] sums: the statistics and normaliser of each token's visible set."""
  _canonical(x, offsets, c, initial_state, segment_ids, causal)
  b, t, h, d = x.shape
  xf = x.astype(F32)
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  idx = jnp.arange(t)
  same = seg[:, :, None] == seg[:, None, :]
  visible = (same & (idx[:, None] >= idx[None, :])) if causal else same  # [B,T(t),T(s)]
  vis = visible.astype(F32)
  state = init_state(b, h, d) if initial_state is None else initial_state.astype(F32)
  first = (seg == seg[:, :1]).astype(F32)[:, :, None, None, None]  # the carried state's segment
  carried = first * state[:, None]  # [B,T,H,d,4]
  n = jnp.einsum("bts->bt", vis)[:, :, None, None] + carried[..., 0]
  sx = jnp.einsum("bts,bshd->bthd", vis, xf) + carried[..., 1]
  sxx = jnp.einsum("bts,bshd->bthd", vis, xf * xf) + carried[..., 2]
  mean, var = _stats(n, sx, sxx)
  log_m = log_density(xf, mean, var, offsets, c)  # causal: each token with its own prefix
  scores = jnp.where(visible[..., None, None], log_m[:, None], -jnp.inf)  # [B,T,T(s),H,d]
  if causal:
    carried_lse = jnp.where(first[..., 0] > 0, carried[..., 3], -jnp.inf)[:, :, None]
    scores = jnp.concatenate([scores, carried_lse], 2)
  lse = jax.nn.logsumexp(scores, axis=2)
  y = (xf * jnp.exp(log_m - lse)).astype(x.dtype)
  if not return_final_state:
    return y
  final = jnp.stack([n[:, -1], sx[:, -1], sxx[:, -1], lse[:, -1]], -1)
  return y, final


def step(
  state: jax.Array, x: jax.Array, offsets: jax.Array, c: jax.Array, *, reset=None
) -> tuple[jax.Array, jax.Array]:
  """One token (causal): state [B,H,d,4], x [B,H,d]; reset [B] empties the state first."""
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None, None], init_state(*x.shape), state)
  xf = x.astype(F32)
  n, sx, sxx = state[..., 0] + 1, state[..., 1] + xf, state[..., 2] + xf * xf
  log_m = log_density(xf, *_stats(n, sx, sxx), offsets, c)
  lse = jnp.logaddexp(state[..., 3], log_m)
  y = (xf * jnp.exp(log_m - lse)).astype(x.dtype)
  return jnp.stack([n, sx, sxx, lse], -1), y


def recurrent(
  x: jax.Array,
  offsets: jax.Array,
  c: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` (causal only)."""
  _canonical(x, offsets, c, initial_state, segment_ids, True)
  b, t, h, d = x.shape
  s0 = init_state(b, h, d) if initial_state is None else initial_state.astype(F32)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)
  final, y = lax.scan(
    lambda s, inp: step(s, inp[0], offsets, c, reset=inp[1]),
    s0,
    (x.swapaxes(0, 1), reset.swapaxes(0, 1)),
  )
  y = y.swapaxes(0, 1)
  return (y, final) if return_final_state else y


def scan(
  x: jax.Array,
  offsets: jax.Array,
  c: jax.Array,
  *,
  causal: bool = True,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal: segmented associative scans of (n, Σx, Σx²), then of logaddexp over the scores.
  causal=False: the reference's sums (one pass, no [T,T] beyond the segment mask)."""
  _canonical(x, offsets, c, initial_state, segment_ids, causal)
  if not causal:
    return reference(x, offsets, c, causal=False, segment_ids=segment_ids)
  b, t, h, d = x.shape
  xf = x.astype(F32)
  sums = jnp.stack([jnp.ones_like(xf), xf, xf * xf], -1)  # [B,T,H,d,3]
  lse0 = None
  if initial_state is not None:
    sums = sums.at[:, 0].add(initial_state[..., :3].astype(F32))
    lse0 = initial_state[..., 3].astype(F32)
  starts = None if segment_ids is None else segment_starts(segment_ids)
  sums = segmented_scan(jnp.add, sums, starts)
  log_m = log_density(xf, *_stats(sums[..., 0], sums[..., 1], sums[..., 2]), offsets, c)
  scores = log_m if lse0 is None else log_m.at[:, 0].set(jnp.logaddexp(lse0, log_m[:, 0]))
  lse = segmented_scan(jnp.logaddexp, scores, starts)
  y = (xf * jnp.exp(log_m - lse)).astype(x.dtype)
  if not return_final_state:
    return y
  return y, jnp.concatenate([sums[:, -1], lse[:, -1, ..., None]], -1)


@dispatcher.register("xla")
def _xla(**kwargs):
  return scan(**kwargs)


@dispatcher.register("reference")
def _reference(**kwargs):
  return reference(**kwargs)


def gaussian_attention(
  x: jax.Array,
  offsets: jax.Array,
  c: jax.Array,
  *,
  causal: bool = True,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """y [B,T,H,d] (or (y, final_state [B,H,d,4]) when causal). implementation: "auto" | "xla"
  (scans) | "reference"."""
  return dispatcher(
    implementation,
    x=x,
    offsets=offsets,
    c=c,
    causal=causal,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )
