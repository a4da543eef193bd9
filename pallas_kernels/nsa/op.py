"""`selected_attention`: argument checks (`reason`), layout and padding, the dk/dv schedule and
the custom_vjp around the kernels of kernels.py."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common
from pallas_kernels.flash_attention.schedule import schedule_rows

from . import calls, kernels
from .tuning import Tuning, default_tuning

SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MAX_HEAD_DIM = 256


def reason(
  q: jax.Array, k: jax.Array, v: jax.Array, indices: jax.Array, *, block: int, on_device: bool
) -> str | None:
  """Why the kernels cannot serve these arguments, or None (static check, no tracing).
  on_device: compiled (GPU only) rather than in interpret mode."""
  if on_device and jax.default_backend() != "gpu":
    return (
      "the NSA selection kernels lower for GPU (Triton) only "
      f"(backend {jax.default_backend()!r}); use 'interpret' to run them on CPU"
    )
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return (
      "the NSA kernels need q, k, v of one dtype in f32/bf16/f16, got "
      f"{q.dtype}, {k.dtype}, {v.dtype}"
    )
  if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
    return f"the NSA kernels support head dims <= {MAX_HEAD_DIM}, got {q.shape[-1]}/{v.shape[-1]}"
  if block & (block - 1) or (on_device and block < 16):
    return f"the selection block must be a power of two (>= 16 on GPU), got {block}"
  return None


def _static(q, scale, block, groups, interpret, tuning) -> kernels.Static:
  return kernels.Static(
    scale=float(scale),
    block=block,
    groups=groups,
    block_q_dkv=tuning.block_q_dkv,
    dkv_splits=tuning.dkv_splits,
    precise=q.dtype == jnp.float32,
    interpret=bool(interpret),
    fwd=tuning.fwd,
    dq=tuning.dq,
    dkv=tuning.dkv,
  )


def _pad_to(x, axis, size, value=0):
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, size - x.shape[axis])
  return jnp.pad(x, widths, constant_values=value)


def selected_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  q_positions: jax.Array,
  scale: float,
  block: int,
  interpret: bool = False,
  tuning: Tuning | None = None,
) -> tuple[jax.Array, jax.Array]:
  """q[B,T,H,D] attends, per kv head (H/Hkv query heads), to the keys of its selected blocks:
  indices [B,T,Hkv,n] int32 (-1 unused; block j = k/v rows [j block, (j+1) block)) at
  positions <= q_positions [B,T] (a key's position is its row). Returns o[B,T,H,Dv] and lse
  [B,T,H] float32 (natural log, -inf where nothing is visible)."""
  why = reason(q, k, v, indices, block=block, on_device=not interpret)
  if why:
    raise NotImplementedError(why)
  tuning = tuning or default_tuning()
  batch, t, heads, d = q.shape
  tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  groups = heads // kv_heads
  floor = 1 if interpret else 16
  gp, dp, dvp = (common.next_pow2(x, floor) for x in (groups, d, dv))
  n = common.next_pow2(indices.shape[-1])
  tp = common.round_up(t, tuning.block_q_dkv)
  tkp = common.round_up(tk, block)
  cfg = _static(q, scale, block, gp, interpret, tuning)
  qg = _group_rows(q, kv_heads, tp, gp, dp)
  bhtd = lambda x, width: jnp.transpose(_pad_to(_pad_to(x, 1, tkp), 3, width), (0, 2, 1, 3))
  idx = _pad_to(_pad_to(indices.astype(jnp.int32), 3, n, -1), 1, tp, -1)
  idx = jnp.transpose(idx, (0, 2, 1, 3))
  qpos = _pad_to(jnp.broadcast_to(q_positions, (batch, t)).astype(jnp.int32), 1, tp)
  o, lse2 = _selected(qg, bhtd(k, dp), bhtd(v, dvp), (idx, qpos), cfg)
  o = o.reshape(batch, kv_heads, tp, gp, dvp)[:, :, :t, :groups, :dv]
  o = jnp.transpose(o, (0, 2, 1, 3, 4)).reshape(batch, t, heads, dv)
  lse2 = lse2.reshape(batch, kv_heads, tp, gp)[:, :, :t, :groups]
  lse2 = jnp.transpose(lse2, (0, 2, 1, 3)).reshape(batch, t, heads)
  return o, jnp.where(lse2 == jnp.inf, -jnp.inf, lse2 * kernels.LN2)


def _group_rows(x, kv_heads, tp, gp, width, value=0):
  """[B, T, H, ...] -> [B, Hkv, tp * gp, ...]: the query heads of each kv head as rows (row
  t * gp + h), T padded to tp and the group to gp with `value`, a last axis (if any) to width."""
  batch, t, heads = x.shape[:3]
  x = x.reshape(batch, t, kv_heads, heads // kv_heads, *x.shape[3:])
  x = _pad_to(_pad_to(x, 1, tp, value), 3, gp, value)
  if x.ndim == 5:
    x = _pad_to(x, 4, width)
  x = jnp.moveaxis(x, 2, 1)
  return x.reshape(batch, kv_heads, tp * gp, *x.shape[4:])


def _overlap_tile(tile, width, block_cmp, stride, block_slc):
  """float32 [tile, width] x 2: the stride units compressed block c of a tile shares with the
  tile's selection block j (`own`) and with the next tile's (`spill`)."""
  own = np.zeros((tile, 2 * width), np.float32)
  for c in range(tile):
    for u in range(block_cmp // stride):
      own[c, ((c + u) * stride) // block_slc] += 1.0
  return own[:, :width], own[:, width:]


def selection_scores(
  q: jax.Array,
  k_cmp: jax.Array,
  lse: jax.Array,
  q_positions: jax.Array,
  *,
  scale: float,
  block_cmp: int,
  stride: int,
  block_slc: int,
  ns: int,
  interpret: bool = False,
  tuning: Tuning | None = None,
) -> jax.Array:
  """NSA's block importance as one kernel: q [B,T,H,D], compressed keys k_cmp [B,Nc,Hkv,D]
  (block i ends at position i * stride + block_cmp - 1), the compressed branch's lse [B,T,H]
  (natural log, -inf where nothing is visible), q_positions [B,T] -> scores [B,T,Hkv,ns]
  float32: per token and kv head, the compressed attention probabilities of the group's heads,
  summed, each compressed block counted for the selection blocks of block_slc it overlaps, by
  the stride units they share (attnzoo.ops.nsa.block_importance)."""
  tuning = tuning or default_tuning()
  batch, t, heads, d = q.shape
  nc, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  floor = 1 if interpret else 16
  gp, dp = common.next_pow2(heads // kv_heads, floor), common.next_pow2(d, floor)
  width = 16
  tile = width * block_slc // stride
  if tile & (tile - 1) or block_cmp - stride > width * block_slc:
    raise NotImplementedError(
      f"selection scores kernel: block_slc / stride must be a power of two, got {block_slc} / "
      f"{stride}"
    )
  bq = tuning.block_q_scores
  tp = common.round_up(t, bq)
  cfg = _static(q, scale, block_slc, gp, interpret, tuning)
  sc = kernels.Scores(bq, tile, block_cmp, stride, tuning.scores)
  own, spill = _overlap_tile(tile, width, block_cmp, stride, block_slc)
  kc = jnp.moveaxis(_pad_to(_pad_to(k_cmp, 1, common.round_up(max(nc, 1), tile)), 3, dp), 2, 1)
  lse2 = jnp.where(jnp.isfinite(lse), lse / kernels.LN2, jnp.inf)
  qpos = _pad_to(jnp.broadcast_to(q_positions, (batch, t)).astype(jnp.int32), 1, tp)
  out = calls.selection_scores(
    _group_rows(q, kv_heads, tp, gp, dp),
    kc.astype(q.dtype),
    _group_rows(lse2, kv_heads, tp, gp, None, value=jnp.inf),  # padded rows see nothing
    qpos,
    jnp.asarray(own),
    jnp.asarray(spill),
    cfg,
    sc,
  )
  return jnp.moveaxis(out, 1, 2)[:, :t, :, :ns]


def dkv_schedule(idx: jax.Array, n_blocks: int, block_q: int) -> jax.Array:
  """idx [B, Hkv, Tq, n] -> int32 [B, Hkv, n_blocks, 2 + Tq / block_q]: per key block, the
  query tiles of block_q tokens in which some token selected it (schedule.schedule_rows form:
  [0, n_tiles, tiles ascending..., the others])."""
  batch, kv_heads, tq, _ = idx.shape
  n_tiles = tq // block_q
  target = jnp.where(idx >= 0, idx, n_blocks)  # unused slots fall outside: dropped
  b = jnp.arange(batch)[:, None, None, None]
  g = jnp.arange(kv_heads)[None, :, None, None]
  tile = (jnp.arange(tq) // block_q)[None, None, :, None]
  member = jnp.zeros((batch, kv_heads, n_blocks, n_tiles), jnp.int32)
  member = member.at[b, g, target, tile].set(1, mode="drop")
  rows = schedule_rows(member.reshape(batch * kv_heads, n_blocks, n_tiles))
  return rows.reshape(batch, kv_heads, n_blocks, 2 + n_tiles)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _selected(q, k, v, aux, cfg):
  return _selected_fwd(q, k, v, aux, cfg)[0]


def _selected_fwd(q, k, v, aux, cfg):
  idx, qpos = aux
  o, lse2 = calls.forward(q, k, v, idx, qpos, cfg)
  return (o, lse2), (q, k, v, aux, o, lse2)


def _selected_bwd(cfg, res, cts):
  q, k, v, aux, o, lse2 = res
  idx, qpos = aux
  do, dlse2 = cts
  do = do.astype(q.dtype)
  # delta_r = sum_d o*do; an lse cotangent enters as dlogits += p * dlse (natural units)
  delta = jnp.einsum("bgrd,bgrd->bgr", o.astype(jnp.float32), do.astype(jnp.float32))
  delta = delta - dlse2.astype(jnp.float32) / kernels.LN2
  dq = calls.backward_dq(q, k, v, do, lse2, delta, idx, qpos, cfg)
  batch, kv_heads, tq, n = idx.shape
  gp = cfg.groups
  sched = dkv_schedule(idx, k.shape[2] // cfg.block, cfg.block_q_dkv)
  idx_rows = jnp.broadcast_to(idx[:, :, :, None], (batch, kv_heads, tq, gp, n))
  idx_rows = idx_rows.reshape(batch, kv_heads, tq * gp, n)
  qpos_rows = jnp.repeat(qpos, gp, axis=1)
  dk, dv = calls.backward_dkv(q, k, v, do, lse2, delta, idx_rows, qpos_rows, sched, cfg)
  dk, dv = dk.sum(0).astype(k.dtype), dv.sum(0).astype(v.dtype)
  zero_aux = jax.tree.map(lambda x: np.zeros(x.shape, jax.dtypes.float0), aux)
  return dq, dk, dv, zero_aux


_selected.defvjp(_selected_fwd, _selected_bwd)
