"""Kernel bodies of chunked decayed linear attention (see the package docstring for the op).

Chunkwise form (GLA, Yang et al. 2024, sec. 4; the kernel split of flash-linear-attention):
chunks of C tokens, G = chunk-local cumsum of g (float32, kernel 0), Gq = G (or G - g when
exclusive, also from kernel 0), Gamma = G at the chunk's last row. Every exponent is <= 0:
  - intra-chunk scores A[i, j] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), j <= i (j < i),
    masked with `where`. Scalar decay: (q k^T) * exp(Gq_i - G_j). Vector decay: per sub-block
    I of S query rows with reference r = Gq at its middle row, A_I = (q_I e^{Gq_I - r})
    (k e^{r - G})^T; both exponents are clamped at 80, so the result is exact unless the decay
    over the S/2 steps on either side of the reference is stronger than e^-80; the keys of
    earlier sub-blocks always have r - G <= 0. By default S is the whole chunk (one 64-row
    matmul; 16-row sub-blocks are much slower on Hopper), which is exact whenever no chunk
    decays by more than e^-80 in any channel; calls where some chunk does take S = 16 (exact
    unless the decay over 8 steps is stronger than e^-80, about -10 per step), chosen at run
    time (`calls.with_sub`: `lax.cond`, or in the GPU forward both forms launched, each program
    of the form not chosen returning at once);
  - o = A v + scale (q e^{Gq}) h_n,   h_{n+1} = e^{Gamma} h_n + (k e^{Gamma - G})^T v.

Kernels (matmul operands in the input dtype, accumulation and carried states in float32):
  0. `cumsum_kernel`, grid (B, H, N): G from g (Triton's scan on GPU, triangular matmuls on
     the MXU on TPU), Gq = G - g for the exclusive readout, and with vector decay the keys as
     the states kernel adds them, kd = k e^{Gamma - G} in the input dtype (`keys_factored`).
  1. `states_kernel`, grid (B, H, K/BK, V/BV, P): a sequential loop over chunks carrying one
     [BK, BV] tile of the state; stores h_n (the state entering chunk n, in the input dtype)
     and returns the final state. Vector decay: per chunk it reads kd and G's last row, not
     k and G. On GPU a small grid (few B*H state tiles for the SMs, each taking a fixed
     latency per chunk step) walks P pieces of the sequence in parallel (`calls.sequential`):
     once from zero for each piece's own contribution, the pieces' entering states chained in
     XLA, then again from those.
  2. `output_kernel`, grid (B, H, N, V/BV), every chunk in parallel: o from A and h_n (the
     RWKV-6 bonus as A's diagonal).
Backward (from the saved inputs, G and h_n; see op.py):
  3. `dstates_kernel`, grid (B, H, K/BK, V/BV, P), a reverse loop (split like kernel 1):
     stores dh_n, the gradient at chunk n's exit, with dh <- e^{Gamma} dh + scale (q e^{Gq})^T
     do; returns dh_0; with decay also its V tile's part of sum_v (e^Gamma h_n) dh_n.
  4. `dv_kernel`, grid (B, H, N, V/BV), every chunk in parallel: dv.
  5. `dqk_kernel`, grid (B, H, N[, K/BKg]), every chunk in parallel: dq, dk and dg directly
     (the chunk-local suffix sums of dGq = q dq and dG = -k dk + R_n on the last row, see
     there). Without decay or with vector decay the key columns are independent, so the grid
     may tile K (`Tuning.block_k_grad`): smaller tiles per program, no register spills.
The kernels' speed-ups and the alternatives tried are measured in
experiments/results/kernels/linear_nvidia_h200.md.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

from .chunked_jnp import CLAMP
from .tuning import Tuning

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Static:
  """The static description of one call (hashable: the custom_vjp's nondiff argument)."""

  kind: str  # "none" | "scalar" | "vector"
  exclusive: bool
  segments: bool
  scale: float
  chunk: int
  sub: int
  choose_sub: bool  # vector decay: sub chosen at run time (`calls.with_sub`)
  interpret: bool
  tpu: bool  # Mosaic TPU form (see calls.py), else Triton
  block_k: int
  block_v: int
  block_v_out: int
  block_k_grad: int
  splits: int  # pieces of the sequence walked in parallel by the sequential kernels
  out_dtype: object
  tuning: Tuning


# ----------------------------------------------------------------------------- kernel pieces


class _Chunk:
  """Decay factors and masks of the chunk at rows [start, start + C) of the refs (start is 0
  in the parallel kernels, whose blocks are one chunk). Loads happen where a factor is used:
  [C, K] float32 tiles kept live would spill."""

  def __init__(self, st, refs, start, G=None):
    self.st, self.refs = st, refs
    self.rows = pl.ds(start, st.chunk)
    self.last = start + st.chunk - 1
    self.given = G  # G already in registers (the cumsum kernel), else loaded from refs

  @property
  def G(self):
    """Chunk-local cumulative log decay: [C, K] (vector), [C] (scalar)."""
    return self.gq(self.rows, queries=False)

  def load(self, name, rows):
    """refs[name] at `rows`: a pl.ds, or one row index (then a scalar, or [K] if 2-D)."""
    if name == "G" and self.given is not None:
      x = self.given
      if isinstance(rows, pl.Slice):
        assert rows is self.rows, "G in registers is the whole chunk's"
        return x
    else:
      ref = self.refs[name]
      at = (rows,) if len(ref.shape) == 1 else (rows, slice(None))
      if not self.st.tpu or isinstance(rows, pl.Slice):
        return ref[at]
      # Mosaic loads no single element or row at an unaligned offset
      x = self.load(name, self.rows)
    # one row: a masked sum
    i = self.rows.start + lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(i == rows, x, 0.0), axis=0)

  def gq(self, rows, queries=True):
    """G at `rows` (a slice or one row index); for queries of the exclusive readout G - g."""
    return self.load("Gq" if queries and self.st.exclusive else "G", rows)

  def key_factor(self):
    """exp(Gamma - G) <= 1 times the key mask: [C, K] or [C, 1], or None."""
    st, refs = self.st, self.refs
    f = None
    if st.kind == "vector":
      f = jnp.exp(self.load("G", self.last)[None, :] - self.G)
    elif st.kind == "scalar":
      f = jnp.exp(self.load("G", self.last) - self.G)[:, None]
    if st.segments:
      mk = refs["mk"][self.rows][:, None]
      f = mk if f is None else f * mk
    return f

  def kd(self, k):
    """k * exp(Gamma - G) (* key mask) in float32: the keys as seen from the chunk end."""
    f = self.key_factor()
    k = k.astype(F32)
    return k if f is None else k * f

  def carry(self, h):
    """h * exp(Gamma) (* crossing mask): the state (or its gradient) across the chunk."""
    st = self.st
    if st.kind == "vector":
      h = h * jnp.exp(self.load("G", self.last))[:, None]
    elif st.kind == "scalar":
      h = h * jnp.exp(self.load("G", self.last))
    if st.segments:
      h = h * self.load("m0", self.last)
    return h

  def query_side(self, x, rows):
    """x[S, K] * exp(Gq) (* row mask) * scale: how query rows read the entering state."""
    st, refs = self.st, self.refs
    if st.kind == "vector":
      x = x * jnp.exp(self.gq(rows))
    elif st.kind == "scalar":
      x = x * jnp.exp(self.gq(rows))[:, None]
    if st.segments:
      x = x * refs["m0"][rows][:, None]
    return x * st.scale


class _Rows:
  """One sub-block of S query rows of a chunk (start 0), with its masks and decay factors."""

  def __init__(self, ch: _Chunk, index):
    st, refs = ch.st, ch.refs
    s, c = st.sub, st.chunk
    self.ch = ch
    self.rows = pl.ds(index * s, s)
    i = index * s + lax.broadcasted_iota(jnp.int32, (s, c), 0)
    j = lax.broadcasted_iota(jnp.int32, (s, c), 1)
    mask = j < i if st.exclusive else j <= i
    self.diagonal = j == i
    if st.segments:
      seg = refs["seg"]
      mask = mask & (seg[self.rows][:, None] == seg[ch.rows][None, :])
    self.mask = mask
    self.ref_row = index * s + s // 2 - 1  # vector decay: the reference row
    if st.kind == "scalar":
      gq = ch.gq(self.rows)  # [S]
      self.pair = jnp.exp(jnp.where(mask, gq[:, None] - ch.G[None, :], -jnp.inf))  # [S, C]

  def weigh(self, x):
    """Applies the pair decay, the mask and the scale to an [S, C] matrix of raw products."""
    st = self.ch.st
    if st.kind == "scalar":
      return x * self.pair * st.scale
    return jnp.where(self.mask, x, 0.0) * st.scale

  def qfac(self):
    """Vector decay: exp(Gq - r) for the block's query rows [S, K] (computed where used:
    [C, K] float32 factors kept live would spill)."""
    return jnp.exp(jnp.minimum(self.ch.gq(self.rows) - self.ch.gq(self.ref_row)[None, :], CLAMP))

  def kfac(self):
    """Vector decay: exp(r - G) for all keys of the chunk [C, K]."""
    return jnp.exp(jnp.minimum(self.ch.gq(self.ref_row)[None, :] - self.ch.G, CLAMP))

  def factored(self, q, k):
    """(q, k) with the vector-decay factors applied (unchanged otherwise), input dtype."""
    if self.ch.st.kind != "vector":
      return q, k
    dt = k.dtype
    return ((q.astype(F32) * self.qfac()).astype(dt), (k.astype(F32) * self.kfac()).astype(dt))

  def scores(self, q, k):
    """A[S, C] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), masked; float32."""
    qf, kf = self.factored(q, k)
    return self.weigh(common.dot(qf, kf, trans_b=True))


def _unpack(names, refs):
  return dict(zip(names, refs))


def decay_names(st, query_side):
  names = []
  if st.kind != "none":
    names += ["G", "Gq"] if query_side and st.exclusive else ["G"]
  if st.segments:
    names += ["m0", "mk"]
  return names


def input_names(st):
  return ["q", "k", "v"] + decay_names(st, True) + (["seg"] if st.segments else [])


def keys_factored(st):
  """Vector decay: the states kernel reads the keys with their factors applied, kd = k
  e^{Gamma - G} (* key mask) in the input dtype, from `cumsum_kernel`, instead of k and the
  float32 G: 3/5 of the bytes per step of its sequential loop and no [C, K] exponentials
  there."""
  return st.kind == "vector"


def cumsum_names(st):
  """(inputs, outputs) of `cumsum_kernel`."""
  factored = keys_factored(st)
  return (
    ["g"] + (["k"] + (["mk"] if st.segments else []) if factored else []),
    ["G"] + (["Gq"] if st.exclusive else []) + (["kd"] if factored else []),
  )


def states_names(st):
  if keys_factored(st):
    return ["kd", "v", "G"] + (["m0"] if st.segments else [])
  return ["k", "v"] + decay_names(st, False)


# ----------------------------------------------------------------------------- kernels


def cumsum_kernel(st, *refs):
  """One chunk: G, the chunk-local cumulative sum of the log decay g (float32); exclusive
  readout: also Gq = G - g, the queries' exclusive sum (read by the kernels that need it,
  rather than formed there from G and g: slower in the backward kernels); vector
  decay: also kd = k e^{Gamma - G} (* key mask), the keys as the states kernel adds them
  (`keys_factored`)."""
  ins, outs = cumsum_names(st)
  r = _unpack(ins + outs, refs)
  g = r["g"][...].astype(F32)
  G = _running_sum(g) if st.tpu else jnp.cumsum(g, axis=0)
  r["G"][...] = G
  if st.exclusive:
    r["Gq"][...] = G - g
  if "kd" in r:
    r["kd"][...] = _Chunk(st, r, 0, G=G).kd(r["k"][...]).astype(r["kd"].dtype)


def states_kernel(st, *refs, loop, store=True):
  """Forward over the chunks of its rows: stores the entering state h_n of every chunk (unless
  `store` is False: the first pass of a split sequence); returns the last."""
  r = _unpack(states_names(st) + ["h0"] + (["hs"] if store else []) + ["hT"], refs)
  c = st.chunk
  dt = r["v"].dtype

  def body(n, h):
    ch = _Chunk(st, r, pl.multiple_of(n * c, c))
    if store:
      r["hs"][n, :, :] = h.astype(r["hs"].dtype)
    if "kd" in r:
      kd = r["kd"][ch.rows, :]
    else:
      kd = ch.kd(r["k"][ch.rows, :]).astype(dt)
    return ch.carry(h) + common.dot(kd, r["v"][ch.rows, :], trans_a=True)

  loop(body, r["v"].shape[0] // c, r["h0"], r["hT"])


def dstates_kernel(st, *refs, loop, store=True):
  """Reverse over the chunks of its rows: stores the state gradient at every chunk's exit and,
  with decay, this V tile's part of sum_v (e^Gamma h_n) * dh_n per chunk (in R_n), unless
  `store` is False; returns the gradient at the first chunk's entry."""
  rs = store and st.kind != "none"
  r = _unpack(
    ["q", "do"]
    + decay_names(st, True)
    + (["hs"] if rs else [])
    + ["dhT"]
    + (["dhs"] if store else [])
    + ["dh0"]
    + (["rs"] if rs else []),
    refs,
  )
  c = st.chunk
  dt = r["q"].dtype
  n_chunks = r["q"].shape[0] // c

  def body(i, dh):
    n = n_chunks - 1 - i
    ch = _Chunk(st, r, pl.multiple_of(n * c, c))
    if store:
      r["dhs"][n, :, :] = dh.astype(r["dhs"].dtype)
    if rs:
      r["rs"][n, :] = jnp.sum(ch.carry(r["hs"][n, :, :].astype(F32)) * dh, axis=1)
    qs = ch.query_side(r["q"][ch.rows, :].astype(F32), ch.rows).astype(dt)
    return ch.carry(dh) + common.dot(qs, r["do"][ch.rows, :], trans_a=True)

  loop(body, n_chunks, r["dhT"], r["dh0"])


def output_kernel(st, *refs):
  """One chunk and V tile: o = A v + scale (q e^{Gq}) h_n. With the exclusive readout the
  RWKV-6 bonus scale (q_t . (u * k_t)) v_t is A's diagonal: scale ((q * u) k^T)_tt, from one
  more [S, C] matmul instead of float32 [S, K] products and a [S, V] update."""
  r = _unpack(input_names(st) + (["u"] if st.exclusive else []) + ["hs", "o"], refs)
  ch = _Chunk(st, r, 0)
  dt = r["q"].dtype
  k, v, h = r["k"][...], r["v"][...], r["hs"][...].astype(dt)
  for index in range(st.chunk // st.sub):
    rows = _Rows(ch, index)
    q = r["q"][rows.rows, :]
    a = rows.scores(q, k)
    if st.exclusive:
      qu = (q.astype(F32) * r["u"][...]).astype(dt)
      a = a + jnp.where(rows.diagonal, common.dot(qu, k, trans_b=True), 0.0) * st.scale
    o = common.dot(a.astype(dt), v)
    o = o + common.dot(ch.query_side(q.astype(F32), rows.rows).astype(dt), h)
    r["o"][rows.rows, :] = o.astype(r["o"].dtype)


def _split3(x):
  """float32 x as three bfloat16 parts whose sum is x to about 2^-24 relative."""
  hi = x.astype(jnp.bfloat16)
  rest = x - hi.astype(F32)
  mid = rest.astype(jnp.bfloat16)
  return hi, mid, (rest - mid.astype(F32)).astype(jnp.bfloat16)


def _running_sum(x, reverse=False):
  """Cumulative sum over the rows of x[C] or x[C, K] (float32): the prefix sums, or the suffix
  sums when reverse. [C, K] tiles go through 0/1 triangular matmuls on the tensor cores (MXU),
  with x split into three bfloat16 parts so that no precision is lost; [C] by a masked sum."""
  c = x.shape[0]
  i = lax.broadcasted_iota(jnp.int32, (c, c), 0)
  j = lax.broadcasted_iota(jnp.int32, (c, c), 1)
  tri = j >= i if reverse else j <= i
  if x.ndim == 1:
    return jnp.sum(jnp.where(tri, x[None, :], 0.0), axis=1)
  tri = tri.astype(jnp.bfloat16)
  hi, mid, lo = _split3(x)
  return common.dot(tri, hi) + common.dot(tri, mid) + common.dot(tri, lo)


def _place(x, index, rows):
  """x[S, K] as rows index*S.. of a [rows, K] float32 tile (zeros elsewhere), exactly."""
  s = x.shape[0]
  if s == rows:
    return x
  i = lax.broadcasted_iota(jnp.int32, (rows, s), 0)
  j = lax.broadcasted_iota(jnp.int32, (rows, s), 1)
  onehot = (i == index * s + j).astype(F32)
  return lax.dot_general(
    onehot, x, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST, preferred_element_type=F32
  )


def dv_kernel(st, *refs):
  """One chunk and V tile: dv = (k e^{Gamma-G}) dh_n + A^T do."""
  r = _unpack(input_names(st) + ["do", "dhs", "dv"], refs)
  dt = r["q"].dtype
  ch = _Chunk(st, r, 0)
  dv = common.dot(ch.kd(r["k"][...]).astype(dt), r["dhs"][...])
  for index in range(st.chunk // st.sub):
    rows = _Rows(ch, index)
    a = rows.scores(r["q"][rows.rows, :], r["k"][...]).astype(dt)
    dv = dv + common.dot(a, r["do"][rows.rows, :], trans_a=True)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def dqk_kernel(st, *refs):
  """One chunk, all V tiles, all of K or one K tile: dq, dk and dg, the gradient of the
  per-step log decay.

  The decay enters through the chunk-local cumsums G (keys, chunk total) and Gq (queries):
  dGq = q * dq; dG = -k * dk, plus R_n on the last row (how the carried state and the keys'
  factors e^{Gamma - G} depend on Gamma), R_n = sum_v (e^Gamma h_n) dh_n (from the dstates
  kernel) + sum_j k_j dk_state_j. dg is their chunk-local suffix sum (the transpose of the
  cumsum), minus dGq when the readout is exclusive (Gq = G - g). For scalar decay the
  intra-chunk terms are summed from the pair matrix A * dA (rows for dGq, columns for dG), so
  that pairs inside a suffix cancel exactly instead of through two noisy K-dim dot products.
  Order: dA, then dk (stored, folded into dG), then dq (stored, folded into dGq), so that at
  most two [C, K] float32 tiles are live at once."""
  decay = st.kind != "none"
  names = input_names(st) + ["do", "hs", "dhs"] + (["rs"] if decay else [])
  r = _unpack(names + ["dq", "dk"] + (["dg"] if decay else []), refs)
  c, bv = st.chunk, st.block_v_out
  dt = r["q"].dtype
  tiles = [pl.ds(j * bv, bv) for j in range(r["v"].shape[1] // bv)]
  ch = _Chunk(st, r, 0)
  blocks = [_Rows(ch, index) for index in range(c // st.sub)]
  factored = [rows.factored(r["q"][rows.rows, :], r["k"][...]) for rows in blocks]
  # dA per block of query rows (scaled, masked, decayed: ds); scalar decay: sums of A * dA
  ds = []
  for rows, (qf, kf) in zip(blocks, factored):
    ds_raw = None
    for tile in tiles:
      x = common.dot(r["do"][rows.rows, tile], r["v"][:, tile], trans_b=True)  # [S, C]
      ds_raw = x if ds_raw is None else ds_raw + x
    ds.append(rows.weigh(ds_raw).astype(dt))
    if st.kind == "scalar":  # one block: S = C
      m = rows.weigh(common.dot(qf, kf, trans_b=True)) * ds_raw  # dL/d(log pair weight)
      rowm, colm = jnp.sum(m, axis=1), jnp.sum(m, axis=0)
  # dk = (v dh_n^T) e^{Gamma-G} + sum over blocks of (ds^T qf) e^{r-G}
  dk = None
  for tile in tiles:
    term = common.dot(r["v"][:, tile], r["dhs"][:, tile], trans_b=True)  # [C, K]
    dk = term if dk is None else dk + term
  f = ch.key_factor()
  if f is not None:
    dk = dk * f
  if decay:
    u = r["k"][...].astype(F32) * dk  # [C, K]
    big_r = jnp.sum(r["rs"][...], axis=0) + jnp.sum(u, axis=0)  # R_n [K]
    if st.kind == "scalar":
      colm = colm + jnp.sum(u, axis=1)  # + k . dk_state
  for rows, (qf, _), d in zip(blocks, factored, ds):
    x = common.dot(d, qf, trans_a=True)
    dk = dk + (x * rows.kfac() if st.kind == "vector" else x)
  r["dk"][...] = dk.astype(r["dk"].dtype)
  if st.kind == "vector":
    dsum = -(r["k"][...].astype(F32) * dk)  # dG, then + dGq
  # dq = (ds kf) e^{Gq-r} + scale (do h_n^T) e^{Gq}
  dgq = None
  for index, (rows, (_, kf), d) in enumerate(zip(blocks, factored, ds)):
    dq_state = None
    for tile in tiles:
      y = common.dot(r["do"][rows.rows, tile], r["hs"][:, tile].astype(dt), trans_b=True)  # [S, K]
      dq_state = y if dq_state is None else dq_state + y
    dq_state = ch.query_side(dq_state, rows.rows)
    dq = common.dot(d, kf)
    if st.kind == "vector":
      dq = dq * rows.qfac()
    dq = dq + dq_state
    r["dq"][rows.rows, :] = dq.astype(r["dq"].dtype)
    q32 = r["q"][rows.rows, :].astype(F32)
    if st.kind == "scalar":
      dgq = rowm + jnp.sum(q32 * dq_state, axis=1)  # [C]
    elif st.kind == "vector":
      piece = _place(q32 * dq, index, c)  # [C, K]
      dsum = dsum + piece
      if st.exclusive:
        dgq = piece if dgq is None else dgq + piece
  if decay:
    if st.kind == "scalar":
      dg = _running_sum(dgq - colm, reverse=True) + jnp.sum(big_r)
    else:
      dg = _running_sum(dsum, reverse=True) + big_r[None, :]
    if st.exclusive:
      dg = dg - dgq
    r["dg"][...] = dg
