"""Pallas kernels: forward (online softmax), dq, and dk/dv. Portable Pallas lowered to Triton.

All kernels work on padded arrays (every T a multiple of its tiles, head dims powers of two)
and on base-2 logits: s2 = log2(e) * scale * q.k (or log2(e) * softcap * tanh(scale*q.k /
softcap)), so the forward stores lse2 = log2(sum 2^s2) and the backward recomputes
p = 2^(s2 - lse2). A row with no visible key has lse2 = +inf internally (p = 0 everywhere).
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

from pallas_kernels.flash_attention.schedule import EMPTY

LOG2E = math.log2(math.e)


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
  contiguous_full: bool  # full tiles form one ascending run: index them without the list
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


def _dot(a, b, cfg, *, trans_a=False, trans_b=False):
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if cfg.precise else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _logits2(qk, scale, cfg):
  """Base-2 logits and, with softcap, the tanh values (for the backward)."""
  if cfg.softcap is None:
    return qk * (scale * LOG2E), None
  t = jnp.tanh(qk * (scale / cfg.softcap))
  return t * (cfg.softcap * LOG2E), t


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
  return None if a is None else a[:, None]


def _row(a):
  return None if a is None else a[None, :]


def _mask(qp, kp, qs, ks, cfg):
  """Boolean [len(qp), len(kp)] visibility."""
  return _visible(_col(qp), _row(kp), _col(qs), _row(ks), cfg)


def _scale_value(scale_ref, cfg, index=None):
  if cfg.static_scale is not None:
    return cfg.static_scale
  return scale_ref[...] if index is None else scale_ref[index]


def _tile_index(sched_ref, j, masked, cfg):
  """Tile visited at step j of a schedule row (the list's first entries are the full tiles,
  ascending; when they are known to be one run, index them arithmetically)."""
  if not masked and cfg.contiguous_full:
    return sched_ref[2] + j
  return sched_ref[2 + j]


def _split_refs(refs, cfg, n_out):
  refs = list(refs)
  outs = refs[len(refs) - n_out:]
  refs = refs[:len(refs) - n_out]
  scale_ref = refs.pop() if cfg.static_scale is None else None
  sched_ref = refs.pop()
  if cfg.has_segments:
    ks_ref = refs.pop()
    qs_ref = refs.pop()
  else:
    qs_ref = ks_ref = None
  return refs, qs_ref, ks_ref, sched_ref, scale_ref, outs


# ------------------------------------------------------------------------------- forward


def _fwd_kernel(*refs, cfg: KernelConfig):
  (q_ref, k_ref, v_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, sched_ref, scale_ref, outs = (
      _split_refs(refs, cfg, 2))
  o_ref, lse_ref = outs
  bq, bk = cfg.block_q, cfg.block_k
  dv = v_ref.shape[-1]
  scale = _scale_value(scale_ref, cfg)
  q = q_ref[...]
  qp = qpos_ref[...]
  qs = qs_ref[...] if cfg.has_segments else None

  def body(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(_tile_index(sched_ref, j, masked, cfg) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    s, _ = _logits2(_dot(q, k, cfg, trans_b=True), scale, cfg)
    if masked:
      ks = ks_ref[pl.ds(start, bk)] if cfg.has_segments else None
      mask = _mask(qp, kpos_ref[pl.ds(start, bk)], qs, ks, cfg)
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(axis=-1))
    if masked:  # a row may still have seen nothing: keep exponents finite
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    p = jnp.exp2(s - m_use[:, None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + p.sum(axis=-1)
    v = v_ref[pl.ds(start, bk), :]
    acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, cfg)
    return acc, m_new, l

  carry = (jnp.zeros((bq, dv), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32),
           jnp.zeros((bq,), jnp.float32))
  n_full = sched_ref[0]
  n_vis = sched_ref[1]
  carry = lax.fori_loop(0, n_full, functools.partial(body, masked=False), carry)
  acc, m, l = lax.fori_loop(n_full, n_vis, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


def forward(q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched, cfg: KernelConfig):
  """q[B,Tq,H,D] k[B,Tk,Hkv,D] v[B,Tk,Hkv,Dv] -> o[B,Tq,H,Dv], lse2[B,H,Tq] float32."""
  batch, tq, heads, d = q.shape
  tk, dv = k.shape[1], v.shape[-1]
  bq = cfg.block_q
  nq = tq // bq
  g = cfg.groups
  rev = lambda i: nq - 1 - i  # heaviest (latest) query tiles first
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, rev(i), h, 0)),
      pl.BlockSpec((None, tk, None, d), lambda i, h, b: (b, 0, h // g, 0)),
      pl.BlockSpec((None, tk, None, dv), lambda i, h, b: (b, 0, h // g, 0)),
      pl.BlockSpec((None, bq), lambda i, h, b: (b, rev(i))),
      pl.BlockSpec((None, tk), lambda i, h, b: (b, 0)),
  ]
  args = [q, k, v, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, h, b: (b, rev(i))),
                 pl.BlockSpec((None, tk), lambda i, h, b: (b, 0))]
    args += [q_seg, kv_seg]
  in_specs.append(pl.BlockSpec((None, None, sched.shape[-1]), lambda i, h, b: (b, rev(i), 0)))
  args.append(sched)
  if cfg.static_scale is None:
    in_specs.append(pl.BlockSpec((None,), lambda i, h, b: (h,)))
    args.append(scale_arr)
  out_specs = [pl.BlockSpec((None, bq, None, dv), lambda i, h, b: (b, rev(i), h, 0)),
               pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, rev(i)))]
  out_shape = [jax.ShapeDtypeStruct((batch, tq, heads, dv), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)]
  return pl.pallas_call(
      functools.partial(_fwd_kernel, cfg=cfg),
      grid=(nq, heads, batch),
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      compiler_params=plgpu_triton.CompilerParams(num_warps=cfg.num_warps,
                                                  num_stages=cfg.num_stages),
      interpret=cfg.interpret,
      name="flash_attention_fwd",
  )(*args)


# ------------------------------------------------------------------------------- dq


def _dq_kernel(*refs, cfg: KernelConfig):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, \
      sched_ref, scale_ref, (dq_ref,) = _split_refs(refs, cfg, 1)
  bq, bk = cfg.block_q_dq, cfg.block_k_dq
  scale = _scale_value(scale_ref, cfg)
  q = q_ref[...]
  do = do_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  qp = qpos_ref[...]
  qs = qs_ref[...] if cfg.has_segments else None

  def body(j, dq, masked):
    start = pl.multiple_of(_tile_index(sched_ref, j, masked, cfg) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s, t = _logits2(_dot(q, k, cfg, trans_b=True), scale, cfg)
    p = jnp.exp2(s - lse[:, None])
    if masked:
      ks = ks_ref[pl.ds(start, bk)] if cfg.has_segments else None
      p = jnp.where(_mask(qp, kpos_ref[pl.ds(start, bk)], qs, ks, cfg), p, 0.0)
    dp = _dot(do, v, cfg, trans_b=True)
    ds = p * (dp - delta[:, None])
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
  """dq [B,Tq,H,D]; with a per-head scale array, the unscaled sum (float32)."""
  batch, tq, heads, d = q.shape
  tk, dv = k.shape[1], v.shape[-1]
  bq = cfg.block_q_dq
  nq = tq // bq
  g = cfg.groups
  rev = lambda i: nq - 1 - i
  in_specs = [
      pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, rev(i), h, 0)),
      pl.BlockSpec((None, tk, None, d), lambda i, h, b: (b, 0, h // g, 0)),
      pl.BlockSpec((None, tk, None, dv), lambda i, h, b: (b, 0, h // g, 0)),
      pl.BlockSpec((None, bq, None, dv), lambda i, h, b: (b, rev(i), h, 0)),
      pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, rev(i))),
      pl.BlockSpec((None, None, bq), lambda i, h, b: (b, h, rev(i))),
      pl.BlockSpec((None, bq), lambda i, h, b: (b, rev(i))),
      pl.BlockSpec((None, tk), lambda i, h, b: (b, 0)),
  ]
  args = [q, k, v, do, lse2, delta, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, bq), lambda i, h, b: (b, rev(i))),
                 pl.BlockSpec((None, tk), lambda i, h, b: (b, 0))]
    args += [q_seg, kv_seg]
  in_specs.append(pl.BlockSpec((None, None, sched.shape[-1]), lambda i, h, b: (b, rev(i), 0)))
  args.append(sched)
  out_dtype = q.dtype
  if cfg.static_scale is None:
    in_specs.append(pl.BlockSpec((None,), lambda i, h, b: (h,)))
    args.append(scale_arr)
    out_dtype = jnp.float32
  return pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg),
      grid=(nq, heads, batch),
      in_specs=in_specs,
      out_specs=pl.BlockSpec((None, bq, None, d), lambda i, h, b: (b, rev(i), h, 0)),
      out_shape=jax.ShapeDtypeStruct(q.shape, out_dtype),
      compiler_params=plgpu_triton.CompilerParams(num_warps=cfg.num_warps_dq,
                                                  num_stages=cfg.num_stages_dq),
      interpret=cfg.interpret,
      name="flash_attention_dq",
  )(*args)


# ------------------------------------------------------------------------------- dk, dv


def _dkv_kernel(*refs, cfg: KernelConfig):
  (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qpos_ref, kpos_ref), qs_ref, ks_ref, \
      sched_ref, scale_ref, (dk_ref, dv_ref) = _split_refs(refs, cfg, 2)
  bq, bk = cfg.block_q_dkv, cfg.block_k_dkv
  groups = cfg.groups
  k = k_ref[...]
  v = v_ref[...]
  kp = kpos_ref[...]
  ks = ks_ref[...] if cfg.has_segments else None
  n_full = sched_ref[0]
  n_vis = sched_ref[1]

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
    start = pl.multiple_of(_tile_index(sched_ref, first + jj, masked, cfg) * bq, bq)
    q = q_ref[pl.ds(start, bq), g, :]
    do = do_ref[pl.ds(start, bq), g, :]
    lse = lse_ref[g, pl.ds(start, bq)]
    delta = delta_ref[g, pl.ds(start, bq)]
    scale = _scale_value(scale_ref, cfg, g)
    s_t, t_t = _logits2(_dot(k, q, cfg, trans_b=True), scale, cfg)  # [bk, bq]
    p_t = jnp.exp2(s_t - lse[None, :])
    if masked:
      qs = qs_ref[pl.ds(start, bq)] if cfg.has_segments else None
      qp = qpos_ref[pl.ds(start, bq)]
      mask_t = _mask_t(kp, qp, ks, qs, cfg)
      p_t = jnp.where(mask_t, p_t, 0.0)
    dv = dv + _dot(p_t.astype(do.dtype), do, cfg)
    dp_t = _dot(v, do, cfg, trans_b=True)
    ds_t = p_t * (dp_t - delta[None, :])
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
  """dk [B,Tk,Hkv,D], dv [B,Tk,Hkv,Dv]; sums over the query heads of each kv head."""
  batch, tq, heads, d = q.shape
  tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  bk = cfg.block_k_dkv
  nk = tk // bk
  g = cfg.groups
  in_specs = [
      pl.BlockSpec((None, tq, g, d), lambda j, hk, b: (b, 0, hk, 0)),
      pl.BlockSpec((None, bk, None, d), lambda j, hk, b: (b, j, hk, 0)),
      pl.BlockSpec((None, bk, None, dv), lambda j, hk, b: (b, j, hk, 0)),
      pl.BlockSpec((None, tq, g, dv), lambda j, hk, b: (b, 0, hk, 0)),
      pl.BlockSpec((None, g, tq), lambda j, hk, b: (b, hk, 0)),
      pl.BlockSpec((None, g, tq), lambda j, hk, b: (b, hk, 0)),
      pl.BlockSpec((None, tq), lambda j, hk, b: (b, 0)),
      pl.BlockSpec((None, bk), lambda j, hk, b: (b, j)),
  ]
  args = [q, k, v, do, lse2, delta, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [pl.BlockSpec((None, tq), lambda j, hk, b: (b, 0)),
                 pl.BlockSpec((None, bk), lambda j, hk, b: (b, j))]
    args += [q_seg, kv_seg]
  in_specs.append(pl.BlockSpec((None, None, sched_t.shape[-1]), lambda j, hk, b: (b, j, 0)))
  args.append(sched_t)
  if cfg.static_scale is None:
    in_specs.append(pl.BlockSpec((None, g), lambda j, hk, b: (hk, 0)))
    args.append(scale_arr.reshape(kv_heads, g))
  return pl.pallas_call(
      functools.partial(_dkv_kernel, cfg=cfg),
      grid=(nk, kv_heads, batch),
      in_specs=in_specs,
      out_specs=[pl.BlockSpec((None, bk, None, d), lambda j, hk, b: (b, j, hk, 0)),
                 pl.BlockSpec((None, bk, None, dv), lambda j, hk, b: (b, j, hk, 0))],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype),
                 jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=plgpu_triton.CompilerParams(num_warps=cfg.num_warps_dkv,
                                                  num_stages=cfg.num_stages_dkv),
      interpret=cfg.interpret,
      name="flash_attention_dkv",
  )(*args)
