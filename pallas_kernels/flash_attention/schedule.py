"""The mask rule per token pair (`visible`) and block-sparse tile schedules, computed in XLA
before the kernels run.

For every (query tile, kv tile) pair the mask structure decides a kind: 0 = nothing visible
(skipped), 1 = partly visible (the kernel applies the token mask), 2 = fully visible (no mask
work). The decision is conservative: it uses per-tile min/max of positions and segment ids,
so a tile is only skipped when no pair in it can be visible, and only called full when every
pair is visible.

A schedule row for query tile i lists the kv tiles to visit: `[n_full, n_visible,
full tiles..., partial tiles..., skipped tiles...]`; the kernels run one loop over the full
tiles without masking and one over the partial tiles with masking. The dk/dv kernel uses the
transposed schedule (per kv tile, the query tiles).

`tile_kinds` and `schedule_rows` take `xp` (numpy or jax.numpy): with default positions and no
segments or block mask the schedule depends only on static shapes, and is computed with numpy
while tracing (a constant: no XLA work per call).
"""

from __future__ import annotations

import jax.numpy as jnp

from pallas_kernels.common import EMPTY

_BIG = 2**31 - 1
_SMALL = -(2**31)


def visible(q_pos, kv_pos, q_seg, kv_seg, *, causal, window):
  """Whether keys at kv_pos are visible to queries at q_pos (broadcastable arrays), the rule of
  attnzoo.ops.softmax_attention: no empty slot (EMPTY), causal, window=(left, right), and the
  same segment unless q_seg is None."""
  mask = kv_pos != EMPTY
  if causal:
    mask &= kv_pos <= q_pos
  if window is not None:
    left, right = window
    mask &= (kv_pos >= q_pos - left) & (kv_pos <= q_pos + right)
  if q_seg is not None:
    mask &= q_seg == kv_seg
  return mask


def tile_kinds(
  q_pos, kv_pos, q_seg, kv_seg, *, block_q, block_k, causal, window, user_tiles=None, xp=jnp
):
  """int32 [B, nq, nk] tile kinds. Inputs are already padded to whole tiles."""
  batch, tq = q_pos.shape
  tk = kv_pos.shape[1]
  nq, nk = tq // block_q, tk // block_k
  qp = q_pos.reshape(batch, nq, block_q)
  qmin = qp.min(-1)[:, :, None]
  qmax = qp.max(-1)[:, :, None]
  kp = kv_pos.reshape(batch, nk, block_k)
  valid = kp != EMPTY
  kmin = xp.where(valid, kp, _BIG).min(-1)[:, None, :]
  kmax = xp.where(valid, kp, _SMALL).max(-1)[:, None, :]
  visible = xp.broadcast_to(valid.any(-1)[:, None, :], (batch, nq, nk))
  full = xp.broadcast_to(valid.all(-1)[:, None, :], (batch, nq, nk))
  if causal:
    visible = visible & (kmin <= qmax)
    full = full & (kmax <= qmin)
  if window is not None:
    left, right = window
    visible = visible & (kmax >= qmin - left) & (kmin <= qmax + right)
    full = full & (kmin >= qmax - left) & (kmax <= qmin + right)
  if q_seg is not None:
    qs = q_seg.reshape(batch, nq, block_q)
    ks = kv_seg.reshape(batch, nk, block_k)
    sqmin, sqmax = qs.min(-1)[:, :, None], qs.max(-1)[:, :, None]
    skmin, skmax = ks.min(-1)[:, None, :], ks.max(-1)[:, None, :]
    visible = visible & (skmin <= sqmax) & (sqmin <= skmax)
    full = full & (sqmin == sqmax) & (skmin == skmax) & (sqmin == skmin)
  if user_tiles is not None:
    visible = visible & user_tiles
  return xp.where(visible, xp.where(full, 2, 1), 0).astype(xp.int32)


def user_tiles(block_mask, block_mask_size, *, batch, nq, nk, block_q, block_k):
  """Maps a user block mask [B|1, nqu, nku] (blocks of block_mask_size) onto kernel tiles.

  Kernel tiles must divide the user blocks, so each tile lies in exactly one user block.
  """
  ubq, ubk = block_mask_size
  qi = (jnp.arange(nq) * block_q) // ubq
  ki = (jnp.arange(nk) * block_k) // ubk
  m = jnp.asarray(block_mask, bool)
  qi = jnp.minimum(qi, m.shape[1] - 1)
  ki = jnp.minimum(ki, m.shape[2] - 1)
  tiles = m[:, qi][:, :, ki]
  return jnp.broadcast_to(tiles, (batch, nq, nk))


def schedule_rows(kinds, xp=jnp):
  """[B, n_rows, n_cols] kinds -> int32 [B, n_rows, 2 + n_cols] schedule rows."""
  order = xp.argsort(2 - kinds, axis=-1, stable=True).astype(xp.int32)
  n_full = (kinds == 2).sum(-1, dtype=xp.int32)[..., None]
  n_vis = (kinds > 0).sum(-1, dtype=xp.int32)[..., None]
  return xp.concatenate([n_full, n_vis, order], axis=-1)


def visible_fraction(kinds):
  """Fraction of tiles the kernel visits (for reporting)."""
  return (kinds > 0).mean()
