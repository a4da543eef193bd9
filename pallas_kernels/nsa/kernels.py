"""NSA selected-attention kernels (forward, dq, dk/dv) and their pallas_calls (Triton on GPU,
interpret mode on CPU).

Layouts (op.py prepares them): the query heads of one kv head ("group", padded to a power of
two `groups`) are rows: q, o, dO [B, Hkv, Tq*groups, D] with row t*groups + h, lse2 and delta
[B, Hkv, Tq*groups]; k, v [B, Hkv, Tk, D] (Tk a multiple of `block`); indices [B, Hkv, Tq, n]
(ascending, -1 unused, so the valid ones come first); query positions [B, Tq]. Logits are base
2 (s2 = log2(e) * scale * q.k); lse2 = log2 sum 2^s2, +inf on rows that see nothing.

- forward / dq: one program per (token, kv head, batch), group-centric as in the paper: the
  group's query rows [groups, D] against each selected block of `block` keys in turn (online
  softmax; dq recomputes p from lse2).
- dk/dv: `dkv_splits` programs per (key block, kv head, batch), each over its share of the query
  tiles (block_q_dkv tokens, all their group rows) listed in the block's schedule row [-,
  n_tiles, tiles...] (tiles with at least one token that selected the block), masking the
  other tokens; float32 partial sums, added up by op.py.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels import common

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Static:
  """Static description of one call (hashable; a custom_vjp nondiff argument)."""

  scale: float
  block: int  # keys per selected block
  groups: int  # query rows per (token, kv head): the padded group size
  block_q_dkv: int  # query tokens per dk/dv step
  dkv_splits: int  # dk/dv programs per key block
  precise: bool  # float32 inputs: IEEE float32 dots
  interpret: bool
  fwd: tuple[int, int]
  dq: tuple[int, int]
  dkv: tuple[int, int]


def _dot(a, b, cfg, **kw):
  return common.dot(a, b, precision=lax.Precision.HIGHEST if cfg.precise else None, **kw)


def _logits2(q, k, cfg):
  return _dot(q, k, cfg, trans_b=True) * (cfg.scale * LOG2E)


def _key_block(ref, blk, cfg):
  start = pl.multiple_of(blk * cfg.block, cfg.block)
  return ref[pl.ds(start, cfg.block), :], start + jnp.arange(cfg.block)[None, :]


def fwd_kernel(q_ref, k_ref, v_ref, idx_ref, qpos_ref, o_ref, lse_ref, *, cfg: Static):
  q = q_ref[...]
  pos = qpos_ref[pl.program_id(0)]
  count = jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))

  def body(i, carry):
    acc, m, l = carry
    k, kpos = _key_block(k_ref, idx_ref[i], cfg)
    v, _ = _key_block(v_ref, idx_ref[i], cfg)
    s = jnp.where(kpos <= pos, _logits2(q, k, cfg), -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, cfg)
    return acc, m_new, l

  rows = q.shape[0]
  carry = (
    jnp.zeros((rows, v_ref.shape[-1]), jnp.float32),
    jnp.full((rows,), -jnp.inf, jnp.float32),
    jnp.zeros((rows,), jnp.float32),
  )
  acc, m, l = lax.fori_loop(0, count, body, carry)
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))


def dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, idx_ref, qpos_ref, dq_ref, *, cfg):
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  pos = qpos_ref[pl.program_id(0)]
  count = jnp.sum((idx_ref[...] >= 0).astype(jnp.int32))

  def body(i, dq):
    k, kpos = _key_block(k_ref, idx_ref[i], cfg)
    v, _ = _key_block(v_ref, idx_ref[i], cfg)
    p = jnp.where(kpos <= pos, jnp.exp2(_logits2(q, k, cfg) - lse[:, None]), 0.0)
    ds = p * (_dot(do, v, cfg, trans_b=True) - delta[:, None])
    return dq + _dot(ds.astype(k.dtype), k, cfg)

  dq = lax.fori_loop(0, count, body, jnp.zeros(q.shape, jnp.float32))
  dq_ref[...] = (dq * cfg.scale).astype(dq_ref.dtype)


def dkv_kernel(
  q_ref,
  k_ref,
  v_ref,
  do_ref,
  lse_ref,
  delta_ref,
  idx_ref,
  qpos_ref,
  sched_ref,
  dk_ref,
  dv_ref,
  *,
  cfg,
):
  j = pl.program_id(1) // cfg.dkv_splits
  split = pl.program_id(1) % cfg.dkv_splits
  k, v = k_ref[...], v_ref[...]
  kpos = j * cfg.block + jnp.arange(cfg.block)[:, None]  # [block, 1]
  rows = cfg.block_q_dkv * cfg.groups

  def body(i, carry):
    dk, dv = carry
    r0 = pl.multiple_of(sched_ref[2 + i] * rows, rows)
    span = pl.ds(r0, rows)
    q, do = q_ref[span, :], do_ref[span, :]
    lse, delta, qpos = lse_ref[span], delta_ref[span], qpos_ref[span]
    member = jnp.sum((idx_ref[span, :] == j).astype(jnp.int32), axis=1) > 0
    mask = member[None, :] & (kpos <= qpos[None, :])  # [block, rows]
    p = jnp.where(mask, jnp.exp2(_logits2(k, q, cfg) - lse[None, :]), 0.0)
    dv = dv + _dot(p.astype(do.dtype), do, cfg)
    ds = p * (_dot(v, do, cfg, trans_b=True) - delta[None, :])
    return dk + _dot(ds.astype(q.dtype), q, cfg), dv

  # this program's share of the block's query tiles
  n = sched_ref[1]
  share = (n + cfg.dkv_splits - 1) // cfg.dkv_splits
  lo = jnp.minimum(split * share, n)
  hi = jnp.minimum(lo + share, n)
  zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
  dk, dv = lax.fori_loop(lo, hi, body, (zeros(k), zeros(v)))
  dk_ref[...] = dk * cfg.scale
  dv_ref[...] = dv


def scores_kernel(q_ref, kc_ref, lse_ref, qpos_ref, w_ref, spill_ref, out_ref, *, cfg, sc):
  """Selection scores of one tile of sc.block_q tokens and one kv head: the compressed
  attention probabilities p = 2^(s2 - lse2) of the group's query rows, summed per token (a dot
  with a 0/1 token-of-row matrix), mapped onto selection blocks (dots with the overlap weights
  of one tile of compressed blocks: `w` into the tile's own selection blocks, `spill` into the
  next tile's, carried), tile by tile over the compressed blocks that any token sees."""
  q, lse, qpos = q_ref[...], lse_ref[...], qpos_ref[...]
  rows = q.shape[0]
  tokens = jnp.arange(sc.block_q)[:, None]
  row_pos = jnp.arange(rows)[None, :] // cfg.groups
  to_tokens = (row_pos == tokens).astype(jnp.float32)  # [block_q, rows]
  # the position of each row's token, as a column: to_tokens^T @ qpos
  qpos_rows = jnp.sum(jnp.where(row_pos == tokens, qpos[:, None], 0), axis=0)  # [rows]
  visible = jnp.maximum(0, (jnp.max(qpos) - sc.block_cmp + 1) // sc.stride + 1)
  n_tiles = jnp.minimum((visible + sc.tile - 1) // sc.tile, kc_ref.shape[0] // sc.tile)
  w, spill = w_ref[...], spill_ref[...]
  width = w.shape[1]
  columns = lambda i: (slice(None), pl.ds(pl.multiple_of(i * width, width), width))

  def body(i, carry):
    start = pl.multiple_of(i * sc.tile, sc.tile)
    kc = kc_ref[pl.ds(start, sc.tile), :]
    ends = (start + jnp.arange(sc.tile)[None, :]) * sc.stride + sc.block_cmp - 1
    p = jnp.where(ends <= qpos_rows[:, None], jnp.exp2(_logits2(q, kc, cfg) - lse[:, None]), 0.0)
    per_token = common.dot(to_tokens, p)  # [block_q, tile]
    out_ref[columns(i)] = common.dot(per_token, w) + carry
    return common.dot(per_token, spill)

  zeros = jnp.zeros((sc.block_q, width), jnp.float32)
  out_ref[columns(n_tiles)] = lax.fori_loop(0, n_tiles, body, zeros)

  def clear(i, _):  # selection blocks no token of the tile can see yet
    out_ref[columns(i)] = zeros
    return 0

  lax.fori_loop(n_tiles + 1, out_ref.shape[1] // width, clear, 0)


# ----------------------------------------------------------------------------- pallas_calls


def _call(kernel, cfg, launch, name, grid, in_specs, out_specs, out_shape, args):
  kwargs = {"interpret": True} if cfg.interpret else {}
  if not cfg.interpret:
    kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=launch[0], num_stages=launch[1])
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    name=name,
    **kwargs,
  )(*args)


def _per_token_specs(cfg, q, k, v, idx, qpos, extra=()):
  """Specs of a per-token program (t, g, b): the token's group rows of q (and of `extra` row
  arrays: dO [.., D] or per-row statistics), the whole k, v of its kv head, its indices and
  the query positions."""
  g_rows = cfg.groups
  row_spec = lambda a: (
    pl.BlockSpec((None, None, g_rows, a.shape[-1]), lambda t, g, b: (b, g, t, 0))
    if a.ndim == 4
    else pl.BlockSpec((None, None, g_rows), lambda t, g, b: (b, g, t))
  )
  whole = lambda a: pl.BlockSpec((None, None) + a.shape[2:], lambda t, g, b: (b, g, 0, 0))
  return [
    row_spec(q),
    whole(k),
    whole(v),
    *(row_spec(a) for a in extra),
    pl.BlockSpec((None, None, None, idx.shape[-1]), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, qpos.shape[1]), lambda t, g, b: (b, 0)),
  ]


def forward(q, k, v, idx, qpos, cfg: Static):
  """-> o [B, Hkv, Tq*groups, Dv] (q's dtype), lse2 [B, Hkv, Tq*groups] float32."""
  batch, kv_heads, n_rows, _ = q.shape
  tq = idx.shape[2]
  dv = v.shape[-1]
  out_specs = [
    pl.BlockSpec((None, None, cfg.groups, dv), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, None, cfg.groups), lambda t, g, b: (b, g, t)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((batch, kv_heads, n_rows, dv), q.dtype),
    jax.ShapeDtypeStruct((batch, kv_heads, n_rows), jnp.float32),
  ]
  return _call(
    fwd_kernel,
    cfg,
    cfg.fwd,
    "nsa_selected_fwd",
    (tq, kv_heads, batch),
    _per_token_specs(cfg, q, k, v, idx, qpos),
    out_specs,
    out_shape,
    (q, k, v, idx, qpos),
  )


def backward_dq(q, k, v, do, lse2, delta, idx, qpos, cfg: Static):
  batch, kv_heads, _, d = q.shape
  tq = idx.shape[2]
  return _call(
    dq_kernel,
    cfg,
    cfg.dq,
    "nsa_selected_dq",
    (tq, kv_heads, batch),
    _per_token_specs(cfg, q, k, v, idx, qpos, extra=(do, lse2, delta)),
    pl.BlockSpec((None, None, cfg.groups, d), lambda t, g, b: (b, g, t, 0)),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    (q, k, v, do, lse2, delta, idx, qpos),
  )


def backward_dkv(q, k, v, do, lse2, delta, idx_rows, qpos_rows, sched, cfg: Static):
  """idx_rows [B, Hkv, Tq*groups, n] and qpos_rows [B, Tq*groups]: indices and positions per
  query row; sched [B, Hkv, n_blocks, 2 + n_tiles]. Returns float32 partial dk, dv [splits, B,
  Hkv, Tk, D] (their sum over the first axis is the gradient)."""
  batch, kv_heads, tk, _ = k.shape
  splits = cfg.dkv_splits
  whole = lambda a: pl.BlockSpec(
    (None, None) + a.shape[2:], lambda g, js, b: (b, g) + (0,) * (a.ndim - 2)
  )
  own = lambda a: pl.BlockSpec(
    (None, None, cfg.block, a.shape[-1]), lambda g, js, b: (b, g, js // splits, 0)
  )
  part = lambda a: pl.BlockSpec(
    (None, None, None, cfg.block, a.shape[-1]),
    lambda g, js, b: (js % splits, b, g, js // splits, 0),
  )
  in_specs = [
    whole(q),
    own(k),
    own(v),
    whole(do),
    whole(lse2),
    whole(delta),
    whole(idx_rows),
    pl.BlockSpec((None, qpos_rows.shape[1]), lambda g, js, b: (b, 0)),
    pl.BlockSpec((None, None, None, sched.shape[-1]), lambda g, js, b: (b, g, js // splits, 0)),
  ]
  shape = lambda a: jax.ShapeDtypeStruct((splits,) + a.shape, jnp.float32)
  return _call(
    dkv_kernel,
    cfg,
    cfg.dkv,
    "nsa_selected_dkv",
    (kv_heads, (tk // cfg.block) * splits, batch),  # kv heads fastest
    in_specs,
    [part(k), part(v)],
    [shape(k), shape(v)],
    (q, k, v, do, lse2, delta, idx_rows, qpos_rows, sched),
  )


@dataclasses.dataclass(frozen=True)
class Scores:
  """Static description of a selection-scores call (beside `Static`)."""

  block_q: int  # query tokens per program
  tile: int  # compressed blocks per step
  block_cmp: int
  stride: int
  launch: tuple[int, int]


def selection_scores(q, kc, lse2, qpos, w, spill, cfg: Static, sc: Scores):
  """q rows [B, Hkv, Tq*groups, D], kc [B, Hkv, Nc, D] (Nc a multiple of sc.tile), lse2 rows
  (+inf where a row sees nothing), qpos [B, Tq], overlap weights w, spill [tile, width] ->
  scores [B, Hkv, Tq, (Nc / tile + 1) * width] float32."""
  batch, kv_heads, _, d = q.shape
  tq = qpos.shape[1]
  rows = sc.block_q * cfg.groups
  width = w.shape[1]
  n_out = (kc.shape[2] // sc.tile + 1) * width
  in_specs = [
    pl.BlockSpec((None, None, rows, d), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, None) + kc.shape[2:], lambda t, g, b: (b, g, 0, 0)),
    pl.BlockSpec((None, None, rows), lambda t, g, b: (b, g, t)),
    pl.BlockSpec((None, sc.block_q), lambda t, g, b: (b, t)),
    pl.BlockSpec(w.shape, lambda t, g, b: (0, 0)),
    pl.BlockSpec(spill.shape, lambda t, g, b: (0, 0)),
  ]
  return _call(
    functools.partial(scores_kernel, sc=sc),
    cfg,
    sc.launch,
    "nsa_selection_scores",
    (tq // sc.block_q, kv_heads, batch),
    in_specs,
    pl.BlockSpec((None, None, sc.block_q, n_out), lambda t, g, b: (b, g, t, 0)),
    jax.ShapeDtypeStruct((batch, kv_heads, tq, n_out), jnp.float32),
    (q, kc, lse2, qpos, w, spill),
  )
