"""The pallas_calls of the flash-attention kernels (bodies in kernels.py): launch order,
BlockSpecs of either platform (BTHD blocks for Triton, BHTD for Mosaic TPU; see kernels.py),
and the forward, dq and dk/dv calls."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu_triton

from . import kernels
from .kernels import Static, batch_index

# VMEM limit of the TPU kernels: whole-sequence K/V (forward, dq) or Q/dO (dk/dv) blocks stay
# in VMEM; fits the 64-128 MiB VMEM of v5e/v5p/v6e/v7x.
TPU_VMEM_LIMIT = 48 * 2**20


def _launch(n_tiles, heads, batch, cfg, *, reverse):
  """Grid and program-id decoder for a kernel with one program per (tile, head, batch).

  Triton runs the first grid axis fastest, so programs go out in groups of g heads (g = the
  gcd of head_group and heads): tile by tile, each for all g heads of the group, starting at
  the last tile when `reverse` (query tiles: the most kv tiles under a causal mask) or the
  first (kv tiles: the most query tiles). A TPU core runs the grid in order, last axis
  fastest: grid (head, batch, tile). Returns (grid, ids) with ids(*program_ids) =
  (tile, head, batch).
  """
  if cfg.tpu:
    return (heads, batch, n_tiles), lambda h, b, t: (t, h, b)
  g = math.gcd(cfg.head_group, heads)
  per_batch = heads // g

  def ids(hg, t, r):
    tile = n_tiles - 1 - t if reverse else t
    return tile, (r % per_batch) * g + hg, r // per_batch

  return (g, n_tiles, per_batch * batch), ids


def _spec(ids, block_shape, index_map, single_buffer=False):
  """BlockSpec whose index_map takes (tile, head, batch) instead of the program ids (TPU
  index maps also receive the scalar-prefetched schedule, unused). `single_buffer` (TPU):
  no second VMEM buffer to prefetch the next block into."""
  index = lambda *pid: index_map(*ids(*pid[:3]))
  if single_buffer:
    return pl.BlockSpec(block_shape, index, pipeline_mode=pl.Buffered(1))
  return pl.BlockSpec(block_shape, index)


def _dims(x, cfg):
  """(batch, T, heads, D) of a BTHD (GPU) or BHTD (TPU) array."""
  if cfg.tpu:
    batch, heads, t, d = x.shape
    return batch, t, heads, d
  return x.shape


def _seq_shape(batch, t, heads, d, cfg):
  return (batch, heads, t, d) if cfg.tpu else (batch, t, heads, d)


def _seq_spec(spec, cfg, rows, heads, d, index_map, whole=False):
  """Spec of a [B, T, H, D] (GPU) / [B, H, T, D] (TPU) array: `rows` tokens and `heads` heads
  (None: one, squeezed) per block; index_map(tile, head, batch) -> (batch, row block, head
  block). A `whole`-sequence block changes only with the head: single-buffered on TPU (the
  next head's block loads at the switch, once per tile sweep)."""
  if cfg.tpu:
    return spec((None, heads, rows, d), lambda t, h, b: _bhtd(*index_map(t, h, b)), whole)
  return spec((None, rows, heads, d), lambda t, h, b: _bthd(*index_map(t, h, b)))


def _bthd(b, t, h):
  return b, t, h, 0


def _bhtd(b, t, h):
  return b, h, t, 0


def _token_operand(spec, cfg, arr, rows, *, column, whole=False):
  """Spec and array of a per-token int32 array [B|1, T] (positions, segment ids): the
  program's tile of `rows` tokens, or the `whole` sequence. TPU: a column [B|1, T, 1] or a
  row [B|1, 1, T]."""
  tile_of = (lambda t: 0) if whole else (lambda t: t)
  if not cfg.tpu:
    return spec((None, rows), lambda t, h, b: (batch_index(arr, b), tile_of(t))), arr
  if column:
    return (
      spec((None, rows, 1), lambda t, h, b: (batch_index(arr, b), tile_of(t), 0), whole),
      arr[:, :, None],
    )
  return (
    spec((None, 1, rows), lambda t, h, b: (batch_index(arr, b), 0, tile_of(t)), whole),
    arr[:, None, :],
  )


def _stat_spec(spec, cfg, heads, rows, index_map, *, column, whole=False):
  """Spec of a per-query statistic [B, H, Tq] (lse2, delta); index_map(tile, head, batch) ->
  (batch, head block, row block). TPU: of a column [B, H, Tq, 1] or a row [B, H, 1, Tq]."""
  if not cfg.tpu:
    return spec((None, heads, rows), index_map)
  if column:
    return spec((None, heads, rows, 1), lambda *i: (*index_map(*i), 0), whole)
  return spec((None, heads, 1, rows), lambda *i: _insert_unit(*index_map(*i)), whole)


def _insert_unit(b, h, t):
  return b, h, 0, t


def _stat_operand(spec, cfg, arr, heads, rows, index_map, *, column, whole=False):
  """Spec and array of a per-query statistic (see `_stat_spec`)."""
  if cfg.tpu:
    arr = arr[..., None] if column else arr[:, :, None, :]
  return _stat_spec(spec, cfg, heads, rows, index_map, column=column, whole=whole), arr


def _call(kernel, cfg, suffix, name, grid, ids, operands, sched, scale, out_specs, out_shape):
  """pallas_call of `kernel` over (spec, array) `operands`, the schedule `sched` [B|1, tiles,
  2 + n] and the per-head scale (spec, array) or None.

  Triton: the schedule row and scale are blocks after the operands, launch knobs
  `num_warps{suffix}`, `num_stages{suffix}`. TPU: the schedule is scalar-prefetched into SMEM
  and the scale array lies whole in SMEM.
  """
  in_specs = [s for s, _ in operands]
  args = [a for _, a in operands]
  if cfg.tpu:
    if scale is not None:
      in_specs.append(pl.BlockSpec(memory_space=pltpu.SMEM))
      args.append(scale[1])
    grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=1, grid=grid, in_specs=in_specs, out_specs=out_specs
    )
    params = pltpu.CompilerParams(
      dimension_semantics=("parallel",) * len(grid), vmem_limit_bytes=TPU_VMEM_LIMIT
    )
    return pl.pallas_call(
      kernel,
      grid_spec=grid_spec,
      out_shape=out_shape,
      compiler_params=params,
      name=name,
      interpret=pltpu.InterpretParams() if cfg.interpret else False,
    )(sched, *args)
  in_specs.append(
    _spec(ids, (None, None, sched.shape[-1]), lambda t, h, b: (batch_index(sched, b), t, 0))
  )
  args.append(sched)
  if scale is not None:
    in_specs.append(scale[0])
    args.append(scale[1])
  params = plgpu_triton.CompilerParams(
    num_warps=getattr(cfg, "num_warps" + suffix), num_stages=getattr(cfg, "num_stages" + suffix)
  )
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    compiler_params=params,
    interpret=cfg.interpret,
    name=name,
  )(*args)


def _query_tile_operands(
  spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, tile_stats=()
):
  """(spec, array) operands of a kernel with one query tile per program (forward, dq): the q
  tile, the whole k and v of its kv head, `tile_stats` (more per-tile operands: dO, lse2,
  delta), the positions and segment ids; and the per-head scale operand (None when static)."""
  tk, d, dv = _dims(k, cfg)[1], q.shape[-1], v.shape[-1]
  g = cfg.groups
  operands = [
    (_seq_spec(spec, cfg, bq, None, d, lambda i, h, b: (b, i, h)), q),
    (_seq_spec(spec, cfg, tk, None, d, lambda i, h, b: (b, 0, h // g), whole=True), k),
    (_seq_spec(spec, cfg, tk, None, dv, lambda i, h, b: (b, 0, h // g), whole=True), v),
    *tile_stats,
    _token_operand(spec, cfg, q_pos, bq, column=True),
    _token_operand(spec, cfg, kv_pos, tk, column=False, whole=True),
  ]
  if cfg.has_segments:
    operands += [
      _token_operand(spec, cfg, q_seg, bq, column=True),
      _token_operand(spec, cfg, kv_seg, tk, column=False, whole=True),
    ]
  scale = None
  if cfg.static_scale is None:
    scale = (spec((None,), lambda i, h, b: (h,)), scale_arr)
  return operands, scale


def forward(q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched, cfg: Static):
  """q[B,Tq,H,D] k[B,Tk,Hkv,D] v[B,Tk,Hkv,Dv] -> o[B,Tq,H,Dv], lse2[B,H,Tq] float32.

  On TPU q, k, v and o are BHTD."""
  batch, tq, heads, _ = _dims(q, cfg)
  dv = v.shape[-1]
  bq = cfg.block_q
  grid, ids = _launch(tq // bq, heads, batch, cfg, reverse=True)
  spec = functools.partial(_spec, ids)
  operands, scale = _query_tile_operands(
    spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg
  )
  out_specs = [
    _seq_spec(spec, cfg, bq, None, dv, lambda i, h, b: (b, i, h)),
    _stat_spec(spec, cfg, None, bq, lambda i, h, b: (b, h, i), column=True),
  ]
  out_shape = [
    jax.ShapeDtypeStruct(_seq_shape(batch, tq, heads, dv, cfg), q.dtype),
    jax.ShapeDtypeStruct((batch, heads, tq, 1) if cfg.tpu else (batch, heads, tq), jnp.float32),
  ]
  o, lse2 = _call(
    functools.partial(kernels.fwd_kernel, cfg=cfg, ids=ids),
    cfg,
    "",
    "flash_attention_fwd",
    grid,
    ids,
    operands,
    sched,
    scale,
    out_specs,
    out_shape,
  )
  return o, lse2[..., 0] if cfg.tpu else lse2


def backward_dq(
  q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched, cfg: Static
):
  """dq [B,Tq,H,D] (TPU: BHTD); with a per-head scale array, the unscaled sum (float32)."""
  batch, tq, heads, d = _dims(q, cfg)
  dv = v.shape[-1]
  bq = cfg.block_q_dq
  grid, ids = _launch(tq // bq, heads, batch, cfg, reverse=True)
  spec = functools.partial(_spec, ids)
  tile_stats = [
    (_seq_spec(spec, cfg, bq, None, dv, lambda i, h, b: (b, i, h)), do),
    _stat_operand(spec, cfg, lse2, None, bq, lambda i, h, b: (b, h, i), column=True),
    _stat_operand(spec, cfg, delta, None, bq, lambda i, h, b: (b, h, i), column=True),
  ]
  operands, scale = _query_tile_operands(
    spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, tile_stats
  )
  out_dtype = q.dtype if scale is None else jnp.float32
  return _call(
    functools.partial(kernels.dq_kernel, cfg=cfg, ids=ids),
    cfg,
    "_dq",
    "flash_attention_dq",
    grid,
    ids,
    operands,
    sched,
    scale,
    _seq_spec(spec, cfg, bq, None, d, lambda i, h, b: (b, i, h)),
    jax.ShapeDtypeStruct(q.shape, out_dtype),
  )


def backward_dkv(
  q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched_t, cfg: Static
):
  """dk [B,Tk,Hkv,D], dv [B,Tk,Hkv,Dv] (TPU: BHTD); sums over the query heads of each kv
  head."""
  batch, tq, heads, d = _dims(q, cfg)
  _, tk, kv_heads, _ = _dims(k, cfg)
  dv = v.shape[-1]
  bk = cfg.block_k_dkv
  g = cfg.groups
  grid, ids = _launch(tk // bk, kv_heads, batch, cfg, reverse=False)
  spec = functools.partial(_spec, ids)
  operands = [
    (_seq_spec(spec, cfg, tq, g, d, lambda j, hk, b: (b, 0, hk), whole=True), q),
    (_seq_spec(spec, cfg, bk, None, d, lambda j, hk, b: (b, j, hk)), k),
    (_seq_spec(spec, cfg, bk, None, dv, lambda j, hk, b: (b, j, hk)), v),
    (_seq_spec(spec, cfg, tq, g, dv, lambda j, hk, b: (b, 0, hk), whole=True), do),
    _stat_operand(spec, cfg, lse2, g, tq, lambda j, hk, b: (b, hk, 0), column=False, whole=True),
    _stat_operand(spec, cfg, delta, g, tq, lambda j, hk, b: (b, hk, 0), column=False, whole=True),
    _token_operand(spec, cfg, q_pos, tq, column=False, whole=True),
    _token_operand(spec, cfg, kv_pos, bk, column=True),
  ]
  if cfg.has_segments:
    operands += [
      _token_operand(spec, cfg, q_seg, tq, column=False, whole=True),
      _token_operand(spec, cfg, kv_seg, bk, column=True),
    ]
  scale = None
  if cfg.static_scale is None:
    scale = (spec((None, g), lambda j, hk, b: (hk, 0)), scale_arr.reshape(kv_heads, g))
  out_specs = [
    _seq_spec(spec, cfg, bk, None, d, lambda j, hk, b: (b, j, hk)),
    _seq_spec(spec, cfg, bk, None, dv, lambda j, hk, b: (b, j, hk)),
  ]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  return _call(
    functools.partial(kernels.dkv_kernel, cfg=cfg, ids=ids),
    cfg,
    "_dkv",
    "flash_attention_dkv",
    grid,
    ids,
    operands,
    sched_t,
    scale,
    out_specs,
    out_shape,
  )
