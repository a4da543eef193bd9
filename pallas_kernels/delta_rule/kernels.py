"""Pallas kernels for the chunked (WY) delta rule: DeltaNet (Yang et al. 2024, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length") and Gated DeltaNet (Yang, Kautz &
Hatamizadeh 2024). The math is in `chunked_jnp.py`'s docstring.

Portable pallas_calls (BlockSpecs, fori_loop, power-of-two blocks; Triton lowering on GPU,
Mosaic on TPU, interpret mode on CPU) in the structure of flash-linear-attention's
chunk_gated_delta_rule. Forward:
  1. `_wy_kernel`, grid (B, H, N): A = beta K K^T . e^{g_i-g_j} (strictly lower), its inverse
     T = (I + A)^{-1} by recursive block doubling (block sizes 1, 2, 4, ..., C: each step
     T <- T - T E T with E the off-diagonal blocks of the next level; exact, matmul-only),
     then W = T diag(beta e^{g}) K and U~ = T diag(beta) V (and, for the backward, T itself).
  2. `_state_kernel`, grid (B, H, V/BV), a sequential fori_loop over chunks with the float32
     state in registers: stores the entering state h_n, U = U~ - W h_n, and
     S <- e^{g_C} S + (K . e^{g_C - g})^T U.
  3. `_output_kernel`, grid (B, H, N): O = scale (e^{g} . Q h_n + [(Q K^T) . e^{g_i-g_j}]_{j<=i} U).
Backward (`delta_rule` is a jax.custom_vjp saving the inputs and T, as fla does):
  4. `_wu_kernel`, grid (B, H, N): W and U~ again from T; then kernel 2 again (h_n, U).
  5. `_dv_local_kernel`, grid (B, H, N): the intra-chunk part of dU, scale P^T dO.
  6. `_dstate_kernel`, grid (B, H, V/BV), a reverse fori_loop carrying the float32 state
     gradient: stores dS' (the gradient at each chunk's exit) and dU = scale P^T dO + K~ dS',
     then dS = e^{g_C} dS' + scale (e^g Q)^T dO - W^T dU.
  7. `_grad_qk_kernel`, grid (B, H, N, K/BK), a loop over V blocks: dq, the output and state
     parts of dk, dW = -dU h^T and their gate terms (fla's chunk_bwd_dqkwg).
  8. `_grad_wy_kernel`, grid (B, H, N): dT through W and U~, dA = -T^T dT T^T, then dk, dv,
     dbeta and the gate terms of A and W (fla's prepare_wy_repr_bwd).
The gate gradients (w.r.t. the chunk-local cumulative gates g, g0) are partial sums from 7 and 8
added in XLA; their chain to log_decay is autodiff of the cumsum in `chunked_jnp.prepare_gates`.
Matmul operands are in the input dtype (float32 operands use IEEE precision), accumulation
and the carried states are float32, every exponent is <= 0 and masks use `where`.
`Tuning` holds the Triton launch knobs of each kernel.

Platforms (`platform="gpu"|"tpu"`; None: "tpu" when JAX's default backend is TPU, else "gpu").
The kernel bodies are shared; the TPU form differs only around them, to meet Mosaic's block
rules (last two block dims divisible by (8, 128) or whole):
  - q, k, v, o and their gradients are [B, H, T, D] (the wrapper transposes), not [B, T, H, D];
  - per-position vectors [..., Tp] are passed as [..., N, 1, C] (one chunk per block);
  - head dims are never split (whole K and V blocks);
  - the sequential kernels (2, 6) take one chunk per step of a fourth, "arbitrary" grid axis
    and keep their float32 carry in VMEM scratch, instead of looping over a whole-sequence
    block (which would have to fit VMEM) (both loop forms: `pallas_kernels.common`);
  - `pltpu.CompilerParams` with dimension semantics replace the Triton knobs, and interpret
    mode is Pallas' TPU interpreter.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common
from pallas_kernels.common import resolve_platform
from pallas_kernels.delta_rule import chunked_jnp as chunked_lib

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Tuning:
  """Triton launch knobs: (num_warps, num_stages) per kernel; the V block of the two
  sequential kernels (None: the largest of 64, 32, 16 that gives at least 128, resp. 256,
  programs, since B*H alone can leave most of the GPU idle); the K block and inner V block of
  `_grad_qk_kernel`. Blocks are clipped to the (padded) head dims. Defaults: the fastest in
  experiments/gpu/profile_delta_rule.py's sweep on one H200 (gated, bf16, H=16, K=V=128):
  forward 0.56 / 0.79 ms, forward+backward 1.94 / 2.87 ms at B,T = 4,4096 / 1,16384.
  TPU ignores them (whole head-dim blocks, one chunk per grid step)."""
  wy: tuple[int, int] = (4, 3)
  state: tuple[int, int] = (4, 3)
  output: tuple[int, int] = (4, 3)
  wu: tuple[int, int] = (8, 2)
  dv_local: tuple[int, int] = (4, 2)
  dstate: tuple[int, int] = (4, 2)
  grad_qk: tuple[int, int] = (4, 2)
  grad_wy: tuple[int, int] = (4, 2)
  state_block_v: int | None = None
  dstate_block_v: int | None = None
  grad_block_k: int = 64
  grad_block_v: int = 64


def _dot(a, b, precision, trans_a=False, trans_b=False):
  return common.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=precision)


def _iota(c):
  return (lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _last(x):
  """x[-1] of a 1-D vector, as a masked sum (portable: no scalar extraction)."""
  i = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(i == x.shape[0] - 1, x, 0.0))


def _masks(chunk, run_ref):
  """(j <= i, j < i) within one segment run."""
  row, col = _iota(chunk)
  incl, strict = row >= col, row > col
  if run_ref is not None:
    run = run_ref[...]
    same = run[:, None] == run[None, :]
    incl, strict = incl & same, strict & same
  return incl, strict


def _end_gate(g, run):
  """e^{g_C - g_j}, zero for positions before the chunk's last reset."""
  end = jnp.exp(_last(g) - g)
  return end if run is None else jnp.where(run == _last(run), end, 0.0)


def _unpack(refs, n_in, gated, segmented):
  """Splits kernel refs into (inputs, g, g0, run, outputs); absent gates are None."""
  ins, rest = list(refs[:n_in]), list(refs[n_in:])
  g = g0 = run = None
  if gated:
    g, g0, *rest = rest
  if segmented:
    run, *rest = rest
  return ins, g, g0, run, rest


def _invert_unit_lower(a, chunk, precision):
  """(I + A)^{-1} for strictly lower A [C, C] by block doubling: after the level with block
  size s, t is the exact inverse of the block-diagonal part of I + A with blocks of size 2s
  (t <- t - t E t, E the entries in one 2s-block but different s-blocks: s <= i ^ j < 2s)."""
  row, col = _iota(chunk)
  xor = row ^ col
  eye = jnp.where(row == col, 1.0, 0.0).astype(F32)
  t = eye - jnp.where(xor == 1, a, 0.0)
  s = 2
  while s < chunk:
    e = jnp.where((xor >= s) & (xor < 2 * s), a, 0.0)
    t = t - _dot(t, _dot(e, t, precision), precision)
    s *= 2
  return t


def _store_wu(t, k_ref, v_ref, beta, g0_ref, w_ref, u_ref, precision):
  """W = T diag(beta e^{g0}) K, U~ = T diag(beta) V."""
  dt = k_ref.dtype
  scale_k = beta if g0_ref is None else beta * jnp.exp(g0_ref[...])
  kb = (k_ref[...].astype(F32) * scale_k[:, None]).astype(dt)
  vb = (v_ref[...].astype(F32) * beta[:, None]).astype(dt)
  w_ref[...] = _dot(t, kb, precision).astype(dt)
  u_ref[...] = _dot(t, vb, precision).astype(dt)


def _wy_kernel(*refs, chunk, gated, segmented, precision):
  (k_ref, v_ref, beta_ref), g_ref, g0_ref, run_ref, outs = _unpack(refs, 3, gated, segmented)
  k, beta = k_ref[...], beta_ref[...]
  _, strict = _masks(chunk, run_ref)
  a = beta[:, None] * _dot(k, k, precision, trans_b=True)
  if gated:
    g = g_ref[...]
    a = a * jnp.exp(jnp.where(strict, g[:, None] - g[None, :], 0.0))
  t = _invert_unit_lower(jnp.where(strict, a, 0.0), chunk, precision).astype(k.dtype)
  _store_wu(t, k_ref, v_ref, beta, g0_ref, outs[0], outs[1], precision)
  if len(outs) == 3:
    outs[2][...] = t


def _wu_kernel(*refs, chunk, gated, segmented, precision):
  """W and U~ from the stored T (the backward's recomputation)."""
  del chunk
  (k_ref, v_ref, beta_ref, t_ref), _, g0_ref, _, (w_ref, u_ref) = _unpack(
      refs, 4, gated, segmented)
  _store_wu(t_ref[...], k_ref, v_ref, beta_ref[...], g0_ref, w_ref, u_ref, precision)


def _state_kernel(*refs, chunk, n_chunks, gated, segmented, precision, loop):
  (w_ref, ut_ref, k_ref, s0_ref), g_ref, g0_ref, run_ref, (h_ref, u_ref, sf_ref) = _unpack(
      refs, 4, gated, segmented)
  dt = k_ref.dtype

  def body(n, state):
    sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    h_ref[n, :, :] = state.astype(h_ref.dtype)
    u = ut_ref[sl, :].astype(F32) - _dot(w_ref[sl, :], state.astype(dt), precision)
    u = u.astype(dt)
    u_ref[sl, :] = u
    k = k_ref[sl, :]
    if gated:
      end = _end_gate(g_ref[sl], None if run_ref is None else run_ref[sl])
      k = (k.astype(F32) * end[:, None]).astype(dt)
      state = jnp.exp(_last(g0_ref[sl])) * state
    return state + _dot(k, u, precision, trans_a=True)

  loop(body, n_chunks, s0_ref, sf_ref)


def _decayed_scores(q, k, g_ref, mask, precision):
  """[(Q K^T) . e^{g_i-g_j}]_{mask}, float32."""
  p = _dot(q, k, precision, trans_b=True)
  if g_ref is not None:
    g = g_ref[...]
    p = p * jnp.exp(jnp.where(mask, g[:, None] - g[None, :], 0.0))
  return jnp.where(mask, p, 0.0)


def _output_kernel(*refs, chunk, scale, gated, segmented, precision):
  (q_ref, k_ref, h_ref, u_ref), g_ref, g0_ref, run_ref, (o_ref,) = _unpack(
      refs, 4, gated, segmented)
  q = q_ref[...]
  incl, _ = _masks(chunk, run_ref)
  p = _decayed_scores(q, k_ref[...], g_ref, incl, precision).astype(q.dtype)
  inter = _dot(q, h_ref[...], precision)
  if gated:
    inter = inter * jnp.exp(g0_ref[...])[:, None]
  o_ref[...] = (scale * (inter + _dot(p, u_ref[...], precision))).astype(o_ref.dtype)


def _dv_local_kernel(*refs, chunk, scale, gated, segmented, precision):
  """Intra-chunk part of dU: scale P^T dO."""
  (q_ref, k_ref, do_ref), g_ref, _, run_ref, (dvl_ref,) = _unpack(refs, 3, gated, segmented)
  incl, _ = _masks(chunk, run_ref)
  p = _decayed_scores(q_ref[...], k_ref[...], g_ref, incl, precision).astype(q_ref.dtype)
  dvl_ref[...] = (scale * _dot(p, do_ref[...], precision, trans_a=True)).astype(dvl_ref.dtype)


def _dstate_kernel(*refs, chunk, n_chunks, scale, gated, segmented, precision, loop):
  """Reverse pass over chunks: dU = dU_local + K~ dS', dS <- e^{g_C} dS' + scale (e^g Q)^T dO
  - W^T dU; stores dS' (the gradient at each chunk's exit) and dU."""
  (q_ref, k_ref, w_ref, do_ref, dvl_ref, dsf_ref), g_ref, g0_ref, run_ref, outs = _unpack(
      refs, 6, gated, segmented)
  dh_ref, du_ref, ds0_ref = outs
  dt = k_ref.dtype

  def body(i, ds):
    n = n_chunks - 1 - i
    sl = pl.ds(pl.multiple_of(n * chunk, chunk), chunk)
    dh_ref[n, :, :] = ds.astype(dh_ref.dtype)
    q, k = q_ref[sl, :], k_ref[sl, :]
    if gated:
      g0 = g0_ref[sl]
      end = _end_gate(g_ref[sl], None if run_ref is None else run_ref[sl])
      k = (k.astype(F32) * end[:, None]).astype(dt)
      q = (q.astype(F32) * jnp.exp(g0)[:, None]).astype(dt)
    du = (dvl_ref[sl, :].astype(F32) + _dot(k, ds.astype(dt), precision)).astype(dt)
    du_ref[sl, :] = du
    new = (scale * _dot(q, do_ref[sl, :], precision, trans_a=True)
           - _dot(w_ref[sl, :], du, precision, trans_a=True))
    if gated:
      ds = jnp.exp(_last(g0)) * ds
    return ds + new

  loop(body, n_chunks, dsf_ref, ds0_ref)


def _grad_qk_kernel(*refs, chunk, block_v, scale, gated, segmented, precision):
  """For one chunk and K block, looping over V blocks: dq, the output and state parts of dk
  (float32), dW = -dU h^T, and the gate gradients of these terms (partial over K blocks)."""
  ins, g_ref, g0_ref, run_ref, outs = _unpack(refs, 7, gated, segmented)
  q_ref, k_ref, h_ref, dh_ref, do_ref, u_ref, du_ref = ins
  dq_ref, dk_ref, dw_ref = outs[:3]
  dt = q_ref.dtype
  bk = q_ref.shape[-1]

  def body(j, acc):
    ds, dqh, dkh, dwh, hdh = acc
    sl = pl.ds(pl.multiple_of(j * block_v, block_v), block_v)
    do, u, du, h, dh = (r[:, sl] for r in (do_ref, u_ref, du_ref, h_ref, dh_ref))
    ds = ds + _dot(do, u, precision, trans_b=True)
    dqh = dqh + _dot(do, h, precision, trans_b=True)
    dkh = dkh + _dot(u, dh, precision, trans_b=True)
    dwh = dwh + _dot(du, h, precision, trans_b=True)
    if gated:
      hdh = hdh + jnp.sum(h.astype(F32) * dh.astype(F32), axis=1)
    return ds, dqh, dkh, dwh, hdh

  zeros = lambda *s: jnp.zeros(s, F32)
  init = (zeros(chunk, chunk), zeros(chunk, bk), zeros(chunk, bk), zeros(chunk, bk), zeros(bk))
  ds, dqh, dkh, dwh, hdh = lax.fori_loop(0, do_ref.shape[-1] // block_v, body, init)

  q, k = q_ref[...], k_ref[...]
  incl, _ = _masks(chunk, run_ref)
  dp = jnp.where(incl, scale * ds, 0.0)          # dP, P = [Q K^T . decay]_{j<=i}
  if gated:
    g, g0 = g_ref[...], g0_ref[...]
    dp = dp * jnp.exp(jnp.where(incl, g[:, None] - g[None, :], 0.0))
    dqh = dqh * (scale * jnp.exp(g0))[:, None]
    dkh = dkh * _end_gate(g, None if run_ref is None else run_ref[...])[:, None]
  else:
    dqh = scale * dqh
  dp = dp.astype(dt)
  dq_p = _dot(dp, k, precision)
  dk_p = _dot(dp, q, precision, trans_a=True)
  dq_ref[...] = (dqh + dq_p).astype(dq_ref.dtype)
  dk_ref[...] = dk_p + dkh
  dw_ref[...] = (-dwh).astype(dw_ref.dtype)
  if gated:
    dg_ref, dg0_ref = outs[3:]
    qf, kf = q.astype(F32), k.astype(F32)
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    # P's decay: rows +g_i, columns -g_j; S' = e^{g0_C} h + (K . e^{g_C - g})^T U
    dend = jnp.sum(kf * dkh, axis=1)
    dg_ref[...] = (jnp.sum(qf * dq_p, axis=1) - jnp.sum(kf * dk_p, axis=1) - dend
                   + jnp.where(is_last, jnp.sum(dend), 0.0))
    state_term = jnp.exp(_last(g0)) * jnp.sum(hdh)
    dg0_ref[...] = jnp.sum(qf * dqh, axis=1) + jnp.where(is_last, state_term, 0.0)


def _grad_wy_kernel(*refs, chunk, gated, segmented, precision):
  """Backward through W = T diag(beta e^{g0}) K and U~ = T diag(beta) V with the stored
  T = (I + A)^{-1}: dA = -T^T dT T^T, then dk (adding the partial dk), dv, dbeta and the gate
  gradients of A and W."""
  ins, g_ref, g0_ref, run_ref, outs = _unpack(refs, 7, gated, segmented)
  k_ref, v_ref, beta_ref, t_ref, dw_ref, du_ref, dkp_ref = ins
  dk_ref, dv_ref, dbeta_ref = outs[:3]
  dt = k_ref.dtype
  k, v, beta, t, dw, du = (r[...] for r in (k_ref, v_ref, beta_ref, t_ref, dw_ref, du_ref))
  kf = k.astype(F32)
  _, strict = _masks(chunk, run_ref)
  gamma0 = jnp.exp(g0_ref[...]) if gated else jnp.ones((chunk,), F32)
  bg = beta * gamma0
  xw = (kf * bg[:, None]).astype(dt)
  xu = (v.astype(F32) * beta[:, None]).astype(dt)
  dtm = _dot(dw, xw, precision, trans_b=True) + _dot(du, xu, precision, trans_b=True)
  dxw = _dot(t, dw, precision, trans_a=True)
  dxu = _dot(t, du, precision, trans_a=True)
  sw = jnp.sum(kf * dxw, axis=1)
  da = _dot(_dot(t, dtm.astype(dt), precision, trans_a=True).astype(dt), t, precision,
            trans_b=True)
  da = jnp.where(strict, -da, 0.0)
  if gated:                                       # A = beta K K^T . decay
    g = g_ref[...]
    da = da * jnp.exp(jnp.where(strict, g[:, None] - g[None, :], 0.0))
  da_kk = da * _dot(k, k, precision, trans_b=True)
  dkk = (da * beta[:, None]).astype(dt)
  dk = (dkp_ref[...] + bg[:, None] * dxw + _dot(dkk, k, precision)
        + _dot(dkk, k, precision, trans_a=True))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = (beta[:, None] * dxu).astype(dv_ref.dtype)
  dbeta_ref[...] = gamma0 * sw + jnp.sum(v.astype(F32) * dxu, axis=1) + jnp.sum(da_kk, axis=1)
  if gated:
    dg_ref, dg0_ref = outs[3:]
    grad_decay = da_kk * beta[:, None]
    dg_ref[...] = jnp.sum(grad_decay, axis=1) - jnp.sum(grad_decay, axis=0)
    dg0_ref[...] = bg * sw


class Kernels:
  """The pallas_calls for one problem shape; each method is one kernel launch.

  q, v give the shapes and the operand dtype: [B, Tp, H, K], [B, Tp, H, V] on GPU and
  [B, H, Tp, K], [B, H, Tp, V] on TPU (the "token layout" of q, k, v, o, do and their
  gradients; Tp a multiple of `chunk`, K and V powers of two). Other arrays are [B, H, ...]."""

  def __init__(self, q, v, *, chunk, gated, segmented, interpret=False, tuning=Tuning(),
               platform=None):
    self.tpu = resolve_platform(platform) == "tpu"
    if self.tpu:
      self.b, self.h, self.tp, self.kd = q.shape
    else:
      self.b, self.tp, self.h, self.kd = q.shape
    self.vd = v.shape[-1]
    self.n = self.tp // chunk
    self.chunk, self.gated, self.segmented = chunk, gated, segmented
    self.dt = q.dtype
    self.precision = lax.Precision.HIGHEST if self.dt == F32 else lax.Precision.DEFAULT
    self.interpret, self.tuning = interpret, tuning
    if self.tpu:          # whole head dims; the sequential kernels see one chunk per block
      self.state_block_v = self.dstate_block_v = self.grad_block_v = self.vd
      self.grad_block_k = self.kd
      self.seq_chunks = 1
    else:
      self.state_block_v = self._block_v(tuning.state_block_v, 128)
      self.dstate_block_v = self._block_v(tuning.dstate_block_v, 256)
      self.grad_block_k = min(tuning.grad_block_k, self.kd)
      self.grad_block_v = min(tuning.grad_block_v, self.vd)
      self.seq_chunks = self.n

  def _call(self, kernel, name, launch, grid, in_specs, out_specs, out_shape, carry=None,
            **kw):
    """carry: the [K, BV] float32 carry of a sequential kernel (`common.pallas_call`)."""
    kernel = functools.partial(kernel, chunk=self.chunk, gated=self.gated,
                               segmented=self.segmented, precision=self.precision, **kw)
    return common.pallas_call(kernel, tpu=self.tpu, interpret=self.interpret, grid=grid,
                              in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
                              name=name, carry=carry, chunks=self.n, launch=launch)

  def _block_v(self, block_v, programs):
    if block_v is None:
      block_v = 64
      while block_v > 16 and self.b * self.h * (self.vd // block_v) < programs:
        block_v //= 2
    return min(block_v, self.vd)

  def _shape(self, *dims, dtype=None):
    return jax.ShapeDtypeStruct(dims, dtype or self.dt)

  def _tok_shape(self, d, dtype=None):
    b, h, tp = self.b, self.h, self.tp
    return self._shape(*((b, h, tp, d) if self.tpu else (b, tp, h, d)), dtype=dtype)

  def _vec_shape(self, *lead):
    """A float32 per-position vector [*lead, Tp] ([*lead, N, 1, C] on TPU)."""
    tail = (self.n, 1, self.chunk) if self.tpu else (self.tp,)
    return self._shape(*lead, *tail, dtype=F32)

  def _vecs(self, *xs):
    """Per-position vectors [..., Tp] as the kernels take them ([..., N, 1, C] on TPU)."""
    if not self.tpu:
      return list(xs)
    return [x.reshape(*x.shape[:-1], self.n, 1, self.chunk) for x in xs]

  def _unvecs(self, xs):
    if not self.tpu:
      return list(xs)
    return [x.reshape(*x.shape[:-3], self.tp) for x in xs]

  # BlockSpecs on a (b, h, n) grid: one chunk ------------------------------------------------
  def _gates(self):
    c = self.chunk
    if self.tpu:
      return ([pl.BlockSpec((None,) * 4 + (c,), lambda i, j, n, *_: (i, j, n, 0, 0))]
              * (2 * self.gated)
              + [pl.BlockSpec((None,) * 3 + (c,), lambda i, j, n, *_: (i, n, 0, 0))]
              * self.segmented)
    return ([pl.BlockSpec((None, None, c), lambda i, j, n, *_: (i, j, n))] * (2 * self.gated)
            + [pl.BlockSpec((None, c), lambda i, j, n, *_: (i, n))] * self.segmented)

  def _tok(self, d):       # token layout: [B, T, H, D] (GPU), [B, H, T, D] (TPU)
    if self.tpu:
      return self._bhtd(d)
    return pl.BlockSpec((None, self.chunk, None, d), lambda i, j, n: (i, n, j, 0))

  def _bhtd(self, d):      # [B, H, T, D]
    return pl.BlockSpec((None, None, self.chunk, d), lambda i, j, n: (i, j, n, 0))

  def _vec(self):          # [B, H, T] ([B, H, N, 1, C] on TPU)
    if self.tpu:
      return pl.BlockSpec((None,) * 4 + (self.chunk,), lambda i, j, n: (i, j, n, 0, 0))
    return pl.BlockSpec((None, None, self.chunk), lambda i, j, n: (i, j, n))

  def _state(self):        # [B, H, N, K, V]
    return pl.BlockSpec((None, None, None, self.kd, self.vd), lambda i, j, n: (i, j, n, 0, 0))

  # BlockSpecs of the sequential kernels. GPU: a (b, h, v-block) grid, blocks holding the whole
  # sequence. TPU: a (b, h, v-block, step) grid, blocks holding one chunk: chunk `step`, or
  # chunk N-1-step with `reverse`.
  def _chunk_at(self, reverse):
    return (lambda step: self.n - 1 - step) if reverse else (lambda step: step)

  def _seq_gates(self, reverse=False):
    tp = self.tp
    if self.tpu:
      c, at = self.chunk, self._chunk_at(reverse)
      return ([pl.BlockSpec((None,) * 4 + (c,), lambda i, j, x, s: (i, j, at(s), 0, 0))]
              * (2 * self.gated)
              + [pl.BlockSpec((None,) * 3 + (c,), lambda i, j, x, s: (i, at(s), 0, 0))]
              * self.segmented)
    return ([pl.BlockSpec((None, None, tp), lambda i, j, c: (i, j, 0))] * (2 * self.gated)
            + [pl.BlockSpec((None, tp), lambda i, j, c: (i, 0))] * self.segmented)

  def _seq_tok(self, d, bv=None, reverse=False):
    if self.tpu:
      return self._seq_bhtd(d, bv, reverse)
    if bv is None:
      return pl.BlockSpec((None, self.tp, None, d), lambda i, j, c: (i, 0, j, 0))
    return pl.BlockSpec((None, self.tp, None, bv), lambda i, j, c: (i, 0, j, c))

  def _seq_bhtd(self, d, bv=None, reverse=False):
    if self.tpu:
      at = self._chunk_at(reverse)
      if bv is None:
        return pl.BlockSpec((None, None, self.chunk, d), lambda i, j, x, s: (i, j, at(s), 0))
      return pl.BlockSpec((None, None, self.chunk, bv), lambda i, j, x, s: (i, j, at(s), x))
    if bv is None:
      return pl.BlockSpec((None, None, self.tp, d), lambda i, j, c: (i, j, 0, 0))
    return pl.BlockSpec((None, None, self.tp, bv), lambda i, j, c: (i, j, 0, c))

  def _seq_states(self, bv, reverse=False):
    if self.tpu:
      at = self._chunk_at(reverse)
      return pl.BlockSpec((None, None, 1, self.kd, bv), lambda i, j, x, s: (i, j, at(s), 0, x))
    return pl.BlockSpec((None, None, self.n, self.kd, bv), lambda i, j, c: (i, j, 0, 0, c))

  def _seq_state(self, bv):
    if self.tpu:
      return pl.BlockSpec((None, None, self.kd, bv), lambda i, j, x, s: (i, j, 0, x))
    return pl.BlockSpec((None, None, self.kd, bv), lambda i, j, c: (i, j, 0, c))

  # Kernels -----------------------------------------------------------------------------------
  def wy(self, k, v, beta, gates, with_t=False):
    """(W [B,H,Tp,K], U~ [B,H,Tp,V]) and, with_t, T = (I + A)^{-1} [B,H,Tp,C]."""
    b, h, tp, c = self.b, self.h, self.tp, self.chunk
    out_specs = [self._bhtd(self.kd), self._bhtd(self.vd)]
    out_shape = [self._shape(b, h, tp, self.kd), self._shape(b, h, tp, self.vd)]
    if with_t:
      out_specs.append(self._bhtd(c))
      out_shape.append(self._shape(b, h, tp, c))
    return self._call(
        _wy_kernel, "delta_rule_wy", self.tuning.wy, (b, h, self.n),
        [self._tok(self.kd), self._tok(self.vd), self._vec()] + self._gates(),
        out_specs, out_shape)(k, v, *self._vecs(beta, *gates))

  def wu(self, k, v, beta, t, gates):
    """(W, U~) from the stored T."""
    b, h, tp = self.b, self.h, self.tp
    beta, *gates = self._vecs(beta, *gates)
    return self._call(
        _wu_kernel, "delta_rule_wu", self.tuning.wu, (b, h, self.n),
        [self._tok(self.kd), self._tok(self.vd), self._vec(), self._bhtd(self.chunk)]
        + self._gates(),
        [self._bhtd(self.kd), self._bhtd(self.vd)],
        [self._shape(b, h, tp, self.kd), self._shape(b, h, tp, self.vd)])(k, v, beta, t, *gates)

  def states(self, w, u_tilde, k, s0, gates):
    """(h [B,H,N,K,V] entering states, U [B,H,Tp,V], final state [B,H,K,V] float32)."""
    b, h, tp, kd, vd = self.b, self.h, self.tp, self.kd, self.vd
    bv = self.state_block_v
    return self._call(
        _state_kernel, "delta_rule_state", self.tuning.state, (b, h, vd // bv),
        [self._seq_bhtd(kd), self._seq_bhtd(vd, bv), self._seq_tok(kd), self._seq_state(bv)]
        + self._seq_gates(),
        [self._seq_states(bv), self._seq_bhtd(vd, bv), self._seq_state(bv)],
        [self._shape(b, h, self.n, kd, vd), self._shape(b, h, tp, vd),
         self._shape(b, h, kd, vd, dtype=F32)],
        carry=(kd, bv), n_chunks=self.seq_chunks)(w, u_tilde, k, s0, *self._vecs(*gates))

  def output(self, q, k, states, u, gates, scale, out_dtype):
    return self._call(
        _output_kernel, "delta_rule_output", self.tuning.output, (self.b, self.h, self.n),
        [self._tok(self.kd), self._tok(self.kd), self._state(), self._bhtd(self.vd)]
        + self._gates(),
        self._tok(self.vd), self._tok_shape(self.vd, dtype=out_dtype),
        scale=scale)(q, k, states, u, *self._vecs(*gates))

  def dv_local(self, q, k, do, gates, scale):
    """scale P^T dO [B,H,Tp,V]."""
    return self._call(
        _dv_local_kernel, "delta_rule_dv_local", self.tuning.dv_local, (self.b, self.h, self.n),
        [self._tok(self.kd), self._tok(self.kd), self._tok(self.vd)] + self._gates(),
        self._bhtd(self.vd), self._shape(self.b, self.h, self.tp, self.vd),
        scale=scale)(q, k, do, *self._vecs(*gates))

  def dstates(self, q, k, w, do, dvl, dsf, gates, scale):
    """(dS' [B,H,N,K,V] at each chunk's exit, dU [B,H,Tp,V], d initial state float32)."""
    b, h, tp, kd, vd = self.b, self.h, self.tp, self.kd, self.vd
    bv = self.dstate_block_v
    rev = {"reverse": True}
    return self._call(
        _dstate_kernel, "delta_rule_dstate", self.tuning.dstate, (b, h, vd // bv),
        [self._seq_tok(kd, **rev), self._seq_tok(kd, **rev), self._seq_bhtd(kd, **rev),
         self._seq_tok(vd, bv, **rev), self._seq_bhtd(vd, bv, **rev), self._seq_state(bv)]
        + self._seq_gates(**rev),
        [self._seq_states(bv, **rev), self._seq_bhtd(vd, bv, **rev), self._seq_state(bv)],
        [self._shape(b, h, self.n, kd, vd), self._shape(b, h, tp, vd),
         self._shape(b, h, kd, vd, dtype=F32)],
        carry=(kd, bv), n_chunks=self.seq_chunks, scale=scale,
    )(q, k, w, do, dvl, dsf, *self._vecs(*gates))

  def grad_qk(self, q, k, states, dstates, do, u, du, gates, scale):
    """(dq (token layout), partial dk [B,H,Tp,K] float32, dW [B,H,Tp,K]) and, gated, the
    partial gate gradients (dg, dg0) [B,H,K/BK,Tp]."""
    b, h, tp, kd, vd, c = self.b, self.h, self.tp, self.kd, self.vd, self.chunk
    bk = self.grad_block_k
    nk = kd // bk
    bhtk = pl.BlockSpec((None, None, c, bk), lambda i, j, n, x: (i, j, n, x))
    state = pl.BlockSpec((None, None, None, bk, vd), lambda i, j, n, x: (i, j, n, x, 0))
    bhtv = pl.BlockSpec((None, None, c, vd), lambda i, j, n, x: (i, j, n, 0))
    if self.tpu:
      tok_k, tok_v = bhtk, bhtv
      part = pl.BlockSpec((None,) * 5 + (c,), lambda i, j, n, x: (i, j, x, n, 0, 0))
    else:
      tok_k = pl.BlockSpec((None, c, None, bk), lambda i, j, n, x: (i, n, j, x))
      tok_v = pl.BlockSpec((None, c, None, vd), lambda i, j, n, x: (i, n, j, 0))
      part = pl.BlockSpec((None, None, None, c), lambda i, j, n, x: (i, j, x, n))
    dq, dk, dw, *parts = self._call(
        _grad_qk_kernel, "delta_rule_grad_qk", self.tuning.grad_qk, (b, h, self.n, nk),
        [tok_k, tok_k, state, state, tok_v, bhtv, bhtv] + self._gates(),
        [tok_k, bhtk, bhtk] + [part] * (2 * self.gated),
        [self._tok_shape(kd), self._shape(b, h, tp, kd, dtype=F32),
         self._shape(b, h, tp, kd)] + [self._vec_shape(b, h, nk)] * (2 * self.gated),
        scale=scale, block_v=self.grad_block_v,
    )(q, k, states, dstates, do, u, du, *self._vecs(*gates))
    return dq, dk, dw, *self._unvecs(parts)

  def grad_wy(self, k, v, beta, t, dw, du, dk_part, gates):
    """(dk, dv (token layout), dbeta [B,H,Tp]) and, gated, (dg, dg0) [B,H,Tp] of A, W."""
    b, h, kd, vd = self.b, self.h, self.kd, self.vd
    beta, *gates = self._vecs(beta, *gates)
    dk, dv, *vecs = self._call(
        _grad_wy_kernel, "delta_rule_grad_wy", self.tuning.grad_wy, (b, h, self.n),
        [self._tok(kd), self._tok(vd), self._vec(), self._bhtd(self.chunk), self._bhtd(kd),
         self._bhtd(vd), self._bhtd(kd)] + self._gates(),
        [self._tok(kd), self._tok(vd)] + [self._vec()] * (1 + 2 * self.gated),
        [self._tok_shape(kd), self._tok_shape(vd)]
        + [self._vec_shape(b, h)] * (1 + 2 * self.gated),
    )(k, v, beta, t, dw, du, dk_part, *gates)
    return dk, dv, *self._unvecs(vecs)


def _gates(g, g0, run):
  return ([g, g0] if g is not None else []) + ([run] if run is not None else [])


def _kernels(q, v, g, run, chunk, interpret, tuning, platform):
  return Kernels(q, v, chunk=chunk, gated=g is not None, segmented=run is not None,
                 interpret=interpret, tuning=tuning, platform=platform)


_STATIC = ("scale", "chunk", "interpret", "tuning", "platform")


@functools.partial(jax.jit, static_argnames=_STATIC + ("with_t",))
def forward(q, k, v, beta, g, g0, run, initial_state, *, scale, chunk, interpret=False,
            tuning=Tuning(), platform=None, with_t=False):
  """Kernel forward on prepared inputs (see chunked_jnp.chunked; q, k, v in the platform's
  token layout, see `Kernels`); head dims powers of two >= 16. Returns (o, final_state), and
  T = (I + A)^{-1} [B,H,Tp,C] (the backward's residual) with_t."""
  calls = _kernels(q, v, g, run, chunk, interpret, tuning, platform)
  gates = _gates(g, g0, run)
  w, u_tilde, *t = calls.wy(k, v, beta, gates, with_t=with_t)
  states, u, final = calls.states(w, u_tilde, k, initial_state, gates)
  return (calls.output(q, k, states, u, gates, scale, v.dtype), final, *t)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(q, k, v, beta, g, g0, run, initial_state, t, do, dfinal, *, scale, chunk,
             interpret=False, tuning=Tuning(), platform=None):
  """Kernel backward from the inputs and the forward's T: recomputes W, U~, the chunk states
  and U, then the reverse state-gradient pass and the two per-chunk gradient kernels.
  Returns (dq, dk, dv, dbeta, dg, dg0, ds0)."""
  calls = _kernels(q, v, g, run, chunk, interpret, tuning, platform)
  gates = _gates(g, g0, run)
  w, u_tilde = calls.wu(k, v, beta, t, gates)
  states, u, _ = calls.states(w, u_tilde, k, initial_state, gates)
  do = do.astype(v.dtype)
  dvl = calls.dv_local(q, k, do, gates, scale)
  dstates, du, ds0 = calls.dstates(q, k, w, do, dvl, dfinal.astype(F32), gates, scale)
  dq, dk_part, dw, *dg_qk = calls.grad_qk(q, k, states, dstates, do, u, du, gates, scale)
  dk, dv, dbeta, *dg_wy = calls.grad_wy(k, v, beta, t, dw, du, dk_part, gates)
  dg = dg0 = None
  if g is not None:
    dg, dg0 = (part.sum(axis=2) + wy for part, wy in zip(dg_qk, dg_wy))
  return dq, dk, dv, dbeta, dg, dg0, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _delta_rule_vjp(q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret, tuning,
                    platform):
  return forward(q, k, v, beta, g, g0, run, initial_state, scale=scale, chunk=chunk,
                 interpret=interpret, tuning=tuning, platform=platform)


def _vjp_fwd(q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret, tuning,
             platform):
  o, final, t = forward(q, k, v, beta, g, g0, run, initial_state, scale=scale, chunk=chunk,
                        interpret=interpret, tuning=tuning, platform=platform, with_t=True)
  return (o, final), (q, k, v, beta, g, g0, run, initial_state, t)


def _vjp_bwd(scale, chunk, interpret, tuning, platform, residuals, cotangents):
  run = residuals[6]
  dq, dk, dv, dbeta, dg, dg0, ds0 = backward(*residuals, *cotangents, scale=scale, chunk=chunk,
                                             interpret=interpret, tuning=tuning,
                                             platform=platform)
  drun = None if run is None else jnp.zeros_like(run)
  return dq, dk, dv, dbeta, dg, dg0, drun, ds0


_delta_rule_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def delta_rule(q, k, v, beta, *, scale, log_decay=None, initial_state=None,
               segment_ids=None, chunk=None, interpret=False, tuning=Tuning(), platform=None):
  """Chunked delta rule through the Pallas kernels, differentiable.

  q, k [B,T,H,K], v [B,T,H,V] (one dtype), beta [B,T,H], log_decay [B,T,H] or None,
  initial_state [B,H,K,V] or None, segment_ids [B,T] or None (state reset where it changes).
  platform: "gpu" | "tpu" | None (from JAX's default backend); with interpret=True it picks
  the interpreter (TPU: Pallas' TPU interpret mode) and the layout that runs there.
  Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32).
  """
  platform = resolve_platform(platform)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = chunk or chunked_lib.chunk_size_for(t)
  beta_p, g, g0, run = chunked_lib.prepare_gates(beta, log_decay, segment_ids, chunk)
  tp = beta_p.shape[-1]
  pk, pv = common.next_pow2(dk, 16), common.next_pow2(dv, 16)
  pad = lambda x, d: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])))
  if initial_state is None:
    s0 = jnp.zeros((b, h, pk, pv), F32)
  else:
    s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, pk - dk), (0, pv - dv)))
  q, k, v = pad(q, pk), pad(k, pk), pad(v, pv)
  if platform == "tpu":             # token layout [B, H, T, D]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  o, final = _delta_rule_vjp(q, k, v, beta_p, g, g0, run, s0, float(scale), chunk, interpret,
                             tuning, platform)
  if platform == "tpu":
    o = jnp.swapaxes(o, 1, 2)
  return o[:, :t, :, :dv], final[:, :, :dk, :dv]
