"""Pallas kernels for the chunked (WY) delta rule; the math is in `chunked_jnp.py`'s docstring.

Three portable pallas_calls (BlockSpecs, fori_loop, power-of-two blocks; Triton lowering on
GPU, interpret mode on CPU), the structure of fla's chunk_gated_delta_rule forward:
  1. `_wy_kernel`, grid (B, H, N): A = beta K K^T . e^{g_i-g_j} (strictly lower), its inverse
     T = (I + A)^{-1} by recursive block doubling (block sizes 1, 2, 4, ..., C: each step
     T <- T - T E T with E the off-diagonal blocks of the next level; exact, matmul-only),
     then W = T diag(beta e^{g}) K and U~ = T diag(beta) V.
  2. `_state_kernel`, grid (B, H, V/BV), a sequential fori_loop over chunks with the float32
     state in registers: stores the entering state h_n, U = U~ - W h_n, and
     S <- e^{g_C} S + (K . e^{g_C - g})^T U.
  3. `_output_kernel`, grid (B, H, N): O = scale (e^{g} . Q h_n + [(Q K^T) . e^{g_i-g_j}]_{j<=i} U).
Matmul operands are in the input dtype (float32 operands use IEEE precision), accumulation
and the carried state are float32, every exponent is <= 0 and masks use `where`.

Backward (`delta_rule` is a jax.custom_vjp; only the inputs are saved): kernels 1 and 2 run
again to recompute W, the chunk states h_n and U, then
  4. `_dstate_kernel`, grid (B, H, V/BV), a reverse fori_loop over chunks carrying the float32
     state gradient: stores dS' (the gradient at each chunk's exit) and
     dU = scale P^T dO + (K . e^{g_C - g}) dS', then dS = e^{g_C} dS' + scale (e^g Q)^T dO - W^T dU.
  5. `_grad_kernel`, grid (B, H, N): recomputes A and T, then dq, dk, dv, dbeta and the
     gradients of the cumulative gates g, g0 (their chain to log_decay is left to autodiff
     of the cumsum in `chunked_jnp.prepare_gates`), with dA = -T^T dT T^T.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.delta_rule import chunked_jnp as chunked_lib


def _next_pow2(x: int, minimum: int = 16) -> int:
  p = minimum
  while p < x:
    p *= 2
  return p


def _dot(a, b, precision, trans_a=False, trans_b=False):
  dims = (((0,) if trans_a else (1,), (1,) if trans_b else (0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _iota(c):
  return (lax.broadcasted_iota(jnp.int32, (c, c), 0), lax.broadcasted_iota(jnp.int32, (c, c), 1))


def _last(x):
  """x[-1] of a 1-D vector, as a masked sum (portable: no scalar extraction)."""
  i = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(i == x.shape[0] - 1, x, 0.0))


def _invert_unit_lower(a, chunk, precision):
  """(I + A)^{-1} for strictly lower A [C, C] by block doubling: after the level with block
  size s, t is the exact inverse of the block-diagonal part of I + A with blocks of size 2s
  (t <- t - t E t, E the entries in one 2s-block but different s-blocks: s <= i ^ j < 2s)."""
  row, col = _iota(chunk)
  xor = row ^ col
  eye = jnp.where(row == col, 1.0, 0.0).astype(jnp.float32)
  t = eye - jnp.where(xor == 1, a, 0.0)
  s = 2
  while s < chunk:
    e = jnp.where((xor >= s) & (xor < 2 * s), a, 0.0)
    t = t - _dot(t, _dot(e, t, precision), precision)
    s *= 2
  return t


def _wy_kernel(*refs, chunk, gated, segmented, precision):
  k_ref, v_ref, beta_ref = refs[:3]
  rest = refs[3:]
  if gated:
    g_ref, g0_ref, *rest = rest
  if segmented:
    run_ref, *rest = rest
  w_ref, u_ref = rest
  dt = k_ref.dtype
  k = k_ref[...]
  beta = beta_ref[...]
  row, col = _iota(chunk)
  mask = row > col
  if segmented:
    run = run_ref[...]
    mask &= run[:, None] == run[None, :]
  kk = _dot(k, k, precision, trans_b=True)
  a = beta[:, None] * kk
  if gated:
    g = g_ref[...]
    a = a * jnp.exp(jnp.where(mask, g[:, None] - g[None, :], 0.0))
  a = jnp.where(mask, a, 0.0)
  t = _invert_unit_lower(a, chunk, precision)
  scale_k = beta * jnp.exp(g0_ref[...]) if gated else beta
  kb = (k.astype(jnp.float32) * scale_k[:, None]).astype(dt)
  vb = (v_ref[...].astype(jnp.float32) * beta[:, None]).astype(dt)
  tt = t.astype(dt)
  w_ref[...] = _dot(tt, kb, precision).astype(w_ref.dtype)
  u_ref[...] = _dot(tt, vb, precision).astype(u_ref.dtype)


def _state_kernel(*refs, chunk, n_chunks, gated, segmented, precision):
  w_ref, ut_ref, k_ref, s0_ref = refs[:4]
  rest = refs[4:]
  if gated:
    g_ref, g0_ref, *rest = rest
  if segmented:
    run_ref, *rest = rest
  h_ref, u_ref, sf_ref = rest
  dt = k_ref.dtype

  def body(n, state):
    t0 = pl.multiple_of(n * chunk, chunk)
    sl = pl.ds(t0, chunk)
    h_ref[n, :, :] = state.astype(h_ref.dtype)
    u = ut_ref[sl, :].astype(jnp.float32) - _dot(w_ref[sl, :], state.astype(dt), precision)
    u = u.astype(dt)
    u_ref[sl, :] = u
    k = k_ref[sl, :]
    if gated:
      g = g_ref[sl]
      end = jnp.exp(_last(g) - g)
      if segmented:
        run = run_ref[sl]
        end = jnp.where(run == _last(run), end, 0.0)
      k = (k.astype(jnp.float32) * end[:, None]).astype(dt)
      state = jnp.exp(_last(g0_ref[sl])) * state
    return state + _dot(k, u, precision, trans_a=True)

  final = lax.fori_loop(0, n_chunks, body, s0_ref[...].astype(jnp.float32))
  sf_ref[...] = final


def _output_kernel(*refs, chunk, scale, gated, segmented, precision):
  q_ref, k_ref, h_ref, u_ref = refs[:4]
  rest = refs[4:]
  if gated:
    g_ref, g0_ref, *rest = rest
  if segmented:
    run_ref, *rest = rest
  (o_ref,) = rest
  dt = q_ref.dtype
  q = q_ref[...]
  row, col = _iota(chunk)
  mask = row >= col
  if segmented:
    run = run_ref[...]
    mask &= run[:, None] == run[None, :]
  p = _dot(q, k_ref[...], precision, trans_b=True)
  inter = _dot(q, h_ref[...], precision)
  if gated:
    g = g_ref[...]
    p = p * jnp.exp(jnp.where(mask, g[:, None] - g[None, :], 0.0))
    inter = inter * jnp.exp(g0_ref[...])[:, None]
  p = jnp.where(mask, p, 0.0).astype(dt)
  o = scale * (inter + _dot(p, u_ref[...], precision))
  o_ref[...] = o.astype(o_ref.dtype)


def _dstate_kernel(*refs, chunk, n_chunks, scale, gated, segmented, precision):
  """Reverse pass over chunks: dU = scale P^T dO + K~ dS', dS <- e^{g_C} dS' + scale (e^g Q)^T dO
  - W^T dU; stores dS' (the gradient at each chunk's exit) and dU."""
  q_ref, k_ref, w_ref, do_ref, dsf_ref = refs[:5]
  rest = refs[5:]
  if gated:
    g_ref, g0_ref, *rest = rest
  if segmented:
    run_ref, *rest = rest
  dh_ref, du_ref, ds0_ref = rest
  dt = k_ref.dtype
  row, col = _iota(chunk)

  def body(i, ds):
    n = n_chunks - 1 - i
    t0 = pl.multiple_of(n * chunk, chunk)
    sl = pl.ds(t0, chunk)
    dh_ref[n, :, :] = ds.astype(dh_ref.dtype)
    q, k, do = q_ref[sl, :], k_ref[sl, :], do_ref[sl, :]
    mask = row >= col
    if segmented:
      run = run_ref[sl]
      mask &= run[:, None] == run[None, :]
    p = _dot(q, k, precision, trans_b=True)
    qs = q
    if gated:
      g, g0 = g_ref[sl], g0_ref[sl]
      p = p * jnp.exp(jnp.where(mask, g[:, None] - g[None, :], 0.0))
      end = jnp.exp(_last(g) - g)
      if segmented:
        end = jnp.where(run == _last(run), end, 0.0)
      k = (k.astype(jnp.float32) * end[:, None]).astype(dt)
      qs = (q.astype(jnp.float32) * jnp.exp(g0)[:, None]).astype(dt)
    p = jnp.where(mask, p, 0.0).astype(dt)
    du = scale * _dot(p, do, precision, trans_a=True) + _dot(k, ds.astype(dt), precision)
    du = du.astype(dt)
    du_ref[sl, :] = du
    new = scale * _dot(qs, do, precision, trans_a=True) - _dot(w_ref[sl, :], du, precision,
                                                               trans_a=True)
    if gated:
      ds = jnp.exp(_last(g0)) * ds
    return ds + new

  ds0_ref[...] = lax.fori_loop(0, n_chunks, body, dsf_ref[...].astype(jnp.float32))


def _grad_kernel(*refs, chunk, scale, gated, segmented, precision):
  """Per-chunk gradients of q, k, v, beta, g, g0 given the states h (entering), dh (gradient
  at the exit), U and dU. Recomputes A and T = (I + A)^{-1}."""
  q_ref, k_ref, v_ref, beta_ref, h_ref, dh_ref, do_ref, u_ref, du_ref = refs[:9]
  rest = refs[9:]
  if gated:
    g_ref, g0_ref, *rest = rest
  if segmented:
    run_ref, *rest = rest
  dq_ref, dk_ref, dv_ref, dbeta_ref, *rest = rest
  if gated:
    dg_ref, dg0_ref = rest
  dt = q_ref.dtype
  f32 = jnp.float32
  q, k, v, beta = q_ref[...], k_ref[...], v_ref[...], beta_ref[...]
  h, dh, do, u, du = h_ref[...], dh_ref[...], do_ref[...], u_ref[...], du_ref[...]
  row, col = _iota(chunk)
  incl, strict = row >= col, row > col
  if segmented:
    run = run_ref[...]
    same = run[:, None] == run[None, :]
    incl, strict = incl & same, strict & same
  kk = _dot(k, k, precision, trans_b=True)
  qk = _dot(q, k, precision, trans_b=True)
  if gated:
    g, g0 = g_ref[...], g0_ref[...]
    decay = jnp.exp(jnp.where(incl, g[:, None] - g[None, :], 0.0))
    gamma0 = jnp.exp(g0)
    end = jnp.exp(_last(g) - g)
    if segmented:
      end = jnp.where(run == _last(run), end, 0.0)
  else:
    decay = 1.0
    gamma0 = jnp.ones((chunk,), f32)
  a = jnp.where(strict, beta[:, None] * kk * decay, 0.0)
  t = _invert_unit_lower(a, chunk, precision)
  tt = t.astype(dt)

  # o = scale (gamma0 . q h + P u), P = [q k^T . decay]_{j<=i}
  dp = jnp.where(incl, scale * _dot(do, u, precision, trans_b=True), 0.0)
  dqk = (dp * decay).astype(dt)
  dq = scale * gamma0[:, None] * _dot(do, h, precision, trans_b=True) + _dot(dqk, k, precision)
  dk = _dot(dqk, q, precision, trans_a=True)
  grad_decay = dp * qk * decay                         # d(decay) . decay, from P
  # S' = e^{g0_C} h + (end . k)^T u
  dk_end = _dot(u, dh, precision, trans_b=True)         # d(end . k)
  # u = u~ - W h; W = T (beta gamma0 . k); u~ = T (beta . v)
  dw = -_dot(du, h, precision, trans_b=True)
  xw = (k.astype(f32) * (beta * gamma0)[:, None]).astype(dt)
  xu = (v.astype(f32) * beta[:, None]).astype(dt)
  dt_mat = _dot(dw.astype(dt), xw, precision, trans_b=True) + _dot(du, xu, precision, trans_b=True)
  dxw = _dot(tt, dw.astype(dt), precision, trans_a=True)
  dxu = _dot(tt, du, precision, trans_a=True)
  dk = dk + (beta * gamma0)[:, None] * dxw
  sw = jnp.sum(k.astype(f32) * dxw, axis=1)
  dv = beta[:, None] * dxu
  dbeta = gamma0 * sw + jnp.sum(v.astype(f32) * dxu, axis=1)
  dgamma0 = scale * jnp.sum(do.astype(f32) * _dot(q, h, precision), axis=1) + beta * sw
  # T = (I + A)^{-1}: dA = -T^T dT T^T on the strictly lower part
  da = -_dot(_dot(t, dt_mat, precision, trans_a=True), t, precision, trans_b=True)
  da = jnp.where(strict, da, 0.0)
  dkk = da * beta[:, None] * decay
  dkk_dt = dkk.astype(dt)
  dk = dk + _dot(dkk_dt, k, precision) + _dot(dkk_dt, k, precision, trans_a=True)
  dbeta = dbeta + jnp.sum(da * kk * decay, axis=1)
  if gated:
    dk = dk + end[:, None] * dk_end
    grad_decay = grad_decay + da * a
    dend = jnp.sum(k.astype(f32) * dk_end, axis=1) * end
    is_last = lax.broadcasted_iota(jnp.int32, (chunk,), 0) == chunk - 1
    dg = jnp.sum(grad_decay, axis=1) - jnp.sum(grad_decay, axis=0) - dend
    dg = dg + jnp.where(is_last, jnp.sum(dend), 0.0)
    dg0 = dgamma0 * gamma0
    state_term = jnp.exp(_last(g0)) * jnp.sum(h.astype(f32) * dh.astype(f32))
    dg0 = dg0 + jnp.where(is_last, state_term, 0.0)
    dg_ref[...] = dg
    dg0_ref[...] = dg0
  else:
    dk = dk + dk_end
  dq_ref[...] = dq.astype(dq_ref.dtype)
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)
  dbeta_ref[...] = dbeta


class _Calls:
  """The pallas_calls for one problem shape (static configuration in one place)."""

  def __init__(self, q, v, *, chunk, gated, segmented, interpret, block_v, num_warps,
               num_stages):
    self.b, self.tp, self.h, self.dk = q.shape
    self.dv = v.shape[-1]
    self.n = self.tp // chunk
    self.chunk, self.gated, self.segmented = chunk, gated, segmented
    self.block_v = min(block_v, self.dv)
    self.dt = q.dtype
    self.precision = (lax.Precision.HIGHEST if self.dt == jnp.float32
                      else lax.Precision.DEFAULT)
    self.interpret = interpret
    self.num_warps, self.num_stages = num_warps, num_stages

  def call(self, kernel, name, warps=None, **kw):
    params = None if self.interpret else pltriton.CompilerParams(
        num_warps=warps or self.num_warps, num_stages=self.num_stages)
    return pl.pallas_call(kernel, interpret=self.interpret, compiler_params=params, name=name,
                          **kw)

  # BlockSpecs ------------------------------------------------------------------------------
  def chunk_gates(self):   # per-chunk gate vectors on a (b, h, n) grid
    c = self.chunk
    return ([pl.BlockSpec((None, None, c), lambda i, j, n: (i, j, n))] * (2 if self.gated else 0)
            + [pl.BlockSpec((None, c), lambda i, j, n: (i, n))] * (1 if self.segmented else 0))

  def seq_gates(self):     # whole-sequence gate vectors on a (b, h, v-block) grid
    tp = self.tp
    return ([pl.BlockSpec((None, None, tp), lambda i, j, c: (i, j, 0))] * (2 if self.gated else 0)
            + [pl.BlockSpec((None, tp), lambda i, j, c: (i, 0))] * (1 if self.segmented else 0))

  def bthd(self, d):       # one chunk of a [B, T, H, D] array on a (b, h, n) grid
    return pl.BlockSpec((None, self.chunk, None, d), lambda i, j, n: (i, n, j, 0))

  def bhtd(self, d):       # one chunk of a [B, H, T, D] array on a (b, h, n) grid
    return pl.BlockSpec((None, None, self.chunk, d), lambda i, j, n: (i, j, n, 0))

  def vec(self):           # one chunk of a [B, H, T] array on a (b, h, n) grid
    return pl.BlockSpec((None, None, self.chunk), lambda i, j, n: (i, j, n))

  def state_chunk(self):   # [B, H, N, K, V] at chunk n on a (b, h, n) grid
    return pl.BlockSpec((None, None, None, self.dk, self.dv), lambda i, j, n: (i, j, n, 0, 0))

  def seq_bthd(self, d):   # whole sequence of a [B, T, H, D] array on a (b, h, v-block) grid
    return pl.BlockSpec((None, self.tp, None, d), lambda i, j, c: (i, 0, j, 0))

  def seq_bthd_v(self):
    return pl.BlockSpec((None, self.tp, None, self.block_v), lambda i, j, c: (i, 0, j, c))

  def seq_bhtd(self, d):
    return pl.BlockSpec((None, None, self.tp, d), lambda i, j, c: (i, j, 0, 0))

  def seq_bhtd_v(self):
    return pl.BlockSpec((None, None, self.tp, self.block_v), lambda i, j, c: (i, j, 0, c))

  def states_v(self):      # [B, H, N, K, V] for a v-block
    return pl.BlockSpec((None, None, self.n, self.dk, self.block_v),
                        lambda i, j, c: (i, j, 0, 0, c))

  def state_v(self):       # [B, H, K, V] for a v-block
    return pl.BlockSpec((None, None, self.dk, self.block_v), lambda i, j, c: (i, j, 0, c))

  def flags(self):
    return dict(chunk=self.chunk, gated=self.gated, segmented=self.segmented,
                precision=self.precision)

  # Kernels ---------------------------------------------------------------------------------
  def wy(self, k, v, beta, gates):
    b, h, tp, dk, dv = self.b, self.h, self.tp, self.dk, self.dv
    return self.call(
        functools.partial(_wy_kernel, **self.flags()), "delta_rule_wy",
        grid=(b, h, self.n),
        in_specs=[self.bthd(dk), self.bthd(dv), self.vec()] + self.chunk_gates(),
        out_specs=[self.bhtd(dk), self.bhtd(dv)],
        out_shape=[jax.ShapeDtypeStruct((b, h, tp, dk), self.dt),
                   jax.ShapeDtypeStruct((b, h, tp, dv), self.dt)],
    )(k, v, beta, *gates)

  def states(self, w, u_tilde, k, s0, gates):
    b, h, tp, dk, dv = self.b, self.h, self.tp, self.dk, self.dv
    return self.call(
        functools.partial(_state_kernel, n_chunks=self.n, **self.flags()), "delta_rule_state",
        grid=(b, h, dv // self.block_v),
        in_specs=[self.seq_bhtd(dk), self.seq_bhtd_v(), self.seq_bthd(dk), self.state_v()]
        + self.seq_gates(),
        out_specs=[self.states_v(), self.seq_bhtd_v(), self.state_v()],
        out_shape=[jax.ShapeDtypeStruct((b, h, self.n, dk, dv), self.dt),
                   jax.ShapeDtypeStruct((b, h, tp, dv), self.dt),
                   jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
    )(w, u_tilde, k, s0, *gates)

  def output(self, q, k, states, u, gates, scale, out_dtype):
    b, h, tp, dk, dv = self.b, self.h, self.tp, self.dk, self.dv
    return self.call(
        functools.partial(_output_kernel, scale=scale, **self.flags()), "delta_rule_output",
        grid=(b, h, self.n),
        in_specs=[self.bthd(dk), self.bthd(dk), self.state_chunk(), self.bhtd(dv)]
        + self.chunk_gates(),
        out_specs=self.bthd(dv),
        out_shape=jax.ShapeDtypeStruct((b, tp, h, dv), out_dtype),
    )(q, k, states, u, *gates)

  def dstates(self, q, k, w, do, dsf, gates, scale):
    b, h, tp, dk, dv = self.b, self.h, self.tp, self.dk, self.dv
    return self.call(
        functools.partial(_dstate_kernel, n_chunks=self.n, scale=scale, **self.flags()),
        "delta_rule_dstate",
        grid=(b, h, dv // self.block_v),
        in_specs=[self.seq_bthd(dk), self.seq_bthd(dk), self.seq_bhtd(dk), self.seq_bthd_v(),
                  self.state_v()] + self.seq_gates(),
        out_specs=[self.states_v(), self.seq_bhtd_v(), self.state_v()],
        out_shape=[jax.ShapeDtypeStruct((b, h, self.n, dk, dv), self.dt),
                   jax.ShapeDtypeStruct((b, h, tp, dv), self.dt),
                   jax.ShapeDtypeStruct((b, h, dk, dv), jnp.float32)],
    )(q, k, w, do, dsf, *gates)

  def grads(self, q, k, v, beta, states, dstates, do, u, du, gates, scale, warps=8):
    b, h, tp, dk, dv = self.b, self.h, self.tp, self.dk, self.dv
    vec_out = [jax.ShapeDtypeStruct((b, h, tp), jnp.float32)]
    return self.call(
        functools.partial(_grad_kernel, scale=scale, **self.flags()), "delta_rule_grads",
        warps=warps,
        grid=(b, h, self.n),
        in_specs=[self.bthd(dk), self.bthd(dk), self.bthd(dv), self.vec(), self.state_chunk(),
                  self.state_chunk(), self.bthd(dv), self.bhtd(dv), self.bhtd(dv)]
        + self.chunk_gates(),
        out_specs=[self.bthd(dk), self.bthd(dk), self.bthd(dv), self.vec()]
        + [self.vec()] * (2 if self.gated else 0),
        out_shape=[jax.ShapeDtypeStruct((b, tp, h, dk), q.dtype),
                   jax.ShapeDtypeStruct((b, tp, h, dk), k.dtype),
                   jax.ShapeDtypeStruct((b, tp, h, dv), v.dtype)]
        + vec_out * (3 if self.gated else 1),
    )(q, k, v, beta, states, dstates, do, u, du, *gates)


def _config(q, v, g, run, interpret, block_v=64, num_warps=4, num_stages=2, *, chunk):
  return _Calls(q, v, chunk=chunk, gated=g is not None, segmented=run is not None,
                interpret=interpret, block_v=block_v, num_warps=num_warps,
                num_stages=num_stages)


def _gates(g, g0, run):
  return ([g, g0] if g is not None else []) + ([run] if run is not None else [])


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "block_v", "interpret",
                                             "num_warps", "num_stages"))
def forward(q, k, v, beta, g, g0, run, initial_state, *, scale, chunk, block_v=64,
            interpret=False, num_warps=4, num_stages=3):
  """Kernel forward on prepared inputs (see chunked_jnp.chunked); head dims powers of two >= 16.
  Returns (o, final_state). Defaults: the fastest of five configurations timed on one H200
  (bf16, B,T,H,D = 4,4096,16,128): num_stages=3 0.52 ms, num_stages=2 0.58 ms."""
  o, final, _ = _forward(q, k, v, beta, g, g0, run, initial_state, scale=scale, chunk=chunk,
                         block_v=block_v, interpret=interpret, num_warps=num_warps,
                         num_stages=num_stages)
  return o, final


def _forward(q, k, v, beta, g, g0, run, initial_state, *, scale, chunk, interpret, **tune):
  calls = _config(q, v, g, run, interpret, chunk=chunk, **tune)
  gates = _gates(g, g0, run)
  w, u_tilde = calls.wy(k, v, beta, gates)
  states, u, final = calls.states(w, u_tilde, k, initial_state, gates)
  o = calls.output(q, k, states, u, gates, scale, v.dtype)
  return o, final, (w, states, u)


@functools.partial(jax.jit, static_argnames=("scale", "chunk", "block_v", "interpret",
                                             "num_warps", "num_stages", "grad_warps"))
def backward(q, k, v, beta, g, g0, run, initial_state, do, dfinal, *, scale, chunk,
             block_v=64, interpret=False, num_warps=4, num_stages=2, grad_warps=8):
  """Kernel backward: recomputes W, the chunk states and U, then a reverse state-gradient
  pass and a per-chunk gradient kernel. Returns (dq, dk, dv, dbeta, dg, dg0, dinitial_state)."""
  tune = dict(block_v=block_v, num_warps=num_warps, num_stages=num_stages)
  calls = _config(q, v, g, run, interpret, chunk=chunk, **tune)
  gates = _gates(g, g0, run)
  w, u_tilde = calls.wy(k, v, beta, gates)
  states, u, _ = calls.states(w, u_tilde, k, initial_state, gates)
  do = do.astype(v.dtype)
  dstates, du, ds0 = calls.dstates(q, k, w, do, dfinal.astype(jnp.float32), gates, scale)
  outs = calls.grads(q, k, v, beta, states, dstates, do, u, du, gates, scale, grad_warps)
  dq, dk, dv, dbeta = outs[:4]
  dg, dg0 = outs[4:] if g is not None else (None, None)
  return dq, dk, dv, dbeta, dg, dg0, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10))
def _delta_rule_vjp(q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret):
  return forward(q, k, v, beta, g, g0, run, initial_state, scale=scale, chunk=chunk,
                 interpret=interpret)


def _vjp_fwd(q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret):
  out = forward(q, k, v, beta, g, g0, run, initial_state, scale=scale, chunk=chunk,
                interpret=interpret)
  return out, (q, k, v, beta, g, g0, run, initial_state)


def _vjp_bwd(scale, chunk, interpret, residuals, cotangents):
  q, k, v, beta, g, g0, run, initial_state = residuals
  do, dfinal = cotangents
  dq, dk, dv, dbeta, dg, dg0, ds0 = backward(q, k, v, beta, g, g0, run, initial_state, do,
                                             dfinal, scale=scale, chunk=chunk,
                                             interpret=interpret)
  drun = None if run is None else jnp.zeros_like(run)
  return dq, dk, dv, dbeta, dg, dg0, drun, ds0


_delta_rule_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def delta_rule(q, k, v, beta, *, scale, log_decay=None, initial_state=None,
               segment_ids=None, chunk=None, interpret=False):
  """Chunked delta rule through the Pallas kernels, differentiable.

  q, k [B,T,H,K], v [B,T,H,V] (one dtype), beta [B,T,H], log_decay [B,T,H] or None,
  initial_state [B,H,K,V] or None, segment_ids [B,T] or None (state reset where it changes).
  Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = chunk or chunked_lib.chunk_size_for(t)
  beta_p, g, g0, run = chunked_lib.prepare_gates(beta, log_decay, segment_ids, chunk)
  tp = beta_p.shape[-1]
  pk, pv = _next_pow2(dk), _next_pow2(dv)
  pad = lambda x, d: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])))
  if initial_state is None:
    s0 = jnp.zeros((b, h, pk, pv), jnp.float32)
  else:
    s0 = jnp.pad(initial_state.astype(jnp.float32), ((0, 0), (0, 0), (0, pk - dk), (0, pv - dv)))
  o, final = _delta_rule_vjp(pad(q, pk), pad(k, pk), pad(v, pv), beta_p, g, g0, run, s0,
                             float(scale), chunk, interpret)
  return o[:, :t, :, :dv], final[:, :, :dk, :dv]
