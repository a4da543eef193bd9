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


def _mix(v, w, bias):
  """y[b,t,c] = bias[g,t] + sum_s w[g,t,s] v[b,s,c] with g = c // (C/G); w [G,T,S] or, per
  example, [G,B,T,S] (masked already), bias [G,T] or [G,B,T]."""
  b, _, c = v.shape
  groups = w.shape[0]
  vg = v.astype(F32).reshape(b, v.shape[1], groups, c // groups)
  spec = "gts,bsgc->btgc" if w.ndim == 3 else "gbts,bsgc->btgc"
  y = jnp.einsum(spec, w.astype(F32), vg, precision=_HI)
  bias = jnp.moveaxis(bias.astype(F32), 0, -1)  # [T,G] or [B,T,G]
  return (y + bias[..., None]).reshape(b, y.shape[1], c)


def reference(
  v: jax.Array, weight: jax.Array, bias: jax.Array, *, segment_ids: jax.Array | None = None
) -> jax.Array:
  """The masked mixing of the module docstring, float32 inside; returns v's dtype."""
  _check(v, weight, bias)
  t = v.shape[1]
  causal = jnp.tril(jnp.ones((t, t), bool))
  if segment_ids is None:
    w = jnp.where(causal, weight[:, :t, :t], 0.0)
    return _mix(v, w, bias[:, :t]).astype(v.dtype)
  pos = position_in_segment(segment_ids)  # rows and columns at positions inside the segment
  visible = causal & (segment_ids[:, :, None] == segment_ids[:, None, :])
  w = jnp.where(visible, weight[:, pos[:, :, None], pos[:, None, :]], 0.0)
  return _mix(v, w, bias[:, pos]).astype(v.dtype)


spatial_mix = reference


def decode_window(
  state: dict[str, jax.Array], v: jax.Array, weight: jax.Array, bias: jax.Array
) -> tuple[dict[str, jax.Array], jax.Array]:
  """Appends v [B,n,C] to the cache (every past v, [B,S,C], and the count) and returns y for
  those n positions: O(n S)."""
  buf, index = state["inputs"], state["index"]
  n, length = v.shape[1], buf.shape[1]
  buf = jax.lax.dynamic_update_slice_in_dim(buf, v.astype(F32), index, axis=1)
  rows = jax.lax.dynamic_slice_in_dim(weight[:, :, :length], index, n, axis=1)  # [G,n,S]
  visible = jnp.arange(length)[None, :] <= index + jnp.arange(n)[:, None]
  y = _mix(buf, jnp.where(visible, rows, 0.0), jax.lax.dynamic_slice_in_dim(bias, index, n, 1))
  return {"inputs": buf, "index": index + n}, y.astype(v.dtype)
