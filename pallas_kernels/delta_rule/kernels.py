"""Kernel bodies of the chunked (WY) delta rule: DeltaNet (Yang et al. 2024, "Parallelizing
Linear Transformers with the Delta Rule over Sequence Length") and Gated DeltaNet (Yang, Kautz &
Hatamizadeh 2024). The math is in `chunked_jnp.py`'s docstring.

Portable pallas_calls (BlockSpecs, fori_loop, power-of-two blocks; Triton lowering on GPU,
Mosaic on TPU, interpret mode on CPU) in the structure of flash-linear-attention's
chunk_gated_delta_rule. Forward:
  1. `wy_kernel`, grid (B, H, N): A = beta K K^T . e^{g_i-g_j} (strictly lower), its inverse
     T = (I + A)^{-1} by recursive block doubling (block sizes 1, 2, 4, ..., C: each step
     T <- T - T E T with E the off-diagonal blocks of the next level; exact, matmul-only),
     then W = T diag(beta e^{g}) K and U~ = T diag(beta) V (and, for the backward, T itself).
  2. `state_kernel`, grid (B, H, V/BV), a sequential fori_loop over chunks with the float32
     state in registers: stores the entering state h_n, U = U~ - W h_n, and
     S <- e^{g_C} S + (K . e^{g_C - g})^T U.
  3. `output_kernel`, grid (B, H, N): O = scale (e^{g} . Q h_n + [(Q K^T) . e^{g_i-g_j}]_{j<=i} U).
Backward (`delta_rule` is a jax.custom_vjp saving the inputs and T, as fla does):
  4. `wu_kernel`, grid (B, H, N): W and U~ again from T; then kernel 2 again (h_n, U).
  5. `dv_local_kernel`, grid (B, H, N): the intra-chunk part of dU, scale P^T dO.
  6. `dstate_kernel`, grid (B, H, V/BV), a reverse fori_loop carrying the float32 state
     gradient: stores dS' (the gradient at each chunk's exit) and dU = scale P^T dO + K~ dS',
     then dS = e^{g_C} dS' + scale (e^g Q)^T dO - W^T dU.
  7. `grad_qk_kernel`, grid (B, H, N, K/BK), a loop over V blocks: dq, the output and state
     parts of dk, dW = -dU h^T and their gate terms (fla's chunk_bwd_dqkwg).
  8. `grad_wy_kernel`, grid (B, H, N): dT through W and U~, dA = -T^T dT T^T, then dk, dv,
     dbeta and the gate terms of A and W (fla's prepare_wy_repr_bwd).
The gate gradients (w.r.t. the chunk-local cumulative gates g, g0) are partial sums from 7 and 8
added in XLA; their chain to log_decay is autodiff of the cumsum in `chunked_jnp.prepare_gates`.
Matmul operands are in the input dtype (float32 operands use IEEE precision), accumulation
and the carried states are float32, every exponent is <= 0 and masks use `where`.
`Tuning` (tuning.py) holds the Triton launch knobs of each kernel; calls.py makes the
pallas_calls of these bodies, op.py the custom_vjp around them.

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

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

F32 = jnp.float32


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


def wy_kernel(*refs, chunk, gated, segmented, precision):
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


def wu_kernel(*refs, chunk, gated, segmented, precision):
  """W and U~ from the stored T (the backward's recomputation)."""
  del chunk
  (k_ref, v_ref, beta_ref, t_ref), _, g0_ref, _, (w_ref, u_ref) = _unpack(refs, 4, gated, segmented)
  _store_wu(t_ref[...], k_ref, v_ref, beta_ref[...], g0_ref, w_ref, u_ref, precision)


def state_kernel(*refs, chunk, n_chunks, gated, segmented, precision, loop):
  (w_ref, ut_ref, k_ref, s0_ref), g_ref, g0_ref, run_ref, (h_ref, u_ref, sf_ref) = _unpack(
    refs, 4, gated, segmented
  )
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


def output_kernel(*refs, chunk, scale, gated, segmented, precision):
  (q_ref, k_ref, h_ref, u_ref), g_ref, g0_ref, run_ref, (o_ref,) = _unpack(
    refs, 4, gated, segmented
  )
  q = q_ref[...]
  incl, _ = _masks(chunk, run_ref)
  p = _decayed_scores(q, k_ref[...], g_ref, incl, precision).astype(q.dtype)
  inter = _dot(q, h_ref[...], precision)
  if gated:
    inter = inter * jnp.exp(g0_ref[...])[:, None]
  o_ref[...] = (scale * (inter + _dot(p, u_ref[...], precision))).astype(o_ref.dtype)


def dv_local_kernel(*refs, chunk, scale, gated, segmented, precision):
  """Intra-chunk part of dU: scale P^T dO."""
  (q_ref, k_ref, do_ref), g_ref, _, run_ref, (dvl_ref,) = _unpack(refs, 3, gated, segmented)
  incl, _ = _masks(chunk, run_ref)
  p = _decayed_scores(q_ref[...], k_ref[...], g_ref, incl, precision).astype(q_ref.dtype)
  dvl_ref[...] = (scale * _dot(p, do_ref[...], precision, trans_a=True)).astype(dvl_ref.dtype)


def dstate_kernel(*refs, chunk, n_chunks, scale, gated, segmented, precision, loop):
  """Reverse pass over chunks: dU = dU_local + K~ dS', dS <- e^{g_C} dS' + scale (e^g Q)^T dO
  - W^T dU; stores dS' (the gradient at each chunk's exit) and dU."""
  (q_ref, k_ref, w_ref, do_ref, dvl_ref, dsf_ref), g_ref, g0_ref, run_ref, outs = _unpack(
    refs, 6, gated, segmented
  )
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
    new = scale * _dot(q, do_ref[sl, :], precision, trans_a=True) - _dot(
      w_ref[sl, :], du, precision, trans_a=True
    )
    if gated:
      ds = jnp.exp(_last(g0)) * ds
    return ds + new

  loop(body, n_chunks, dsf_ref, ds0_ref)


def grad_qk_kernel(*refs, chunk, block_v, scale, gated, segmented, precision):
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
  dp = jnp.where(incl, scale * ds, 0.0)  # dP, P = [Q K^T . decay]_{j<=i}
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
    dg_ref[...] = (
      jnp.sum(qf * dq_p, axis=1)
      - jnp.sum(kf * dk_p, axis=1)
      - dend
      + jnp.where(is_last, jnp.sum(dend), 0.0)
    )
    state_term = jnp.exp(_last(g0)) * jnp.sum(hdh)
    dg0_ref[...] = jnp.sum(qf * dqh, axis=1) + jnp.where(is_last, state_term, 0.0)


def grad_wy_kernel(*refs, chunk, gated, segmented, precision):
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
  da = _dot(_dot(t, dtm.astype(dt), precision, trans_a=True).astype(dt), t, precision, trans_b=True)
  da = jnp.where(strict, -da, 0.0)
  if gated:  # A = beta K K^T . decay
    g = g_ref[...]
    da = da * jnp.exp(jnp.where(strict, g[:, None] - g[None, :], 0.0))
  da_kk = da * _dot(k, k, precision, trans_b=True)
  dkk = (da * beta[:, None]).astype(dt)
  dk = (
    dkp_ref[...]
    + bg[:, None] * dxw
    + _dot(dkk, k, precision)
    + _dot(dkk, k, precision, trans_a=True)
  )
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = (beta[:, None] * dxu).astype(dv_ref.dtype)
  dbeta_ref[...] = gamma0 * sw + jnp.sum(v.astype(F32) * dxu, axis=1) + jnp.sum(da_kk, axis=1)
  if gated:
    dg_ref, dg0_ref = outs[3:]
    grad_decay = da_kk * beta[:, None]
    dg_ref[...] = jnp.sum(grad_decay, axis=1) - jnp.sum(grad_decay, axis=0)
    dg0_ref[...] = bg * sw
