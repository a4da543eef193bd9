"""The pallas_calls of the delta-rule kernels (bodies in kernels.py), for one problem shape."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

from . import kernels
from .tuning import Tuning

F32 = jnp.float32


class Kernels:
  """The pallas_calls for one problem shape; each method is one kernel launch.

  q, v give the shapes and the operand dtype: [B, Tp, H, K], [B, Tp, H, V] on GPU and
  [B, H, Tp, K], [B, H, Tp, V] on TPU (the "token layout" of q, k, v, o, do and their
  gradients; Tp a multiple of `chunk`, K and V powers of two). Other arrays are [B, H, ...]."""

  def __init__(
    self, q, v, *, chunk, gated, segmented, tuning: Tuning, interpret=False, platform=None
  ):
    self.tpu = common.resolve_platform(platform) == "tpu"
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
    if self.tpu:  # whole head dims; the sequential kernels see one chunk per block
      self.state_block_v = self.dstate_block_v = self.grad_block_v = self.vd
      self.grad_block_k = self.kd
      self.seq_chunks = 1
    else:
      self.state_block_v = min(tuning.state_block_v, self.vd)
      self.dstate_block_v = min(tuning.dstate_block_v, self.vd)
      self.grad_block_k = min(tuning.grad_block_k, self.kd)
      self.grad_block_v = min(tuning.grad_block_v, self.vd)
      self.seq_chunks = self.n

  def _call(self, kernel, name, launch, grid, in_specs, out_specs, out_shape, carry=None, **kw):
    """carry: the [K, BV] float32 carry of a sequential kernel (`common.pallas_call`)."""
    kernel = functools.partial(
      kernel,
      chunk=self.chunk,
      gated=self.gated,
      segmented=self.segmented,
      precision=self.precision,
      **kw,
    )
    return common.pallas_call(
      kernel,
      tpu=self.tpu,
      interpret=self.interpret,
      grid=grid,
      in_specs=in_specs,
      out_specs=out_specs,
      out_shape=out_shape,
      name=name,
      carry=carry,
      chunks=self.n,
      launch=launch,
    )

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
      return [pl.BlockSpec((None,) * 4 + (c,), lambda i, j, n, *_: (i, j, n, 0, 0))] * (
        2 * self.gated
      ) + [pl.BlockSpec((None,) * 3 + (c,), lambda i, j, n, *_: (i, n, 0, 0))] * self.segmented
    return [pl.BlockSpec((None, None, c), lambda i, j, n, *_: (i, j, n))] * (2 * self.gated) + [
      pl.BlockSpec((None, c), lambda i, j, n, *_: (i, n))
    ] * self.segmented

  def _tok(self, d):  # token layout: [B, T, H, D] (GPU), [B, H, T, D] (TPU)
    if self.tpu:
      return self._bhtd(d)
    return pl.BlockSpec((None, self.chunk, None, d), lambda i, j, n: (i, n, j, 0))

  def _bhtd(self, d):  # [B, H, T, D]
    return pl.BlockSpec((None, None, self.chunk, d), lambda i, j, n: (i, j, n, 0))

  def _vec(self):  # [B, H, T] ([B, H, N, 1, C] on TPU)
    if self.tpu:
      return pl.BlockSpec((None,) * 4 + (self.chunk,), lambda i, j, n: (i, j, n, 0, 0))
    return pl.BlockSpec((None, None, self.chunk), lambda i, j, n: (i, j, n))

  def _state(self):  # [B, H, N, K, V]
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
      return [pl.BlockSpec((None,) * 4 + (c,), lambda i, j, x, s: (i, j, at(s), 0, 0))] * (
        2 * self.gated
      ) + [pl.BlockSpec((None,) * 3 + (c,), lambda i, j, x, s: (i, at(s), 0, 0))] * self.segmented
    return [pl.BlockSpec((None, None, tp), lambda i, j, c: (i, j, 0))] * (2 * self.gated) + [
      pl.BlockSpec((None, tp), lambda i, j, c: (i, 0))
    ] * self.segmented

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
      kernels.wy_kernel,
      "delta_rule_wy",
      self.tuning.wy,
      (b, h, self.n),
      [self._tok(self.kd), self._tok(self.vd), self._vec()] + self._gates(),
      out_specs,
      out_shape,
    )(k, v, *self._vecs(beta, *gates))

  def wu(self, k, v, beta, t, gates):
    """(W, U~) from the stored T."""
    b, h, tp = self.b, self.h, self.tp
    beta, *gates = self._vecs(beta, *gates)
    return self._call(
      kernels.wu_kernel,
      "delta_rule_wu",
      self.tuning.wu,
      (b, h, self.n),
      [self._tok(self.kd), self._tok(self.vd), self._vec(), self._bhtd(self.chunk)] + self._gates(),
      [self._bhtd(self.kd), self._bhtd(self.vd)],
      [self._shape(b, h, tp, self.kd), self._shape(b, h, tp, self.vd)],
    )(k, v, beta, t, *gates)

  def states(self, w, u_tilde, k, s0, gates):
    """(h [B,H,N,K,V] entering states, U [B,H,Tp,V], final state [B,H,K,V] float32)."""
    b, h, tp, kd, vd = self.b, self.h, self.tp, self.kd, self.vd
    bv = self.state_block_v
    return self._call(
      kernels.state_kernel,
      "delta_rule_state",
      self.tuning.state,
      (b, h, vd // bv),
      [self._seq_bhtd(kd), self._seq_bhtd(vd, bv), self._seq_tok(kd), self._seq_state(bv)]
      + self._seq_gates(),
      [self._seq_states(bv), self._seq_bhtd(vd, bv), self._seq_state(bv)],
      [
        self._shape(b, h, self.n, kd, vd),
        self._shape(b, h, tp, vd),
        self._shape(b, h, kd, vd, dtype=F32),
      ],
      carry=(kd, bv),
      n_chunks=self.seq_chunks,
    )(w, u_tilde, k, s0, *self._vecs(*gates))

  def output(self, q, k, states, u, gates, scale, out_dtype):
    return self._call(
      kernels.output_kernel,
      "delta_rule_output",
      self.tuning.output,
      (self.b, self.h, self.n),
      [self._tok(self.kd), self._tok(self.kd), self._state(), self._bhtd(self.vd)] + self._gates(),
      self._tok(self.vd),
      self._tok_shape(self.vd, dtype=out_dtype),
      scale=scale,
    )(q, k, states, u, *self._vecs(*gates))

  def dv_local(self, q, k, do, gates, scale):
    """scale P^T dO [B,H,Tp,V]."""
    return self._call(
      kernels.dv_local_kernel,
      "delta_rule_dv_local",
      self.tuning.dv_local,
      (self.b, self.h, self.n),
      [self._tok(self.kd), self._tok(self.kd), self._tok(self.vd)] + self._gates(),
      self._bhtd(self.vd),
      self._shape(self.b, self.h, self.tp, self.vd),
      scale=scale,
    )(q, k, do, *self._vecs(*gates))

  def dstates(self, q, k, w, do, dvl, dsf, gates, scale):
    """(dS' [B,H,N,K,V] at each chunk's exit, dU [B,H,Tp,V], d initial state float32)."""
    b, h, tp, kd, vd = self.b, self.h, self.tp, self.kd, self.vd
    bv = self.dstate_block_v
    rev = {"reverse": True}
    return self._call(
      kernels.dstate_kernel,
      "delta_rule_dstate",
      self.tuning.dstate,
      (b, h, vd // bv),
      [
        self._seq_tok(kd, **rev),
        self._seq_tok(kd, **rev),
        self._seq_bhtd(kd, **rev),
        self._seq_tok(vd, bv, **rev),
        self._seq_bhtd(vd, bv, **rev),
        self._seq_state(bv),
      ]
      + self._seq_gates(**rev),
      [self._seq_states(bv, **rev), self._seq_bhtd(vd, bv, **rev), self._seq_state(bv)],
      [
        self._shape(b, h, self.n, kd, vd),
        self._shape(b, h, tp, vd),
        self._shape(b, h, kd, vd, dtype=F32),
      ],
      carry=(kd, bv),
      n_chunks=self.seq_chunks,
      scale=scale,
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
      kernels.grad_qk_kernel,
      "delta_rule_grad_qk",
      self.tuning.grad_qk,
      (b, h, self.n, nk),
      [tok_k, tok_k, state, state, tok_v, bhtv, bhtv] + self._gates(),
      [tok_k, bhtk, bhtk] + [part] * (2 * self.gated),
      [self._tok_shape(kd), self._shape(b, h, tp, kd, dtype=F32), self._shape(b, h, tp, kd)]
      + [self._vec_shape(b, h, nk)] * (2 * self.gated),
      scale=scale,
      block_v=self.grad_block_v,
    )(q, k, states, dstates, do, u, du, *self._vecs(*gates))
    return dq, dk, dw, *self._unvecs(parts)

  def grad_wy(self, k, v, beta, t, dw, du, dk_part, gates):
    """(dk, dv (token layout), dbeta [B,H,Tp]) and, gated, (dg, dg0) [B,H,Tp] of A, W."""
    b, h, kd, vd = self.b, self.h, self.kd, self.vd
    beta, *gates = self._vecs(beta, *gates)
    dk, dv, *vecs = self._call(
      kernels.grad_wy_kernel,
      "delta_rule_grad_wy",
      self.tuning.grad_wy,
      (b, h, self.n),
      [
        self._tok(kd),
        self._tok(vd),
        self._vec(),
        self._bhtd(self.chunk),
        self._bhtd(kd),
        self._bhtd(vd),
        self._bhtd(kd),
      ]
      + self._gates(),
      [self._tok(kd), self._tok(vd)] + [self._vec()] * (1 + 2 * self.gated),
      [self._tok_shape(kd), self._tok_shape(vd)] + [self._vec_shape(b, h)] * (1 + 2 * self.gated),
    )(k, v, beta, t, dw, du, dk_part, *gates)
    return dk, dv, *self._unvecs(vecs)
