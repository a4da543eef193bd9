"""The pure-jnp twin of the kernels' algorithm ("xla" in attnzoo.ops.selective_scan) and the
discretisation every form shares.

  dt_t = softplus(delta_t + delta_bias)          (or delta_t + delta_bias without softplus)
  h_t = exp(dt_t A) * keep_t * h_{t-1} + (dt_t x_t) B_t,    y_t = C_t . h_t + D x_t

per channel d (state [D, N], float32); keep_t = 0 where a packed segment starts. `chunked`
walks the sequence in chunks with lax.scan, solving each chunk by lax.associative_scan on a
[B, C, D, N] block and rematerialising it in the backward (jax.checkpoint), so only the
chunk-entry states [B, T/C, D, N] are kept: memory linear in T with a small constant, like
the kernels (which store the same chunk-entry states for their backward).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

F32 = jnp.float32


def discretize(delta, delta_bias=None, delta_softplus=True):
  """dt [B,T,D] float32 from the raw delta."""
  dt = delta.astype(F32)
  if delta_bias is not None:
    dt = dt + delta_bias.astype(F32)
  return jax.nn.softplus(dt) if delta_softplus else dt


def _combine(left, right):
  a1, b1 = left
  a2, b2 = right
  return a1 * a2, a2 * b1 + b2


def block_scan(dt, x, A, B, C, keep, h0):
  """One block of the recurrence by lax.associative_scan over its L steps: dt, x [B,L,D],
  A [D,N], B, C [B,L,N], keep [B,L] float or None, h0 [B,D,N] float32. Materialises
  [B,L,D,N]. Returns (y [B,L,D] float32 without the D skip, h_L [B,D,N])."""
  decay = jnp.exp(dt[..., None] * A.astype(F32))
  if keep is not None:
    decay = decay * keep[:, :, None, None]
  u = (dt * x.astype(F32))[..., None] * B.astype(F32)[:, :, None, :]
  a, b = lax.associative_scan(_combine, (decay, u), axis=1)
  h = a * h0[:, None] + b
  y = jnp.einsum("bldn,bln->bld", h, C.astype(F32))
  return y, h[:, -1]


def keep_mask(segment_ids, t_padded=None):
  """float32 [B,T'] (1: carry the state, 0: a segment starts), padded with ones; None when
  there are no segments."""
  if segment_ids is None:
    return None
  keep = 1.0 - common.segment_starts(segment_ids).astype(F32)
  if t_padded is not None:
    keep = jnp.pad(keep, ((0, 0), (0, t_padded - keep.shape[1])), constant_values=1.0)
  return keep


def chunked(
  x,
  delta,
  A,
  B,
  C,
  D=None,
  *,
  delta_bias=None,
  delta_softplus=True,
  initial_state=None,
  segment_ids=None,
  chunk=64,
):
  """Selective scan in chunks (module docstring). x, delta [B,T,D], A [D,N], B, C [B,T,N],
  D [D] or None, delta_bias [D] or None, initial_state [B,D,N] or None, segment_ids [B,T] or
  None. Returns (y [B,T,D] in x's dtype, final_state [B,D,N] float32)."""
  b, t, d = x.shape
  n = A.shape[-1]
  c = min(chunk, t)
  tp = common.round_up(t, c)
  pad = lambda z: jnp.pad(z, ((0, 0), (0, tp - t), (0, 0)))
  dt = pad(discretize(delta, delta_bias, delta_softplus))  # zero dt: padding keeps the state
  keep = keep_mask(segment_ids, tp)
  h0 = jnp.zeros((b, d, n), F32) if initial_state is None else initial_state.astype(F32)
  split = lambda z: (
    None if z is None else jnp.moveaxis(z.reshape(b, tp // c, c, *z.shape[2:]), 1, 0)
  )
  xs = (split(dt), split(pad(x)), split(pad(B)), split(pad(C)), split(keep))

  @jax.checkpoint
  def body(h, inputs):
    dt_c, x_c, b_c, c_c, keep_c = inputs
    y, h = block_scan(dt_c, x_c, A, b_c, c_c, keep_c, h)
    return h, y

  final, y = lax.scan(body, h0, xs)
  y = jnp.moveaxis(y, 0, 1).reshape(b, tp, d)[:, :t]
  if D is not None:
    y = y + D.astype(F32) * x.astype(F32)
  return y.astype(x.dtype), final
