"""Chunked decayed linear attention in Pallas: forward and backward kernels with a custom VJP.

Recurrence (layout BTHD; state [K, V] per batch and head, float32):

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t,  log a_t = g_t <= 0
  exclusive (RWKV-6 readout): o_t = scale * S_{t-1}^T q_t   (the state before step t)

`g` is None (no decay), [B,T,H] (one decay per head and step) or [B,T,H,K] (per key channel).
Segment ids [B,T] reset the state to zero wherever the id changes (packed sequences).

Chunkwise form (GLA, Yang et al. 2024, sec. 4; the kernel split of flash-linear-attention):
chunks of C tokens, G = chunk-local cumsum of g (float32, kernel 0), Gq = G (or G - g when
exclusive, also from kernel 0), Gamma = G at the chunk's last row. Every exponent is <= 0:
  - intra-chunk scores A[i, j] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), j <= i (j < i),
    masked with `where`. Scalar decay: (q k^T) * exp(Gq_i - G_j). Vector decay: per sub-block
    I of S query rows with reference r = Gq at its middle row, A_I = (q_I e^{Gq_I - r})
    (k e^{r - G})^T; both exponents are clamped at 80, so the result is exact unless the decay
    over the S/2 steps on either side of the reference is stronger than e^-80; the keys of
    earlier sub-blocks always have r - G <= 0. By default S is the whole chunk (one 64-row
    matmul; 16-row sub-blocks run 4x slower on Hopper), which is exact whenever no chunk decays
    by more than e^-80 in any channel; calls where some chunk does take S = 16 (exact unless the
    decay over 8 steps is stronger than e^-80, about -10 per step), chosen at run time
    (`_with_sub`: `lax.cond`, or in the GPU forward both forms launched, each program of the
    form not chosen returning at once);
  - o = A v + scale (q e^{Gq}) h_n,   h_{n+1} = e^{Gamma} h_n + (k e^{Gamma - G})^T v.

Kernels (matmul operands in the input dtype, accumulation and carried states in float32):
  0. `_cumsum_kernel`, grid (B, H, N): G from g (Triton's scan on GPU, triangular matmuls on
     the MXU on TPU), Gq = G - g for the exclusive readout, and with vector decay the keys as
     the states kernel adds them, kd = k e^{Gamma - G} in the input dtype (`_keys_factored`).
  1. `_states_kernel`, grid (B, H, K/BK, V/BV, P): a sequential loop over chunks carrying one
     [BK, BV] tile of the state; stores h_n (the state entering chunk n, in the input dtype)
     and returns the final state. Vector decay: per chunk it reads kd and G's last row, not
     k and G. On GPU a small grid (1x16384x16: 64 tiles for 132 SMs, each ~2.3 us per chunk
     step) walks P pieces of the sequence in parallel (`_sequential`): once from zero for each
     piece's own contribution, the pieces' entering states chained in XLA, then again from
     those (1x16384: states 0.59 -> 0.36 ms with P = 4).
  2. `_output_kernel`, grid (B, H, N, V/BV), every chunk in parallel: o from A and h_n (the
     RWKV-6 bonus as A's diagonal).
Backward (the inputs, G and the h_n are saved, kd is not; the h_n are B*H*(T/C)*K*V in the
input dtype, 4x v's bytes at K=128, C=64; recomputing them instead saves nothing under jit,
where XLA merges the identical states kernels of the forward and the backward and keeps h_n
alive anyway):
  3. `_dstates_kernel`, grid (B, H, K/BK, V/BV, P), a reverse loop (split like kernel 1):
     stores dh_n, the gradient at chunk n's exit, with dh <- e^{Gamma} dh + scale (q e^{Gq})^T
     do; returns dh_0; with decay also its V tile's part of sum_v (e^Gamma h_n) dh_n.
  4. `_dv_kernel`, grid (B, H, N, V/BV), every chunk in parallel: dv.
  5. `_dqk_kernel`, grid (B, H, N[, K/BKg]), every chunk in parallel: dq, dk and dg directly
     (the chunk-local suffix sums of dGq = q dq and dG = -k dk + R_n on the last row, see
     there). Without decay or with vector decay the key columns are independent, so the grid
     may tile K (`block_k_grad`): smaller tiles per program, no register spills (vector decay
     at 4x4096 on an H200: 1.44 -> 0.52 ms for K=128 in tiles of 64).

Platforms (`platform="gpu"|"tpu"`; None: "tpu" when JAX's default backend is TPU). The kernel
bodies are shared.
GPU: lowered through Pallas' Triton backend (explicit `CompilerParams`): the kernels use
general in-register arithmetic (exp, where, broadcasting, 16..64-row dots) that Triton lowers
for any shape, which the Mosaic GPU pallas_call lowering does not; the same kernels run with
`interpret=True` on CPU.
TPU (Mosaic, v5 and newer): the same kernels in the block shapes Mosaic accepts (`_TpuSpecs`):
q, k, v, o, vector decays and their gradients in [B,H,T,D] (the wrapper transposes), per-position
vectors as [..., N, 1, C], whole head dims (one K and one V tile); the sequential kernels (1, 3)
take one chunk per step of a fifth, "arbitrary" grid axis with their float32 carry in VMEM
scratch (pallas_kernels.common); single rows of G are read as masked sums; interpret mode is
Pallas' TPU interpreter. Of `KernelConfig` only `chunk` and `sub` apply there.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

F32 = jnp.float32
CLAMP = 80.0  # largest positive exponent of either side of the vector-decay sub-block trick


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tuning knobs (static), GPU only except `chunk` and `sub`.
  `block_k`/`block_v`: the state tile of the sequential kernels (1, 3); `block_v_out`: the V
  tile of the output and dv kernels (2, 4) and of the dq/dk/dg kernel's loop over V (5);
  `block_k_grad`: the K tile of the dq/dk/dg kernel's grid without decay or with vector decay,
  whose key columns are independent there (None: all of K; scalar decay always takes all of
  K). Warps and pipeline stages: `state_*` for kernels 1 and 3 (`dstates_stages` for kernel 3
  if set), `num_*` for the others (None: default). `state_splits`: how many pieces of the
  sequence the sequential kernels walk in parallel (see `_sequential`; a power of two; None:
  doubled while the grid has fewer than 256 programs and each piece keeps 8 or more chunks).
  `sub`: query rows per intra-chunk sub-block for vector decay (see the module docstring);
  None: the whole chunk where that is exact, else 16."""
  chunk: int = 64
  sub: int | None = None
  block_k: int = 64
  block_v: int = 64
  block_v_out: int = 64
  block_k_grad: int | None = None
  num_warps: int | None = None
  num_stages: int | None = None
  state_warps: int | None = None
  state_stages: int | None = None
  dstates_stages: int | None = None
  state_splits: int | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  kind: str          # "none" | "scalar" | "vector"
  exclusive: bool
  segments: bool
  scale: float
  chunk: int
  sub: int
  choose_sub: bool   # vector decay: sub chosen at run time (`_with_sub`)
  interpret: bool
  tpu: bool          # Mosaic TPU form (see `_TpuSpecs`), else Triton
  block_k: int
  block_v: int
  block_v_out: int
  block_k_grad: int
  splits: int        # pieces of the sequence walked in parallel by the sequential kernels
  out_dtype: object
  config: KernelConfig


def default_config(batch, heads, k_dim, v_dim, kind="scalar") -> KernelConfig:
  """A fixed block configuration per decay kind and size (no autotuning), from the H200 sweeps
  in experiments/results/kernels/linear_nvidia_h200.md. Scalar decay with few sequences (under
  128 state tiles of 64x64, e.g. 1x16384x16: 64 programs for 132 SMs) takes 32x32 state tiles
  (fwd+bwd 1.18 -> 1.06 ms there); vector decay measured no gain from them."""
  if kind == "vector":
    return KernelConfig(block_v_out=128, block_k_grad=64, state_stages=3, dstates_stages=2)
  cfg = KernelConfig(block_v_out=128, num_stages=3, state_stages=3)
  if kind == "scalar" and batch * heads * -(-k_dim // 64) * -(-v_dim // 64) < 128:
    cfg = dataclasses.replace(cfg, block_k=32, block_v=32)
  return cfg


def default_splits(programs, chunks):
  """Pieces of the sequence for the sequential kernels when the config leaves it open: doubled
  while their grid has under 256 programs (an H200 has 132 SMs) and each piece keeps 8 or more
  chunks."""
  splits = 1
  while programs * splits < 256 and chunks % (2 * splits) == 0 and chunks // (2 * splits) >= 8:
    splits *= 2
  return splits


def _check_config(cfg):
  if (cfg.sub or 16) > cfg.chunk:
    return f"sub ({cfg.sub or 16}) must not exceed chunk ({cfg.chunk})"
  for name in ("chunk", "sub", "block_k", "block_v", "block_v_out", "block_k_grad"):
    x = getattr(cfg, name) or 16
    if x < 16 or x & (x - 1):
      return f"{name} must be a power of two >= 16, got {x}"
  x = cfg.state_splits or 1
  if x < 1 or x & (x - 1):
    return f"state_splits must be a power of two, got {x}"
  return None


def reason(q, k, v, log_decay=None, *, scale=None, bonus=None, initial_state=None,
           segment_ids=None, config=None) -> str | None:
  """Why these arguments cannot be served by the kernel, or None."""
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    return f"wants q,k [B,T,H,K] and v [B,T,H,V]; got {q.shape}, {k.shape}, {v.shape}"
  if isinstance(scale, jax.core.Tracer) or jnp.ndim(scale) != 0:
    return "scale must be a static Python number"
  dts = {q.dtype, k.dtype, v.dtype}
  if len(dts) != 1 or q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    return f"needs q, k, v of one float dtype (f32/bf16/f16), got {sorted(map(str, dts))}"
  if common.next_pow2(q.shape[-1], 16) > 256:
    return f"key head dim {q.shape[-1]} > 256 (state tile too large)"
  if log_decay is not None and log_decay.shape not in (q.shape[:3], q.shape):
    return f"log_decay must be [B,T,H] or [B,T,H,K], got {log_decay.shape}"
  cfg = config or KernelConfig()
  why = _check_config(cfg)
  if why is None and cfg.state_splits and -(-q.shape[1] // cfg.chunk) % cfg.state_splits:
    why = f"state_splits={cfg.state_splits} does not divide the chunks of T={q.shape[1]}"
  return why


# ----------------------------------------------------------------------------- kernel pieces

class _Chunk:
  """Decay factors and masks of the chunk at rows [start, start + C) of the refs (start is 0
  in the parallel kernels, whose blocks are one chunk). Loads happen where a factor is used:
  [C, K] float32 tiles kept live would spill."""

  def __init__(self, st, refs, start, G=None):
    self.st, self.refs = st, refs
    self.rows = pl.ds(start, st.chunk)
    self.last = start + st.chunk - 1
    self.given = G      # G already in registers (the cumsum kernel), else loaded from refs

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
    self.ref_row = index * s + s // 2 - 1                # vector decay: the reference row
    if st.kind == "scalar":
      gq = ch.gq(self.rows)                              # [S]
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


def _decay_names(st, query_side):
  names = []
  if st.kind != "none":
    names += ["G", "Gq"] if query_side and st.exclusive else ["G"]
  if st.segments:
    names += ["m0", "mk"]
  return names


def _input_names(st):
  return ["q", "k", "v"] + _decay_names(st, True) + (["seg"] if st.segments else [])


def _keys_factored(st):
  """Vector decay: the states kernel reads the keys with their factors applied, kd = k
  e^{Gamma - G} (* key mask) in the input dtype, from `_cumsum_kernel`, instead of k and the
  float32 G: 3/5 of the bytes per step of its sequential loop and no [C, K] exponentials
  there (4x4096 on an H200: states 0.206 -> 0.113 ms, cumsum 0.080 -> 0.121 ms)."""
  return st.kind == "vector"


def _cumsum_names(st):
  """(inputs, outputs) of `_cumsum_kernel`."""
  factored = _keys_factored(st)
  return (["g"] + (["k"] + (["mk"] if st.segments else []) if factored else []),
          ["G"] + (["Gq"] if st.exclusive else []) + (["kd"] if factored else []))


def _states_names(st):
  if _keys_factored(st):
    return ["kd", "v", "G"] + (["m0"] if st.segments else [])
  return ["k", "v"] + _decay_names(st, False)


# ----------------------------------------------------------------------------- kernels

def _cumsum_kernel(st, *refs):
  """One chunk: G, the chunk-local cumulative sum of the log decay g (float32); exclusive
  readout: also Gq = G - g, the queries' exclusive sum (formed from G and g in the kernels
  that read it instead, the backward kernels measured 17-28% slower on an H200); vector
  decay: also kd = k e^{Gamma - G} (* key mask), the keys as the states kernel adds them
  (`_keys_factored`)."""
  ins, outs = _cumsum_names(st)
  r = _unpack(ins + outs, refs)
  g = r["g"][...].astype(F32)
  G = _running_sum(g) if st.tpu else jnp.cumsum(g, axis=0)
  r["G"][...] = G
  if st.exclusive:
    r["Gq"][...] = G - g
  if "kd" in r:
    r["kd"][...] = _Chunk(st, r, 0, G=G).kd(r["k"][...]).astype(r["kd"].dtype)


def _states_kernel(st, *refs, loop, store=True):
  """Forward over the chunks of its rows: stores the entering state h_n of every chunk (unless
  `store` is False: the first pass of a split sequence); returns the last."""
  r = _unpack(_states_names(st) + ["h0"] + (["hs"] if store else []) + ["hT"], refs)
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


def _dstates_kernel(st, *refs, loop, store=True):
  """Reverse over the chunks of its rows: stores the state gradient at every chunk's exit and,
  with decay, this V tile's part of sum_v (e^Gamma h_n) * dh_n per chunk (in R_n), unless
  `store` is False; returns the gradient at the first chunk's entry."""
  rs = store and st.kind != "none"
  r = _unpack(["q", "do"] + _decay_names(st, True) + (["hs"] if rs else []) + ["dhT"]
              + (["dhs"] if store else []) + ["dh0"] + (["rs"] if rs else []), refs)
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


def _output_kernel(st, *refs):
  """One chunk and V tile: o = A v + scale (q e^{Gq}) h_n. With the exclusive readout the
  RWKV-6 bonus scale (q_t . (u * k_t)) v_t is A's diagonal: scale ((q * u) k^T)_tt, from one
  more [S, C] matmul instead of float32 [S, K] products and a [S, V] update (the same speed on
  an H200)."""
  r = _unpack(_input_names(st) + (["u"] if st.exclusive else []) + ["hs", "o"], refs)
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
  return lax.dot_general(onehot, x, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=F32)


def _dv_kernel(st, *refs):
  """One chunk and V tile: dv = (k e^{Gamma-G}) dh_n + A^T do."""
  r = _unpack(_input_names(st) + ["do", "dhs", "dv"], refs)
  dt = r["q"].dtype
  ch = _Chunk(st, r, 0)
  dv = common.dot(ch.kd(r["k"][...]).astype(dt), r["dhs"][...])
  for index in range(st.chunk // st.sub):
    rows = _Rows(ch, index)
    a = rows.scores(r["q"][rows.rows, :], r["k"][...]).astype(dt)
    dv = dv + common.dot(a, r["do"][rows.rows, :], trans_a=True)
  r["dv"][...] = dv.astype(r["dv"].dtype)


def _dqk_kernel(st, *refs):
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
  names = _input_names(st) + ["do", "hs", "dhs"] + (["rs"] if decay else [])
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
      x = common.dot(r["do"][rows.rows, tile], r["v"][:, tile], trans_b=True)     # [S, C]
      ds_raw = x if ds_raw is None else ds_raw + x
    ds.append(rows.weigh(ds_raw).astype(dt))
    if st.kind == "scalar":                                  # one block: S = C
      m = rows.weigh(common.dot(qf, kf, trans_b=True)) * ds_raw         # dL/d(log pair weight)
      rowm, colm = jnp.sum(m, axis=1), jnp.sum(m, axis=0)
  # dk = (v dh_n^T) e^{Gamma-G} + sum over blocks of (ds^T qf) e^{r-G}
  dk = None
  for tile in tiles:
    term = common.dot(r["v"][:, tile], r["dhs"][:, tile], trans_b=True)          # [C, K]
    dk = term if dk is None else dk + term
  f = ch.key_factor()
  if f is not None:
    dk = dk * f
  if decay:
    u = r["k"][...].astype(F32) * dk                                   # [C, K]
    big_r = jnp.sum(r["rs"][...], axis=0) + jnp.sum(u, axis=0)         # R_n [K]
    if st.kind == "scalar":
      colm = colm + jnp.sum(u, axis=1)                                 # + k . dk_state
  for rows, (qf, _), d in zip(blocks, factored, ds):
    x = common.dot(d, qf, trans_a=True)
    dk = dk + (x * rows.kfac() if st.kind == "vector" else x)
  r["dk"][...] = dk.astype(r["dk"].dtype)
  if st.kind == "vector":
    dsum = -(r["k"][...].astype(F32) * dk)                             # dG, then + dGq
  # dq = (ds kf) e^{Gq-r} + scale (do h_n^T) e^{Gq}
  dgq = None
  for index, (rows, (_, kf), d) in enumerate(zip(blocks, factored, ds)):
    dq_state = None
    for tile in tiles:
      y = common.dot(r["do"][rows.rows, tile], r["hs"][:, tile].astype(dt), trans_b=True)   # [S, K]
      dq_state = y if dq_state is None else dq_state + y
    dq_state = ch.query_side(dq_state, rows.rows)
    dq = common.dot(d, kf)
    if st.kind == "vector":
      dq = dq * rows.qfac()
    dq = dq + dq_state
    r["dq"][rows.rows, :] = dq.astype(r["dq"].dtype)
    q32 = r["q"][rows.rows, :].astype(F32)
    if st.kind == "scalar":
      dgq = rowm + jnp.sum(q32 * dq_state, axis=1)                     # [C]
    elif st.kind == "vector":
      piece = _place(q32 * dq, index, c)                               # [C, K]
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


# ----------------------------------------------------------------------------- pallas_call glue

class _Specs:
  """BlockSpecs of the sequential grid (b, h, K tile, V tile, split) and of the chunk grid
  (b, h, n[, V or K tile])."""

  def __init__(self, st, t, k_dim, v_dim):
    self.st, self.t, self.k, self.v = st, t, k_dim, v_dim
    self.n = t // st.chunk

  # sequential kernels: the rows of one split (the whole sequence unless split) of one K or V
  # tile; "state" is the [B, H, splits, K, V] initial or final state (`reverse`: TPU only)
  def seq(self, name, reverse=False):
    del reverse
    st, bk, bv = self.st, self.st.block_k, self.st.block_v
    rows = self.t // st.splits
    if name in ("q", "k", "kd") or (name in ("G", "Gq") and st.kind == "vector"):
      return pl.BlockSpec((None, rows, None, bk), lambda b, h, i, j, p: (b, p, h, i))
    if name in ("v", "do"):
      return pl.BlockSpec((None, rows, None, bv), lambda b, h, i, j, p: (b, p, h, j))
    if name in ("G", "Gq"):
      return pl.BlockSpec((None, rows, None), lambda b, h, i, j, p: (b, p, h))
    if name in ("m0", "mk"):
      return pl.BlockSpec((None, rows), lambda b, h, i, j, p: (b, p))
    if name == "state":
      return pl.BlockSpec((None, None, None, bk, bv), lambda b, h, i, j, p: (b, h, p, i, j))
    if name == "rs":
      return pl.BlockSpec((None, None, None, self.n // st.splits, bk),
                          lambda b, h, i, j, p: (b, h, j, p, i))
    assert name == "states", name
    return pl.BlockSpec((None, None, self.n // st.splits, bk, bv),
                        lambda b, h, i, j, p: (b, h, p, i, j))

  # chunk kernels: one chunk; all of K and V, or one V tile (tiled="v"), or one K tile ("k")
  def chunk(self, name, tiled=None):
    c = self.st.chunk
    kw = self.st.block_k_grad if tiled == "k" else self.k
    vw = self.st.block_v_out if tiled == "v" else self.v
    if tiled:
      idx = lambda f: (lambda b, h, n, j: f(b, h, n, j))
    else:
      idx = lambda f: (lambda b, h, n: f(b, h, n, 0))
    kj = (lambda j: j) if tiled == "k" else (lambda j: 0)
    vj = (lambda j: j) if tiled == "v" else (lambda j: 0)
    vector = self.st.kind == "vector"
    if name in ("q", "k", "kd", "dq", "dk") or (name in ("g", "G", "Gq", "dg") and vector):
      return pl.BlockSpec((None, c, None, kw), idx(lambda b, h, n, j: (b, n, h, kj(j))))
    if name in ("v", "do", "o", "dv"):
      return pl.BlockSpec((None, c, None, vw), idx(lambda b, h, n, j: (b, n, h, vj(j))))
    if name in ("g", "G", "Gq", "dg"):
      return pl.BlockSpec((None, c, None), idx(lambda b, h, n, j: (b, n, h)))
    if name in ("seg", "m0", "mk"):
      return pl.BlockSpec((None, c), idx(lambda b, h, n, j: (b, n)))
    if name == "rs":   # summed over the V tiles (see _dstates)
      return pl.BlockSpec((None, None, 1, None, kw), idx(lambda b, h, n, j: (b, h, 0, n, kj(j))))
    if name == "u":    # the RWKV-6 bonus [H, 1, K]
      return pl.BlockSpec((None, 1, self.k), idx(lambda b, h, n, j: (h, 0, 0)))
    assert name == "states", name
    return pl.BlockSpec((None, None, None, kw, vw),
                        idx(lambda b, h, n, j: (b, h, n, kj(j), vj(j))))

  def rs_shape(self, b, h):
    return (b, h, self.v // self.st.block_v, self.n, self.k)


class _TpuSpecs(_Specs):
  """The TPU forms (Mosaic: the last two block dims divisible by (8, 128) or whole): q, k, v, o,
  their gradients and vector decays [B,H,T,D]; scalar decays [B,H,N,1,C]; segment masks
  [B,N,1,C]; R_n pieces [B,H,1,N,1,K]; whole head dims; one split. The sequential grid gains
  a last, "arbitrary" axis over the chunks (reversed for the backward), one chunk per block."""

  def _block(self, name, b, h, n, seq):
    """(block shape, block index) of chunk n of batch b, head h."""
    c, kd, vd = self.st.chunk, self.k, self.v
    if (name in ("q", "k", "kd", "dq", "dk")
        or (name in ("g", "G", "Gq", "dg") and self.st.kind == "vector")):
      return (None, None, c, kd), (b, h, n, 0)
    if name in ("v", "do", "o", "dv"):
      return (None, None, c, vd), (b, h, n, 0)
    if name in ("g", "G", "Gq", "dg"):
      return (None,) * 4 + (c,), (b, h, n, 0, 0)
    if name in ("seg", "m0", "mk"):
      return (None,) * 3 + (c,), (b, n, 0, 0)
    if name == "rs":
      return (None,) * 4 + (1, kd), (b, h, 0, n, 0, 0)
    if name == "u":
      return (None, 1, kd), (h, 0, 0)
    if name == "state":
      return (None, None, None, kd, vd), (b, h, 0, 0, 0)
    assert name == "states", name   # the sequential kernels index their one chunk as [0]
    return (None, None, 1 if seq else None, kd, vd), (b, h, n, 0, 0)

  def seq(self, name, reverse=False):
    at = (lambda s: self.n - 1 - s) if reverse else (lambda s: s)
    shape, _ = self._block(name, 0, 0, 0, True)
    return pl.BlockSpec(shape, lambda b, h, i, j, s: self._block(name, b, h, at(s), True)[1])

  def chunk(self, name, tiled=None):
    del tiled
    shape, _ = self._block(name, 0, 0, 0, False)
    return pl.BlockSpec(shape, lambda b, h, n, *_: self._block(name, b, h, n, False)[1])

  def rs_shape(self, b, h):
    return (b, h, 1, self.n, 1, self.k)


def _sizes(st, a):
  """(B, T, H, K, V) of the kernel inputs (of the platform's layout) and their BlockSpecs."""
  if st.tpu:
    b, h, t, k_dim = a["q"].shape
  else:
    b, t, h, k_dim = a["q"].shape
  v_dim = a["v"].shape[-1]
  return b, t, h, k_dim, v_dim, (_TpuSpecs if st.tpu else _Specs)(st, t, k_dim, v_dim)


def _call(st, kernel, grid, in_specs, out_specs, out_shape, args, chunks=None, stages=None,
          store=True, turn=None):
  """chunks: for the sequential kernels, the number of chunks they loop over carrying a
  [BK, BV] float32 state (`common.pallas_call`); on GPU their grid gains the split axis.
  stages: Triton pipeline stages instead of the config's. store=False: a sequential kernel's
  first pass over a split sequence (no per-chunk states). turn=(flag [1] int32, value, the
  output so far or None): the kernel runs only where flag == value, else every program
  returns at once, leaving the output so far (written in place; see `_output`)."""
  sequential = chunks is not None
  cfg = st.config
  if sequential:
    launch = (cfg.state_warps or 4, stages or cfg.state_stages or 2)
    if not st.tpu:
      grid = grid + (st.splits,)
  else:
    launch = (cfg.num_warps or 4, stages or cfg.num_stages or 2)
  body = functools.partial(kernel, st, **({} if store else {"store": False}))
  aliases = None
  if turn is not None:
    flag, value, out = turn
    so_far = [] if out is None else [out]
    body = _taking_turns(body, value, len(args), len(so_far))
    aliases = {1 + len(args): 0} if so_far else None
    in_specs = [pl.BlockSpec((1,), lambda *_: (0,))] + in_specs + [out_specs] * len(so_far)
    args = [flag] + args + so_far
  call = common.pallas_call(
      body, tpu=st.tpu, interpret=st.interpret, grid=grid, in_specs=in_specs,
      out_specs=out_specs, out_shape=out_shape,
      name=kernel.__name__.strip("_") + ("" if store else "_local"),
      carry=(st.block_k, st.block_v) if sequential else None, chunks=chunks, launch=launch,
      aliases=aliases)
  return call(*args)


def _taking_turns(body, value, n_in, n_so_far):
  """body under `flag == value`, its flag ref first and the aliased output-so-far ref (left
  as it is) dropped."""
  def kernel(flag_ref, *refs):
    @pl.when(flag_ref[0] == value)
    def _():
      body(*refs[:n_in], *refs[n_in + n_so_far:])
  return kernel


def _arrays(names, arrays):
  return [arrays[n] for n in names]


def _chunk_ends(st, x):
  """x at every chunk's last position: G or a mask [B,T,...] on GPU, a vector decay's G
  [B,H,T,K] on TPU."""
  return x[:, :, st.chunk - 1::st.chunk] if st.tpu else x[:, st.chunk - 1::st.chunk]


def _split_decays(st, a):
  """[B, H, splits, K or 1, 1]: the factor by which a state crosses each split of the
  sequence, the product over its chunks of e^Gamma (times the crossing mask)."""
  b, _, h, _, _, sp = _sizes(st, a)
  p = st.splits
  log_a = jnp.zeros((b, p, h, 1), F32)
  if st.kind != "none":
    ends = _chunk_ends(st, a["G"])                                 # [B, N, H(, K)]
    ends = ends if st.kind == "vector" else ends[..., None]
    log_a = jnp.sum(ends.reshape(b, p, sp.n // p, h, -1), axis=2)
  f = jnp.exp(log_a)
  if st.segments:
    f = f * jnp.prod(_chunk_ends(st, a["m0"]).reshape(b, p, -1), axis=2)[:, :, None, None]
  return jnp.moveaxis(f, 1, 2)[..., None]


def _sequential(st, a, kernel, names, init, reverse, out_dtype, extra_in=(), extra_out=(),
                **kw):
  """A sequential kernel (1 or 3) over its splits: (per-chunk states [B,H,N,K,V], the carry
  after the last chunk it walks, *extra outputs). With several splits (GPU) it runs twice:
  first from zero states, for each split's own contribution L_p to the carry leaving it; then,
  after the carries entering the splits are chained in XLA (H_next = A_p H_p + L_p, A_p from
  `_split_decays`), from those, storing the per-chunk states. init: [B, H, K, V] float32.
  extra_in / extra_out: (name, array) / (name, shape) of the storing pass only."""
  b, _, h, k_dim, v_dim, sp = _sizes(st, a)
  seq = functools.partial(sp.seq, reverse=reverse)
  grid = (b, h, k_dim // st.block_k, v_dim // st.block_v)
  state = jax.ShapeDtypeStruct((b, h, st.splits, k_dim, v_dim), F32)
  specs = [seq(n) for n in names]
  inits = init[:, :, None]
  if st.splits > 1:
    local = _call(st, kernel, grid, specs + [seq("state")], seq("state"), state,
                  _arrays(names, a) + [jnp.zeros(state.shape, F32)], chunks=sp.n, store=False,
                  **kw)
    decay = _split_decays(st, a)
    carries = [init]
    for p in (range(st.splits - 1, 0, -1) if reverse else range(st.splits - 1)):
      carries.append(decay[:, :, p] * carries[-1] + local[:, :, p])
    inits = jnp.stack(carries[::-1] if reverse else carries, axis=2)
  states, last, *extra = _call(
      st, kernel, grid, specs + [seq(n) for n, _ in extra_in] + [seq("state")],
      [seq("states"), seq("state")] + [seq(n) for n, _ in extra_out],
      [jax.ShapeDtypeStruct((b, h, sp.n, k_dim, v_dim), out_dtype), state]
      + [jax.ShapeDtypeStruct(shape, F32) for _, shape in extra_out],
      _arrays(names, a) + [x for _, x in extra_in] + [inits], chunks=sp.n, **kw)
  return (states, last[:, :, 0 if reverse else -1], *extra)


def _states(st, a):
  """Kernel 1: (h_n for every chunk [B,H,N,K,V] in the input dtype, final state f32)."""
  return _sequential(st, a, _states_kernel, _states_names(st), a["h0"], False, a["v"].dtype)


def _forward(st, a):
  """(o, final state, h_n of every chunk)."""
  hs, hT = _states(st, a)
  return _with_sub(st, a, _output, a, hs, turns=True), hT, hs


def _output(st, a, hs):
  """Kernel 2: o. When the vector sub-block size is left to it (`_with_sub`), two launches
  write o: the whole-chunk form where a["exact"] is 1, then the 16-row form where it is 0, in
  place of the first's o; all programs of the form not chosen read the flag and return (one
  form per kernel: both forms in one kernel measured 6-7% slower)."""
  b, _, h, _, v_dim, sp = _sizes(st, a)
  names = _input_names(st) + (["u"] if st.exclusive else [])
  call = functools.partial(
      _call, kernel=_output_kernel, grid=(b, h, sp.n, v_dim // st.block_v_out),
      in_specs=[sp.chunk(n, "v") for n in names] + [sp.chunk("states", "v")],
      out_specs=sp.chunk("o", "v"),
      out_shape=jax.ShapeDtypeStruct(a["v"].shape, st.out_dtype or a["v"].dtype),
      args=_arrays(names, a) + [hs])
  if not st.choose_sub:
    return call(st)
  wide = dataclasses.replace(st, choose_sub=False)
  o = call(wide, turn=(a["exact"], 1, None))
  return call(dataclasses.replace(wide, sub=16), turn=(a["exact"], 0, o))


def _dstates(st, a, do, dhT, hs):
  """Kernel 3: (dh_n for every chunk, dh_0, [the state part of R_n]); on GPU the R_n pieces
  of the V tiles are summed here (one small XLA reduction)."""
  b, _, h, _, _, sp = _sizes(st, a)
  decay = st.kind != "none"
  dhs, dh0, *rs = _sequential(
      st, dict(a, do=do), _dstates_kernel, ["q", "do"] + _decay_names(st, True), dhT, True,
      hs.dtype, extra_in=[("states", hs)] if decay else [],
      extra_out=[("rs", sp.rs_shape(b, h))] if decay else [], stages=st.config.dstates_stages)
  return dhs, dh0, [x if st.tpu else jnp.sum(x, axis=2, keepdims=True) for x in rs]


def _dv(st, a, do, dhs):
  """Kernel 4: dv."""
  b, _, h, _, v_dim, sp = _sizes(st, a)
  names = _input_names(st)
  return _call(st, _dv_kernel, (b, h, sp.n, v_dim // st.block_v_out),
               [sp.chunk(n, "v") for n in names + ["do", "states"]], sp.chunk("dv", "v"),
               jax.ShapeDtypeStruct(a["v"].shape, a["v"].dtype), _arrays(names, a) + [do, dhs])


def _dqk(st, a, do, hs, dhs, rs):
  """Kernel 5: dq, dk and dg (None without decay)."""
  q, k = a["q"], a["k"]
  b, _, h, k_dim, _, sp = _sizes(st, a)
  names = _input_names(st)
  outs = ["dq", "dk"]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k)]
  if st.kind != "none":
    outs.append("dg")
    out_shape.append(jax.ShapeDtypeStruct(a["G"].shape, F32))
  grid, tiled = (b, h, sp.n), None
  if st.block_k_grad < k_dim:
    grid, tiled = grid + (k_dim // st.block_k_grad,), "k"
  spec = functools.partial(sp.chunk, tiled=tiled)
  res = _call(st, _dqk_kernel, grid,
              [spec(n) for n in names + ["do", "states", "states"]] + [spec("rs") for _ in rs],
              [spec(n) for n in outs], out_shape, _arrays(names, a) + [do, hs, dhs] + rs)
  return res[0], res[1], (res[2] if st.kind != "none" else None)


def _backward(st, a, do, dhT, hs):
  """Gradients w.r.t. q, k, v, the per-step log decay g, and h0, from the forward's h_n."""
  dhs, dh0, rs = _dstates(st, a, do, dhT, hs)
  dq, dk, dg = _dqk(st, a, do, hs, dhs, rs)
  return dq, dk, _dv(st, a, do, dhs), dg, dh0


def _with_sub(st, a, fn, *args, turns=False):
  """fn(st, *args) with the vector-decay sub-block size chosen at run time: the whole chunk
  where a["exact"] (no chunk decays by more than e^-CLAMP, so nothing is clamped), else 16
  rows. Through lax.cond, or with `turns` on GPU by fn's output kernel taking turns
  (`_output`). XLA's GPU conditional copies its predicate to the host and blocks there until
  it arrives (ConditionalThunk), stalling the dispatch of everything after it. Vector decay
  at 4x4096 on an H200: turns save the forward (one kernel after the choice) about 0.02 ms;
  in the backward (two kernels) they cost more than that (dv 0.258 -> 0.274, dq/dk/dg 0.518
  -> 0.549 ms): the idle launch of a 4096-8192-program kernel is not free. TPU: lax.cond
  (Mosaic prefetches every input block of a program, so an idle launch would read them all)."""
  if not st.choose_sub or (turns and not st.tpu):
    return fn(st, *args)
  wide = dataclasses.replace(st, choose_sub=False)
  narrow = dataclasses.replace(wide, sub=16)
  return lax.cond(a["exact"][0] == 1, functools.partial(fn, wide), functools.partial(fn, narrow),
                  *args)


_ARGS = ("q", "k", "v", "g", "u", "h0", "seg", "m0", "mk")


def _with_cumsum(st, args):
  """The kernel inputs: the arguments plus G, the chunk-local cumsum of g (float32), Gq for the
  exclusive readout, kd for vector decay (`_cumsum_kernel`), and with the sub-block size chosen
  at run time its flag "exact" [1] int32."""
  a = dict(zip(_ARGS, args))
  g = a["g"]
  if g is not None:
    b, _, h, _, _, sp = _sizes(st, a)
    names, outs = _cumsum_names(st)
    shapes = [jax.ShapeDtypeStruct(a["k"].shape, a["k"].dtype) if n == "kd" else
              jax.ShapeDtypeStruct(g.shape, F32) for n in outs]
    res = _call(st, _cumsum_kernel, (b, h, sp.n), [sp.chunk(n) for n in names],
                [sp.chunk(n) for n in outs], shapes, _arrays(names, a))
    a.update(zip(outs, res))
    if st.choose_sub:
      a["exact"] = (jnp.min(_chunk_ends(st, a["G"])) >= -CLAMP).astype(jnp.int32).reshape(1)
  return a


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, *args):
  o, hT, _ = _forward(st, _with_cumsum(st, args))
  return o, hT


def _core_fwd(st, *args):
  a = _with_cumsum(st, args)
  o, hT, hs = _forward(st, a)
  return (o, hT), ({n: x for n, x in a.items() if n != "kd"}, hs)   # kd: forward only


def _core_bwd(st, res, cts):
  a, hs = res
  do, dhT = cts
  do = do.astype(a["v"].dtype)
  dq, dk, dv, dg, dh0 = _with_sub(st, a, _backward, a, do, dhT.astype(F32), hs)
  du = None
  if st.exclusive:
    dq, dk, dv, du = _bonus_grads(st, a, do, dq, dk, dv)
  return dq, dk, dv, dg, du, dh0.astype(a["h0"].dtype), None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _bonus_grads(st, a, do, dq, dk, dv):
  """Adds the RWKV-6 bonus term's gradients (XLA): with beta = q . (u * k) and
  dbeta = do . v per step, dq += scale dbeta u k, dk += scale dbeta u q, dv += scale beta do,
  du = scale sum_{b,t} dbeta q k."""
  f = lambda x: x.astype(F32)
  u = a["u"] if st.tpu else a["u"][:, 0, :]         # broadcasts against [..., H, T|., K]
  q, k = f(a["q"]), f(a["k"])
  beta = jnp.sum(q * u * k, axis=-1, keepdims=True) * st.scale
  dbeta = jnp.sum(f(do) * f(a["v"]), axis=-1, keepdims=True) * st.scale
  du = jnp.sum(dbeta * q * k, axis=(0, 2) if st.tpu else (0, 1))
  grads = (f(dq) + dbeta * u * k, f(dk) + dbeta * u * q, f(dv) + beta * f(do))
  return (*(g.astype(x.dtype) for g, x in zip(grads, (dq, dk, dv))),
          du.reshape(a["u"].shape))


def _canonical_segments(segment_ids):
  """Segment index that increases by one at every change of id (0 at the first token)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                          jnp.cumsum(change.astype(jnp.int32), axis=1)], axis=1)


def _prepare(q, k, v, log_decay, *, scale, bonus, initial_state, segment_ids, config,
             interpret, out_dtype, platform=None):
  """The static description and the padded kernel inputs (a dict keyed by _ARGS): T padded to
  whole chunks, K to a power of two, V to whole tiles; the log decay in float32; segment
  masks; in the platform's layout (see `_TpuSpecs`)."""
  tpu = common.resolve_platform(platform) == "tpu"
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  cfg = config or default_config(b, h, k_dim, v_dim, kind)
  c = cfg.chunk
  tp = common.round_up(t, c)
  kp = common.next_pow2(k_dim, 16)
  bk = min(cfg.block_k, kp)
  vw = common.next_pow2(v_dim, 16)
  bv, bvo = min(cfg.block_v, vw), min(cfg.block_v_out, vw)
  while max(bv, bvo) > 16 and common.round_up(v_dim, max(bv, bvo)) > 1.5 * v_dim:
    bv, bvo = min(bv, max(bv, bvo) // 2), min(bvo, max(bv, bvo) // 2)  # V=129: tiles of 64
  vp = common.round_up(v_dim, max(bv, bvo))
  bkg = kp if kind == "scalar" or cfg.block_k_grad is None else min(cfg.block_k_grad, kp)
  if tpu:
    bk, bv, bvo, bkg = kp, vp, vp, kp
  splits = 1 if tpu else cfg.state_splits
  if splits is None:
    splits = default_splits(b * h * (kp // bk) * (vp // bv), tp // c)
  st = _Static(kind=kind, exclusive=bonus is not None, segments=segment_ids is not None,
               scale=float(scale), chunk=c, sub=(cfg.sub or c) if kind == "vector" else c,
               choose_sub=kind == "vector" and cfg.sub is None and c > 16,
               interpret=bool(interpret), tpu=tpu, block_k=bk, block_v=bv, block_v_out=bvo,
               block_k_grad=bkg, splits=splits, out_dtype=out_dtype, config=cfg)

  def pad(x, width):
    cfgpad = [(0, 0), (0, tp - t), (0, 0)] + ([(0, width - x.shape[-1])] if x.ndim == 4 else [])
    return jnp.pad(x, cfgpad)

  qp, kpd, vpd = pad(q, kp), pad(k, kp), pad(v, vp)
  g = None if log_decay is None else pad(log_decay.astype(F32), kp)
  u = None if bonus is None else jnp.pad(bonus.astype(F32), [(0, 0), (0, kp - k_dim)])[:, None]
  if initial_state is None:
    h0 = jnp.zeros((b, h, kp, vp), F32)
  else:
    h0 = jnp.pad(initial_state.astype(F32),
                 [(0, 0), (0, 0), (0, kp - k_dim), (0, vp - v_dim)])
  seg = m0 = mk = None
  if segment_ids is not None:
    cs = _canonical_segments(segment_ids)
    cs = jnp.pad(cs, [(0, 0), (0, tp - t)], mode="edge")
    cc = cs.reshape(b, tp // c, c)
    prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), cc[:, :-1, -1]], axis=1)
    seg = cs
    m0 = (cc == prev[:, :, None]).astype(F32).reshape(b, tp)
    mk = (cc == cc[:, :, -1:]).astype(F32).reshape(b, tp)
  if tpu:
    qp, kpd, vpd = (jnp.swapaxes(x, 1, 2) for x in (qp, kpd, vpd))
    vecs = lambda x: None if x is None else x.reshape(*x.shape[:-1], tp // c, 1, c)
    if g is not None:
      g = jnp.swapaxes(g, 1, 2)
      g = vecs(g) if kind == "scalar" else g
    seg, m0, mk = vecs(seg), vecs(m0), vecs(mk)
  return st, dict(zip(_ARGS, (qp, kpd, vpd, g, u, h0, seg, m0, mk)))


def linear_attention(q, k, v, log_decay=None, *, scale, bonus=None, initial_state=None,
                     segment_ids=None, config: KernelConfig | None = None, interpret=False,
                     out_dtype=None, platform=None):
  """Decayed linear attention; returns (o[B,T,H,V] in v's dtype, final_state[B,H,K,V] f32).

  log_decay: None | [B,T,H] | [B,T,H,K] float, <= 0. bonus: None or u[H,K]; when given the
  readout is RWKV-6's, o_t = scale (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t).
  initial_state: [B,H,K,V] float32 (zeros when None). segment_ids: [B,T] int; the state is
  reset to zero where the id changes. T, K and V need no particular size (padded here).
  out_dtype: dtype of o (default v's). platform: "gpu" (Triton) | "tpu" (Mosaic) | None (TPU
  when JAX's default backend is TPU); with interpret=True, the interpreter of that form.
  """
  why = reason(q, k, v, log_decay, scale=scale, bonus=bonus, initial_state=initial_state,
               segment_ids=segment_ids, config=config)
  if why is not None:
    raise NotImplementedError(f"pallas linear_attention: {why}")
  st, a = _prepare(q, k, v, log_decay, scale=scale, bonus=bonus, initial_state=initial_state,
                   segment_ids=segment_ids, config=config, interpret=interpret,
                   out_dtype=out_dtype, platform=platform)
  o, hT = _core(st, *(a[n] for n in _ARGS))
  if st.tpu:
    o = jnp.swapaxes(o, 1, 2)
  t, k_dim, v_dim = q.shape[1], q.shape[-1], v.shape[-1]
  o = o[:, :t, :, :v_dim]
  hT = hT[:, :, :k_dim, :v_dim]
  return o, hT
