"""Pallas kernels: forward (online softmax), dq, and dk/dv. Portable Pallas lowered to Triton.

All kernels work on padded arrays (every T a multiple of its tiles, head dims powers of two)
and on base-2 logits: s2 = log2(e) * scale * q.k (or log2(e) * softcap * tanh(scale*q.k /
softcap)), so the forward stores lse2 = log2(sum 2^s2) and the backward recomputes
p = 2^(s2 - lse2). A row with no visible key has lse2 = +inf internally (p = 0 everywhere).

Every kernel has one program per (tile, head, batch); `_launch` orders them (heaviest tiles
first within groups of heads). Per-row arrays (positions, segments, schedules) may have batch
size 1, shared by the whole batch.
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
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  precision = lax.Precision.HIGHEST if cfg.precise else None
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


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


def _launch(n_tiles, heads, batch, head_group, *, reverse):
  """Grid and program-id decoder for a kernel with one program per (tile, head, batch).

  Triton runs the first grid axis fastest, so programs go out in groups of g heads (g = the
  gcd of head_group and heads): tile by tile, each for all g heads of the group, starting at
  the last tile when `reverse` (query tiles: the most kv tiles under a causal mask) or the
  first (kv tiles: the most query tiles). Returns (grid, ids) with ids(*program_ids) =
  (tile, head, batch).
  """
  g = math.gcd(head_group, heads)
  per_batch = heads // g

  def ids(hg, t, r):
    tile = n_tiles - 1 - t if reverse else t
    return tile, (r % per_batch) * g + hg, r // per_batch
  return (g, n_tiles, per_batch * batch), ids


def _spec(ids, block_shape, index_map):
  """BlockSpec whose index_map takes (tile, head, batch) instead of the program ids."""
  return pl.BlockSpec(block_shape, lambda *pid: index_map(*ids(*pid)))


def _bi(arr, b):
  """Batch index into a per-row array of batch size B, or 1 (shared by the batch)."""
  return b if arr.shape[0] > 1 else 0


def _call(kernel, cfg, suffix, name, grid, in_specs, out_specs, out_shape, args):
  """pallas_call with the Triton launch knobs `num_warps{suffix}`, `num_stages{suffix}`."""
  params = plgpu_triton.CompilerParams(num_warps=getattr(cfg, "num_warps" + suffix),
                                       num_stages=getattr(cfg, "num_stages" + suffix))
  return pl.pallas_call(kernel, grid=grid, in_specs=in_specs, out_specs=out_specs,
                        out_shape=out_shape, compiler_params=params,
                        interpret=cfg.interpret, name=name)(*args)


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
  first_full = _first_full(sched_ref, cfg)

  def body(j, carry, masked):
    acc, m, l = carry
    start = pl.multiple_of(_tile_index(sched_ref, first_full, j, masked) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    u, c, _ = _logit_parts(_dot(q, k, cfg, trans_b=True), scale, cfg)
    if not cfg.max_before_scale:
      u, c = u * c, None
    if masked:
      ks = ks_ref[pl.ds(start, bk)] if cfg.has_segments else None
      mask = _mask(qp, kpos_ref[pl.ds(start, bk)], qs, ks, cfg)
      u = jnp.where(mask, u, -jnp.inf)
    u_max = u.max(axis=-1)
    m_new = jnp.maximum(m, u_max if c is None else u_max * c)
    if masked:  # a row may still have seen nothing: keep exponents finite
      m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    else:
      m_use = m_new
    p = _exp2((u if c is None else u * c) - m_use[:, None], cfg)
    alpha = _exp2(m - m_use, cfg)
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
  l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc * (1.0 / l)[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l))


def forward(q, k, v, scale_arr, q_pos, kv_pos, q_seg, kv_seg, sched, cfg: KernelConfig):
  """q[B,Tq,H,D] k[B,Tk,Hkv,D] v[B,Tk,Hkv,Dv] -> o[B,Tq,H,Dv], lse2[B,H,Tq] float32."""
  batch, tq, heads, d = q.shape
  tk, dv = k.shape[1], v.shape[-1]
  bq = cfg.block_q
  g = cfg.groups
  grid, ids = _launch(tq // bq, heads, batch, cfg.head_group, reverse=True)
  spec = functools.partial(_spec, ids)
  in_specs = [
      spec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
      spec((None, tk, None, d), lambda i, h, b: (b, 0, h // g, 0)),
      spec((None, tk, None, dv), lambda i, h, b: (b, 0, h // g, 0)),
      spec((None, bq), lambda i, h, b: (_bi(q_pos, b), i)),
      spec((None, tk), lambda i, h, b: (_bi(kv_pos, b), 0)),
  ]
  args = [q, k, v, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [spec((None, bq), lambda i, h, b: (_bi(q_seg, b), i)),
                 spec((None, tk), lambda i, h, b: (_bi(kv_seg, b), 0))]
    args += [q_seg, kv_seg]
  in_specs.append(spec((None, None, sched.shape[-1]), lambda i, h, b: (_bi(sched, b), i, 0)))
  args.append(sched)
  if cfg.static_scale is None:
    in_specs.append(spec((None,), lambda i, h, b: (h,)))
    args.append(scale_arr)
  out_specs = [spec((None, bq, None, dv), lambda i, h, b: (b, i, h, 0)),
               spec((None, None, bq), lambda i, h, b: (b, h, i))]
  out_shape = [jax.ShapeDtypeStruct((batch, tq, heads, dv), q.dtype),
               jax.ShapeDtypeStruct((batch, heads, tq), jnp.float32)]
  return _call(functools.partial(_fwd_kernel, cfg=cfg), cfg, "", "flash_attention_fwd",
               grid, in_specs, out_specs, out_shape, args)


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
  first_full = _first_full(sched_ref, cfg)

  def body(j, dq, masked):
    start = pl.multiple_of(_tile_index(sched_ref, first_full, j, masked) * bk, bk)
    k = k_ref[pl.ds(start, bk), :]
    v = v_ref[pl.ds(start, bk), :]
    s, t = _logits2(_dot(q, k, cfg, trans_b=True), scale, cfg)
    p = _exp2(s - lse[:, None], cfg)
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
  g = cfg.groups
  grid, ids = _launch(tq // bq, heads, batch, cfg.head_group, reverse=True)
  spec = functools.partial(_spec, ids)
  in_specs = [
      spec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
      spec((None, tk, None, d), lambda i, h, b: (b, 0, h // g, 0)),
      spec((None, tk, None, dv), lambda i, h, b: (b, 0, h // g, 0)),
      spec((None, bq, None, dv), lambda i, h, b: (b, i, h, 0)),
      spec((None, None, bq), lambda i, h, b: (b, h, i)),
      spec((None, None, bq), lambda i, h, b: (b, h, i)),
      spec((None, bq), lambda i, h, b: (_bi(q_pos, b), i)),
      spec((None, tk), lambda i, h, b: (_bi(kv_pos, b), 0)),
  ]
  args = [q, k, v, do, lse2, delta, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [spec((None, bq), lambda i, h, b: (_bi(q_seg, b), i)),
                 spec((None, tk), lambda i, h, b: (_bi(kv_seg, b), 0))]
    args += [q_seg, kv_seg]
  in_specs.append(spec((None, None, sched.shape[-1]), lambda i, h, b: (_bi(sched, b), i, 0)))
  args.append(sched)
  out_dtype = q.dtype
  if cfg.static_scale is None:
    in_specs.append(spec((None,), lambda i, h, b: (h,)))
    args.append(scale_arr)
    out_dtype = jnp.float32
  return _call(functools.partial(_dq_kernel, cfg=cfg), cfg, "_dq", "flash_attention_dq",
               grid, in_specs, spec((None, bq, None, d), lambda i, h, b: (b, i, h, 0)),
               jax.ShapeDtypeStruct(q.shape, out_dtype), args)


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
    q = q_ref[pl.ds(start, bq), g, :]
    do = do_ref[pl.ds(start, bq), g, :]
    lse = lse_ref[g, pl.ds(start, bq)]
    delta = delta_ref[g, pl.ds(start, bq)]
    scale = _scale_value(scale_ref, cfg, g)
    s_t, t_t = _logits2(_dot(k, q, cfg, trans_b=True), scale, cfg)  # [bk, bq]
    p_t = _exp2(s_t - lse[None, :], cfg)
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
  g = cfg.groups
  grid, ids = _launch(tk // bk, kv_heads, batch, cfg.head_group, reverse=False)
  spec = functools.partial(_spec, ids)
  in_specs = [
      spec((None, tq, g, d), lambda j, hk, b: (b, 0, hk, 0)),
      spec((None, bk, None, d), lambda j, hk, b: (b, j, hk, 0)),
      spec((None, bk, None, dv), lambda j, hk, b: (b, j, hk, 0)),
      spec((None, tq, g, dv), lambda j, hk, b: (b, 0, hk, 0)),
      spec((None, g, tq), lambda j, hk, b: (b, hk, 0)),
      spec((None, g, tq), lambda j, hk, b: (b, hk, 0)),
      spec((None, tq), lambda j, hk, b: (_bi(q_pos, b), 0)),
      spec((None, bk), lambda j, hk, b: (_bi(kv_pos, b), j)),
  ]
  args = [q, k, v, do, lse2, delta, q_pos, kv_pos]
  if cfg.has_segments:
    in_specs += [spec((None, tq), lambda j, hk, b: (_bi(q_seg, b), 0)),
                 spec((None, bk), lambda j, hk, b: (_bi(kv_seg, b), j))]
    args += [q_seg, kv_seg]
  in_specs.append(spec((None, None, sched_t.shape[-1]),
                       lambda j, hk, b: (_bi(sched_t, b), j, 0)))
  args.append(sched_t)
  if cfg.static_scale is None:
    in_specs.append(spec((None, g), lambda j, hk, b: (hk, 0)))
    args.append(scale_arr.reshape(kv_heads, g))
  out_specs = [spec((None, bk, None, d), lambda j, hk, b: (b, j, hk, 0)),
               spec((None, bk, None, dv), lambda j, hk, b: (b, j, hk, 0))]
  out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
  return _call(functools.partial(_dkv_kernel, cfg=cfg), cfg, "_dkv", "flash_attention_dkv",
               grid, in_specs, out_specs, out_shape, args)
