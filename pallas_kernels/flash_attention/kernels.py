"""Pallas kernels: forward (online softmax), dq, dk/dv; lowered to Triton (GPU) or Mosaic (TPU).

All kernels work on padded arrays (every T a multiple of its tiles, head dims powers of two;
TPU: multiples of 128) and on base-2 logits: s2 = log2(e) * scale * q.k (or log2(e) * softcap
* tanh(scale*q.k / softcap)), so the forward stores lse2 = log2(sum 2^s2) and the backward
recomputes p = 2^(s2 - lse2). A row with no visible key has lse2 = +inf internally (p = 0
everywhere).

Every kernel has one program per (tile, head, batch); `_launch` orders them (heaviest tiles
first within groups of heads). Per-row arrays (positions, segments, schedules) may have batch
size 1, shared by the whole batch.

One kernel body serves both platforms; `KernelConfig.tpu` picks the Mosaic TPU form:
- layout BHTD (blocks (None, heads, rows, D), whose last two dims satisfy Mosaic's (8, 128)
  tiling) instead of BTHD;
- per-token vectors as 2-D columns [rows, 1] (query side of the forward and dq, kv side of
  dk/dv) or rows [1, cols] instead of 1-D blocks, and per-row statistics kept as [rows, 1];
- the schedules scalar-prefetched into SMEM (each program reads its row through a view), the
  per-head scale array in SMEM; tiles are multiples of 128 so every dynamic slice is aligned;
- grid (head, batch, tile), all dimensions parallel, run with the tiles of one head in
  sequence so its K/V blocks stay in VMEM.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels import common
from pallas_kernels.flash_attention.schedule import EMPTY

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
# VMEM limit of the TPU kernels: whole-sequence K/V (forward, dq) or Q/dO (dk/dv) blocks stay
# in VMEM; fits the 64-128 MiB VMEM of v5e/v5p/v6e/v7x.
TPU_VMEM_LIMIT = 48 * 2**20


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static description of one attention call (hashable; a custom_vjp nondiff argument)."""
  static_scale: float | None  # None: a per-head scale array is passed
  causal: bool
  window: tuple[int, int] | None
  has_segments: bool
  softcap: float | None
  groups: int  # q heads per kv head
  precise: bool  # f32 inputs: IEEE f32 dots (no TF32)
  interpret: bool
  tpu: bool  # Mosaic TPU lowering (see the module docstring); else Triton
  fast_exp2: bool  # NVIDIA GPU: exp2 as the bare ex2.approx.ftz.f32 instruction
  contiguous_full: bool  # full tiles form one ascending run: index them without the list
  head_group: int  # launch order: see BlockSizes.head_group
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
  block_q_dq: int
  block_k_dq: int
  num_warps_dq: int
  num_stages_dq: int
  block_q_dkv: int
  block_k_dkv: int
  num_warps_dkv: int
  num_stages_dkv: int

  @property
  def max_before_scale(self) -> bool:
    """Whether the factor c of the logits s2 = u * c (`_logit_parts`) is positive, so the
    forward takes the row max of u and scales the vector (max(u) * c == max(u * c)), and the
    exponent u * c - m is one fma per logit."""
    if self.softcap is not None:
      return self.softcap > 0
    return self.static_scale is not None and self.static_scale > 0


def nvidia_gpu() -> bool:
  """Whether the default device is an NVIDIA GPU (PTX inline assembly is available)."""
  try:
    return plgpu_triton.get_gpu_info().compute_capability > 0
  except ValueError:  # no GPU
    return False


def _dot(a, b, cfg, *, trans_a=False, trans_b=False):
  precision = lax.Precision.HIGHEST if cfg.precise else None
  return common.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _logit_parts(qk, scale, cfg):
  """Base-2 logits as s2 = u * c, and the tanh values t (softcap only; for the backward).

  Without softcap u = q.k and c = log2(e) * scale; with softcap u = t = tanh(scale * q.k /
  softcap) and c = log2(e) * softcap.
  """
  if cfg.softcap is None:
    return qk, scale * LOG2E, None
  t = jnp.tanh(qk * (scale / cfg.softcap))
  return t, cfg.softcap * LOG2E, t


def _logits2(qk, scale, cfg):
  """Base-2 logits and, with softcap, the tanh values (for the backward)."""
  u, c, t = _logit_parts(qk, scale, cfg)
  return u * c, t


def _exp2(x, cfg):
  """2**x of float32 x. On NVIDIA GPUs one ex2.approx.ftz.f32 instruction: jnp.exp2 lowers to
  libdevice's exp2f, the same approximation plus denormal handling around it. Flushing
  results below 2**-126 to zero is harmless here: every exponent is taken relative to a row
  max or logsumexp (results <= ~1)."""
  if not cfg.fast_exp2:
    return jnp.exp2(x)
  [y] = plgpu_triton.elementwise_inline_asm(
      "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
  return y


def _visible(qp, kp, qs, ks, cfg):
  """Visibility of keys at kp to queries at qp (broadcastable arrays), the same rule as
  attnzoo.ops.softmax_attention."""
  mask = kp != EMPTY
  if cfg.causal:
    mask &= kp <= qp
  if cfg.window is not None:
    left, right = cfg.window
    mask &= (kp >= qp - left) & (kp <= qp + right)
  if cfg.has_segments:
    mask &= qs == ks
  return mask


def _col(a):
  """A column [n, 1] of a 1-D vector (TPU vectors already are 2-D)."""
  return a if a is None or a.ndim == 2 else a[:, None]


def _row(a):
  """A row [1, n] of a 1-D vector (TPU vectors already are 2-D)."""
  return a if a is None or a.ndim == 2 else a[None, :]


def _mask(qp, kp, qs, ks, cfg):
  """Boolean [len(qp), len(kp)] visibility."""
  return _visible(_col(qp), _row(kp), _col(qs), _row(ks), cfg)


def _scale_value(scale_ref, cfg, index=None):
  if cfg.static_scale is not None:
    return cfg.static_scale
  return scale_ref[...] if index is None else scale_ref[index]


def _first_full(sched_ref, cfg):
  """The first full tile of a schedule row when the full tiles are one ascending run (read
  once, outside the loops), else None."""
  return sched_ref[2] if cfg.contiguous_full else None


def _tile_index(sched_ref, first_full, j, masked):
  """Tile visited at step j of a schedule row (the list's first entries are the full tiles,
  ascending; when they are known to be one run, index them arithmetically)."""
  if not masked and first_full is not None:
    return first_full + j
  return sched_ref[2 + j]


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
    return spec((None, rows), lambda t, h, b: (_bi(arr, b), tile_of(t))), arr
  if column:
    return (spec((None, rows, 1), lambda t, h, b: (_bi(arr, b), tile_of(t), 0), whole),
            arr[:, :, None])
  return (spec((None, 1, rows), lambda t, h, b: (_bi(arr, b), 0, tile_of(t)), whole),
          arr[:, None, :])


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


def _head_rows(ref, head, start, rows, cfg):
  """Rows [start, start + rows) of one head of a multi-head block."""
  if cfg.tpu:
    return ref[head, pl.ds(start, rows), :]
  return ref[pl.ds(start, rows), head, :]


def _stat_shape(rows, cfg):
  return (rows, 1) if cfg.tpu else (rows,)


def _bi(arr, b):
  """Batch index into a per-row array of batch size B, or 1 (shared by the batch)."""
  return b if arr.shape[0] > 1 else 0


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
    grid_spec = pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=1, grid=grid,
                                             in_specs=in_specs, out_specs=out_specs)
    params = pltpu.CompilerParams(dimension_semantics=("parallel",) * len(grid),
                                  vmem_limit_bytes=TPU_VMEM_LIMIT)
    return pl.pallas_call(kernel, grid_spec=grid_spec, out_shape=out_shape,
                          compiler_params=params, name=name,
                          interpret=pltpu.InterpretParams() if cfg.interpret else False)(
                              sched, *args)
  in_specs.append(_spec(ids, (None, None, sched.shape[-1]),
                        lambda t, h, b: (_bi(sched, b), t, 0)))
  args.append(sched)
  if scale is not None:
    in_specs.append(scale[0])
    args.append(scale[1])
  params = plgpu_triton.CompilerParams(num_warps=getattr(cfg, "num_warps" + suffix),
                                       num_stages=getattr(cfg, "num_stages" + suffix))
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params,
                        interpret=cfg.interpret, name=name)(*args)


def _split_refs(refs, cfg, n_out, ids):
  """(operand refs, q segment ref, kv segment ref, schedule row, scale ref, output refs).

  On TPU the schedule and scale refs hold every program's data: narrowed here to this
  program's schedule row and head (the dk/dv kernel: its kv head's group of query heads)."""
  refs = list(refs)
  sched_ref = refs.pop(0) if cfg.tpu else None
  outs = refs[len(refs) - n_out:]
  refs = refs[:len(refs) - n_out]
  scale_ref = refs.pop() if cfg.static_scale is None else None
  if not cfg.tpu:
    sched_ref = refs.pop()
  if cfg.has_segments:
    ks_ref = refs.pop()
    qs_ref = refs.pop()
  else:
    qs_ref = ks_ref = None
  if cfg.tpu:
    tile, head, b = ids(*(pl.program_id(axis) for axis in range(3)))
    sched_ref = sched_ref.at[_bi(sched_ref, b), tile]
    if scale_ref is not None:
      scale_ref = scale_ref.at[head]
  return refs, qs_ref, ks_ref, sched_ref, scale_ref, outs


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: KernelConfig, ids):
  (q_ref, k_ref, v_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, sched_ref, scale_ref, outs = (
      _split_refs(refs, cfg, 2, ids))
  o_ref, lse_ref = outs
  bq, bk = cfg.block_q, cfg.block_k
  dv = v_ref.shape[-1]
  scale = _scale_value(scale_ref, cfg)
  q = q_ref[...]
  qp = qpos_ref[...]
  qs = qs_ref[...] if cfg.has_segments else None
  first_full = _first_full(sched_ref, cfg)

  def body(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(_tile_index(sched_ref, first_full, j, masked) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    u, c, _ = _logit_parts(_dot(q, k, cfg, trans_b=True), scale, cfg)
    if not cfg.max_before_scale:
      u, c = u * c, None
    if masked:
      ks = ks_ref[..., pl.ds(start, bk)] if cfg.has_segments else None
      mask = _mask(qp, kpos_ref[..., pl.ds(start, bk)], qs, ks, cfg)
      u = jnp.where(mask, u, -jnp.inf)
    u_max = u.max(axis=-1, keepdims=cfg.tpu)
    m_new = jnp.maximum(m, u_max if c is None else u_max * c)
    if masked:  # a row may still have seen nothing: keep exponents finite
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    p = _exp2((u if c is None else u * c) - _col(m_use), cfg)
    alpha = _exp2(m - m_use, cfg)
    l = l * alpha + p.sum(axis=-1, keepdims=cfg.tpu)
    v = v_ref[pl.ds(start, bk), :]
    acc = acc * _col(alpha) + _dot(p.astype(v.dtype), v, cfg)
    return acc, m_new, l

  stat = _stat_shape(bq, cfg)
  carry = (jnp.zeros((bq, dv), jnp.float32), jnp.full(stat, -jnp.inf, jnp.float32),
           jnp.zeros(stat, jnp.float32))
  n_full = sched_ref[0]
  n_vis = sched_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(n_full, n_vis, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * _col(1.0 / l)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))


def _query_tile_operands(spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg,
                         tile_stats=()):
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
    operands += [_token_operand(spec, cfg, q_seg, bq, column=True),
                 _token_operand(spec, cfg, kv_seg, tk, column=False, whole=True)]
  scale = None
  if cfg.static_scale is None:
    scale = (spec((None,), lambda i, h, b: (h,)), scale_arr)
  return operands, scale


def forward(q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched, cfg: KernelConfig):
  """q[B,Tq,H,D] k[B,Tk,Hkv,D] v[B,Tk,Hkv,Dv] -> o[B,Tq,H,Dv], lse2[B,H,Tq] float32.

  On TPU q, k, v and o are BHTD."""
  batch, tq, heads, _ = _dims(q, cfg)
  dv = v.shape[-1]
  bq = cfg.block_q
  grid, ids = _launch(tq // bq, heads, batch, cfg, reverse=True)
  spec = functools.partial(_spec, ids)
  operands, scale = _query_tile_operands(spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos,
                                         q_seg, kv_seg)
  out_specs = [_seq_spec(spec, cfg, bq, None, dv, lambda i, h, b: (b, i, h)),
               _stat_spec(spec, cfg, None, bq, lambda i, h, b: (b, h, i), column=True)]
  out_shape = [jax.ShapeDtypeStruct(_seq_shape(batch, tq, heads, dv, cfg), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, tq, 1) if cfg.tpu else (batch, heads, tq),
                                    jnp.float32)]
  o, lse2 = _call(functools.partial(_fwd_kernel, cfg=cfg, ids=ids), cfg, "",
                  "flash_attention_fwd", grid, ids, operands, sched, scale, out_specs, out_shape)
  return o, lse2[..., 0] if cfg.tpu else lse2


# ------------------------------------------------------------------------------- dq


def _dq_kernel(*refs, cfg: KernelConfig, ids):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, \
      sched_ref, scale_ref, (dq_ref,) = _split_refs(refs, cfg, 1, ids)
  bk = cfg.block_k_dq
  scale = _scale_value(scale_ref, cfg)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qp = qpos_ref[...]
  qs = qs_ref[...] if cfg.has_segments else None
  first_full = _first_full(sched_ref, cfg)

  def body(j, dq, masked):
    start = pl.multiple_of(_tile_index(sched_ref, first_full, j, masked) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s, t = _logits2(_dot(q, k, cfg, trans_b=True), scale, cfg)
    p = _exp2(s - _col(lse), cfg)
    if masked:
      ks = ks_ref[..., pl.ds(start, bk)] if cfg.has_segments else None
      p = jnp.where(_mask(qp, kpos_ref[..., pl.ds(start, bk)], qs, ks, cfg), p, 0.0)
    dp = _dot(do, v, cfg, trans_b=True)
    ds = p * (dp - _col(delta))
    if t is not None:
      ds = ds * (1.0 - t * t)
    return dq + _dot(ds.astype(k.dtype), k, cfg)

  dq = jnp.zeros(q.shape, jnp.float32)
  n_full = sched_ref[0]
  n_vis = sched_ref[1]
  dq = lax.fori_loop(0, n_full, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(n_full, n_vis, functools.partial(body, masked=True), dq)
  if cfg.static_scale is not None:
    dq = dq * cfg.static_scale
  dq_ref[...] = dq.astype(dq_ref.dtype)


def backward_dq(q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched,
                cfg: KernelConfig):
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
  operands, scale = _query_tile_operands(spec, cfg, bq, q, k, v, scale_arr, q_pos, kv_pos,
                                         q_seg, kv_seg, tile_stats)
  out_dtype = q.dtype if scale is None else jnp.float32
  return _call(functools.partial(_dq_kernel, cfg=cfg, ids=ids), cfg, "_dq",
               "flash_attention_dq", grid, ids, operands, sched, scale,
               _seq_spec(spec, cfg, bq, None, d, lambda i, h, b: (b, i, h)),
               jax.ShapeDtypeStruct(q.shape, out_dtype))


# ------------------------------------------------------------------------------- dk, dv


def _dkv_kernel(*refs, cfg: KernelConfig, ids):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, \
      sched_ref, scale_ref, (dk_ref, dv_ref) = _split_refs(refs, cfg, 2, ids)
  bq = cfg.block_q_dkv
  groups = cfg.groups
  k = k_ref[...]
  v = v_ref[...]
  kp = kpos_ref[...]
  ks = ks_ref[...] if cfg.has_segments else None
  n_full = sched_ref[0]
  n_vis = sched_ref[1]
  first_full = _first_full(sched_ref, cfg)

  def body(j, carry, masked):
    dk, dv = carry
    if masked:
      n = n_vis - n_full
      first = n_full
    else:
      n = n_full
      first = 0
    if groups == 1:
      g, jj = 0, j
    else:
      g, jj = j // n, j % n
    start = pl.multiple_of(_tile_index(sched_ref, first_full, first + jj, masked) * bq, bq)
    q = _head_rows(q_ref, g, start, bq, cfg)
    do = _head_rows(do_ref, g, start, bq, cfg)
    lse = lse_ref[g, ..., pl.ds(start, bq)]
    delta = delta_ref[g, ..., pl.ds(start, bq)]
    scale = _scale_value(scale_ref, cfg, g)
    s_t, t_t = _logits2(_dot(k, q, cfg, trans_b=True), scale, cfg)  # [bk, bq]
    p_t = _exp2(s_t - _row(lse), cfg)
    if masked:
      qs = qs_ref[..., pl.ds(start, bq)] if cfg.has_segments else None
      qp = qpos_ref[..., pl.ds(start, bq)]
      mask_t = _mask_t(kp, qp, ks, qs, cfg)
      p_t = jnp.where(mask_t, p_t, 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do, cfg)
    dp_t = _dot(v, do, cfg, trans_b=True)
    ds_t = p_t * (dp_t - _row(delta))
    if t_t is not None:
      ds_t = ds_t * (1.0 - t_t * t_t)
    if cfg.static_scale is None:
      ds_t = ds_t * scale
    dk = dk + _dot(ds_t.astype(q.dtype), q, cfg)
    return dk, dv

  carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
  carry = lax.fori_loop(0, groups * n_full, functools.partial(body, masked=False), carry)
  dk, dv = lax.fori_loop(0, groups * (n_vis - n_full), functools.partial(body, masked=True),
                         carry)
  if cfg.static_scale is not None:
    dk = dk * cfg.static_scale
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _mask_t(kp, qp, ks, qs, cfg):
  """Transposed visibility [len(kp), len(qp)] (built directly, no transpose in the kernel)."""
  return _visible(_row(qp), _col(kp), _row(qs), _col(ks), cfg)


def backward_dkv(q, k, v, do, lse2, delta, scale_arr, q_pos, kv_pos, q_seg, kv_seg,
                 sched_t, cfg: KernelConfig):
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
      _stat_operand(spec, cfg, lse2, g, tq, lambda j, hk, b: (b, hk, 0), column=False,
                    whole=True),
      _stat_operand(spec, cfg, delta, g, tq, lambda j, hk, b: (b, hk, 0), column=False,
                    whole=True),
      _token_operand(spec, cfg, q_pos, tq, column=False, whole=True),
      _token_operand(spec, cfg, kv_pos, bk, column=True),
  ]
  if cfg.has_segments:
    operands += [_token_operand(spec, cfg, q_seg, tq, column=False, whole=True),
                 _token_operand(spec, cfg, kv_seg, bk, column=True)]
  scale = None
  if cfg.static_scale is None:
    scale = (spec((None, g), lambda j, hk, b: (hk, 0)), scale_arr.reshape(kv_heads, g))
  out_specs = [_seq_spec(spec, cfg, bk, None, d, lambda j, hk, b: (b, j, hk)),
               _seq_spec(spec, cfg, bk, None, dv, lambda j, hk, b: (b, j, hk))]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  return _call(functools.partial(_dkv_kernel, cfg=cfg, ids=ids), cfg, "_dkv",
               "flash_attention_dkv", grid, ids, operands, sched_t, scale, out_specs,
               out_shape)
