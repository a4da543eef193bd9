"""NSA kernel bodies: selected attention (forward, dq, dk/dv) and the selection scores; their
pallas_calls are in calls.py (Triton on GPU, interpret mode on CPU).

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
- selection scores (forward only): one program per (tile of tokens, kv head, batch); see
  `scores_kernel`.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

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
    per_token = _dot(to_tokens, p, cfg)  # [block_q, tile]
    out_ref[columns(i)] = _dot(per_token, w, cfg) + carry
    return _dot(per_token, spill, cfg)

  zeros = jnp.zeros((sc.block_q, width), jnp.float32)
  out_ref[columns(n_tiles)] = lax.fori_loop(0, n_tiles, body, zeros)

  def clear(i, _):  # selection blocks no token of the tile can see yet
    out_ref[columns(i)] = zeros
    return 0

  lax.fori_loop(n_tiles + 1, out_ref.shape[1] // width, clear, 0)


@dataclasses.dataclass(frozen=True)
class Scores:
  """Static description of a selection-scores call (beside `Static`)."""

  block_q: int  # query tokens per program
  tile: int  # compressed blocks per step
  block_cmp: int
  stride: int
  launch: tuple[int, int]
