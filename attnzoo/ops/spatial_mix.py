"""Causal token mixing by learned position-by-position matrices (gMLP's spatial projection,
Liu et al. 2021, and sMLP's sMoE experts, Yu et al. 2022), layout channels last:

  y_t[c] = bias[g(c), t] + sum_{s <= t} W[g(c), t, s] v_s[c]

v [B,T,C], W [G,L,L] (one matrix per group of C/G consecutive channels, g(c) = c // (C/G);
only s <= t is read: the causal mask), bias [G,L]; L >= T. With `segment_ids` each packed
segment is mixed on its own, with positions counted from its first token.

`reference` (a masked einsum, float32; O(T^2 C)) is also the training form: there is no faster
exact one for a general matrix. Decoding (`decode_window`) keeps every past v (the naive cache of
attnzoo.ops.long_conv, `init_state`): O(t) per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.ops.long_conv import init_state
from attnzoo.ops.segments import position_in_segment

F32 = jnp.float32
_HI = jax.lax.Precision.HIGHEST

__all__ = ["decode_window", "init_state", "reference", "spatial_mix"]


def _check(v, weight, bias):
  groups, length = weight.shape[0], weight.shape[1]
  if v.ndim != 3 or weight.shape != (groups, length, length) or bias.shape != (groups, length):
    raise ValueError(
      f"spatial_mix wants v [B,T,C], weight [G,L,L], bias [G,L]; got v{v.shape} "
      f"weight{weight.shape} bias{bias.shape}"
    )
  if v.shape[2] % groups:
    raise ValueError(f"spatial_mix: {groups} groups do not divide {v.shape[2]} channels")
  if v.shape[1] > length:
    raise ValueError(f"spatial_mix: the sequence ({v.shape[1]}) is longer than L ({length})")


def _mix(v, weight, bias, rows, cols, visible):
  """y[b,t,c] = bias[g,rows[b,t]] + sum_s visible[b,t,s] W[g, rows[b,t], cols[b,s]] v[b,s,c]."""
  b, _, c = v.shape
  t = rows.shape[1]
  groups = weight.shape[0]
  w = weight.astype(F32)[:, rows[:, :, None], cols[:, None, :]]  # [G,B,T,S]
  w = jnp.where(visible[None], w, 0.0)
  vg = v.astype(F32).reshape(b, v.shape[1], groups, c // groups)
  y = jnp.einsum("gbts,bsgc->btgc", w, vg, precision=_HI)
  y = y + jnp.moveaxis(bias.astype(F32)[:, rows], 0, -1)[..., None]
  return y.reshape(b, t, c)


def reference(
  v: jax.Array, weight: jax.Array, bias: jax.Array, *, segment_ids: jax.Array | None = None
) -> jax.Array:
  """The masked mixing of the module docstring, float32 inside; returns v's dtype."""
  _check(v, weight, bias)
  b, t, _ = v.shape
  causal = jnp.tril(jnp.ones((t, t), bool))[None]
  if segment_ids is None:
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    visible = causal
  else:
    pos = position_in_segment(segment_ids)
    visible = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
  return _mix(v, weight, bias, pos, pos, visible).astype(v.dtype)


spatial_mix = reference


def decode_window(
  state: dict[str, jax.Array], v: jax.Array, weight: jax.Array, bias: jax.Array
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Appends v [B,n,C] to the cache (every past v, [B,S,C], and the count) and returns y for
  those n positions: O(n S)."""
  buf, index = state["inputs"], state["index"]
  n, length = v.shape[1], buf.shape[1]
  buf = jax.lax.dynamic_update_slice_in_dim(buf, v.astype(F32), index, axis=1)
  rows = jnp.broadcast_to(index + jnp.arange(n), (v.shape[0], n))
  cols = jnp.broadcast_to(jnp.arange(length), (v.shape[0], length))
  visible = (cols[:, None, :] <= rows[:, :, None]) & (cols[:, None, :] < length)
  y = _mix(buf, weight, bias, jnp.minimum(rows, length - 1), cols, visible)
  return {"inputs": buf, "index": index + n}, y.astype(v.dtype)
