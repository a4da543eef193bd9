"""Pallas kernel bodies: forward (online softmax), dq, dk/dv; lowered to Triton (GPU) or Mosaic
(TPU) by the pallas_calls of calls.py.

All kernels work on padded arrays (every T a multiple of its tiles, head dims powers of two;
TPU: multiples of 128) and on base-2 logits: s2 = log2(e) * scale * q.k (or log2(e) * softcap
* tanh(scale*q.k / softcap)), so the forward stores lse2 = log2(sum 2^s2) and the backward
recomputes p = 2^(s2 - lse2). A row with no visible key has lse2 = +inf internally (p = 0
everywhere).

Every kernel has one program per (tile, head, batch), ordered by calls.py (heaviest tiles
first within groups of heads). Per-row arrays (positions, segments, schedules) may have batch
size 1, shared by the whole batch.

One kernel body serves both platforms; `Static.tpu` picks the Mosaic TPU form:
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
from jax.experimental.pallas import triton as plgpu_triton

from pallas_kernels import common

from .schedule import visible

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


@dataclasses.dataclass(frozen=True)
class Static:
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
  head_group: int  # launch order: see Tuning.head_group
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
    "ex2.approx.ftz.f32 $0, $1;",
    args=[x],
    constraints="=f,f",
    pack=1,
    result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)],
  )
  return y


def _col(a):
  """A column [n, 1] of a 1-D vector (TPU vectors already are 2-D)."""
  return a if a is None or a.ndim == 2 else a[:, None]


def _row(a):
  """A row [1, n] of a 1-D vector (TPU vectors already are 2-D)."""
  return a if a is None or a.ndim == 2 else a[None, :]


def _mask(qp, kp, qs, ks, cfg):
  """Boolean [len(qp), len(kp)] visibility (`schedule.visible`; qs, ks are None without
  segments)."""
  return visible(_col(qp), _row(kp), _col(qs), _row(ks), causal=cfg.causal, window=cfg.window)


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


def _head_rows(ref, head, start, rows, cfg):
  """Rows [start, start + rows) of one head of a multi-head block."""
  if cfg.tpu:
    return ref[head, pl.ds(start, rows), :]
  return ref[pl.ds(start, rows), head, :]


def _stat_shape(rows, cfg):
  return (rows, 1) if cfg.tpu else (rows,)


def batch_index(arr, b):
  """Batch index into a per-row array of batch size B, or 1 (shared by the batch)."""
  return b if arr.shape[0] > 1 else 0


def _split_refs(refs, cfg, n_out, ids):
  """(operand refs, q segment ref, kv segment ref, schedule row, scale ref, output refs).

  On TPU the schedule and scale refs hold every program's data: narrowed here to this
  program's schedule row and head (the dk/dv kernel: its kv head's group of query heads)."""
  refs = list(refs)
  sched_ref = refs.pop(0) if cfg.tpu else None
  outs = refs[len(refs) - n_out :]
  refs = refs[: len(refs) - n_out]
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
    sched_ref = sched_ref.at[batch_index(sched_ref, b), tile]
    if scale_ref is not None:
      scale_ref = scale_ref.at[head]
  return refs, qs_ref, ks_ref, sched_ref, scale_ref, outs


# ------------------------------------------------------------------------------- forward


def fwd_kernel(*refs, cfg: Static, ids):
  (q_ref, k_ref, v_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, sched_ref, scale_ref, outs = (
    _split_refs(refs, cfg, 2, ids)
  )
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
  carry = (
    jnp.zeros((bq, dv), jnp.float32),
    jnp.full(stat, -jnp.inf, jnp.float32),
    jnp.zeros(stat, jnp.float32),
  )
  n_full = sched_ref[0]
  n_vis = sched_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(n_full, n_vis, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * _col(1.0 / l)).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))


# ------------------------------------------------------------------------------- dq


def dq_kernel(*refs, cfg: Static, ids):
  (
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref),
    qs_ref,
    ks_ref,
    sched_ref,
    scale_ref,
    (dq_ref,),
  ) = _split_refs(refs, cfg, 1, ids)
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


# ------------------------------------------------------------------------------- dk, dv


def dkv_kernel(*refs, cfg: Static, ids):
  (
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref),
    qs_ref,
    ks_ref,
    sched_ref,
    scale_ref,
    (dk_ref, dv_ref),
  ) = _split_refs(refs, cfg, 2, ids)
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
  dk, dv = lax.fori_loop(0, groups * (n_vis - n_full), functools.partial(body, masked=True), carry)
  if cfg.static_scale is not None:
    dk = dk * cfg.static_scale
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _mask_t(kp, qp, ks, qs, cfg):
  """Transposed visibility [len(kp), len(qp)] (built directly, no transpose in the kernel)."""
  return visible(_row(qp), _col(kp), _row(qs), _col(ks), causal=cfg.causal, window=cfg.window)
