"""Chunked decayed linear attention in Pallas: forward and backward kernels with a custom VJP.

Recurrence (layout BTHD; state [K, V] per batch and head, float32):

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t,  log a_t = g_t <= 0
  exclusive (RWKV-6 readout): o_t = scale * S_{t-1}^T q_t   (the state before step t)

`g` is None (no decay), [B,T,H] (one decay per head and step) or [B,T,H,K] (per key channel).
Segment ids [B,T] reset the state to zero wherever the id changes (packed sequences).

Chunkwise form (GLA, Yang et al. 2024, sec. 4; the kernel split of flash-linear-attention):
chunks of C tokens, G = chunk-local cumsum of g (float32, computed outside the kernels),
Gq = G (or G - g when exclusive), Gamma = G at the chunk's last row. Every exponent is <= 0:
  - intra-chunk scores A[i, j] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), j <= i (j < i),
    masked with `where`. Scalar decay: (q k^T) * exp(Gq_i - G_j). Vector decay: per sub-block
    I of S query rows with reference r = Gq at its middle row, A_I = (q_I e^{Gq_I - r})
    (k e^{r - G})^T; both exponents are clamped at 80, so the result is exact unless the decay
    over the S/2 steps on either side of the reference is stronger than e^-80; the keys of
    earlier sub-blocks always have r - G <= 0. By default S is the whole chunk (one 64-row
    matmul; 16-row sub-blocks run 4x slower on Hopper), which is exact whenever no chunk decays
    by more than e^-80 in any channel; calls where some chunk does take S = 16 (exact unless the
    decay over 8 steps is stronger than e^-80, about -10 per step), chosen with `lax.cond`;
  - o = A v + scale (q e^{Gq}) h_n,   h_{n+1} = e^{Gamma} h_n + (k e^{Gamma - G})^T v.

Kernels (matmul operands in the input dtype, accumulation and carried states in float32):
  1. `_states_kernel`, grid (B, H, K/BK, V/BV): a sequential loop over chunks carrying one
     [BK, BV] tile of the state; stores h_n (the state entering chunk n, in the input dtype)
     and returns the final state.
  2. `_output_kernel`, grid (B, H, N, V/BV), every chunk in parallel: o from A and h_n.
Backward (only the inputs are saved; kernel 1 runs again to recompute h_n):
  3. `_dstates_kernel`, grid (B, H, K/BK, V/BV), a reverse loop: stores dh_n, the gradient at
     chunk n's exit, with dh <- e^{Gamma} dh + scale (q e^{Gq})^T do; returns dh_0.
  4. `_grad_kernel`, grid (B, H, N), every chunk in parallel (a static loop over V tiles):
     dq, dk, dv and the decay-gradient pieces. It differentiates w.r.t. the chunk-local cumsums
     G (keys, chunk total) and Gq (queries); autodiff of the cumsum maps them back to g, so
     every reverse cumsum stays inside one chunk:
       dGq = q * dq,  dG = -k * dk (+ R_n on the chunk's last row),
       R_n = sum_v (e^Gamma h_n) * dh_n + sum_j k_j * dk_state_j   (per key channel).
     For scalar decay the intra-chunk part is summed from the pair matrix A * dA (rows for
     dGq, columns for dG), so that pairs inside a suffix cancel exactly instead of through two
     noisy K-dim dot products.

GPU: lowered through Pallas' Triton backend (explicit `CompilerParams`): the kernels use
general in-register arithmetic (exp, where, broadcasting, 16..64-row dots) that Triton lowers
for any shape, which the Mosaic GPU pallas_call lowering does not; the same kernels run with
`interpret=True` on CPU.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32
CLAMP = 80.0  # largest positive exponent of either side of the vector-decay sub-block trick


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tuning knobs (static). `block_k`/`block_v`: the state tile of the sequential kernels
  (1, 3); `block_v_out`: the V tile of the output and gradient kernels (2, 4). Warps and
  pipeline stages: `num_*` for kernels 2 and 4, `state_*` for kernels 1 and 3 (None: default).
  `sub`: query rows per intra-chunk sub-block for vector decay (see the module docstring);
  None: the whole chunk where that is exact, else 16."""
  chunk: int = 64
  sub: int | None = None
  block_k: int = 64
  block_v: int = 64
  block_v_out: int = 64
  num_warps: int | None = None
  num_stages: int | None = None
  state_warps: int | None = None
  state_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  kind: str          # "none" | "scalar" | "vector"
  exclusive: bool
  segments: bool
  scale: float
  chunk: int
  sub: int
  interpret: bool
  block_k: int
  block_v: int
  block_v_out: int
  out_dtype: object
  config: KernelConfig


def _next_pow2(n):
  return 1 << max(0, (int(n) - 1).bit_length())


def default_config(batch, heads, k_dim, v_dim, kind="scalar") -> KernelConfig:
  """A fixed block configuration per decay kind (no autotuning), from the H200 sweeps in
  experiments/results/kernels/linear_nvidia_h200.md."""
  del batch, heads, k_dim, v_dim
  if kind == "vector":
    return KernelConfig(num_warps=8)
  return KernelConfig(block_v_out=128, num_stages=3, state_stages=3)


def _check_config(cfg):
  if (cfg.sub or 16) > cfg.chunk:
    return f"sub ({cfg.sub or 16}) must not exceed chunk ({cfg.chunk})"
  for name in ("chunk", "sub", "block_k", "block_v", "block_v_out"):
    x = getattr(cfg, name) or 16
    if x < 16 or x & (x - 1):
      return f"{name} must be a power of two >= 16, got {x}"
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
  if _next_pow2(max(16, q.shape[-1])) > 256:
    return f"key head dim {q.shape[-1]} > 256 (state tile too large)"
  if log_decay is not None and log_decay.shape not in (q.shape[:3], q.shape):
    return f"log_decay must be [B,T,H] or [B,T,H,K], got {log_decay.shape}"
  return _check_config(config or KernelConfig())


# ----------------------------------------------------------------------------- kernel pieces

def _dot(a, b, ta=False, tb=False):
  """2-D dot with float32 accumulation; ta/tb contract over the first/last axis."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=F32)


class _Chunk:
  """Decay factors and masks of the chunk at rows [start, start + C) of the refs (start is 0
  in the parallel kernels, whose blocks are one chunk). Loads happen where a factor is used:
  [C, K] float32 tiles kept live would spill."""

  def __init__(self, st, refs, start):
    self.st, self.refs = st, refs
    self.rows = pl.ds(start, st.chunk)
    self.last = start + st.chunk - 1

  @property
  def G(self):
    """Chunk-local cumulative log decay: [C, K] (vector), [C] (scalar)."""
    g = self.refs["G"]
    return g[self.rows, :] if self.st.kind == "vector" else g[self.rows]

  def key_factor(self):
    """exp(Gamma - G) <= 1 times the key mask: [C, K] or [C, 1], or None."""
    st, refs = self.st, self.refs
    f = None
    if st.kind == "vector":
      f = jnp.exp(refs["G"][self.last, :][None, :] - self.G)
    elif st.kind == "scalar":
      f = jnp.exp(refs["G"][self.last] - self.G)[:, None]
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
    st, refs = self.st, self.refs
    if st.kind == "vector":
      h = h * jnp.exp(refs["G"][self.last, :])[:, None]
    elif st.kind == "scalar":
      h = h * jnp.exp(refs["G"][self.last])
    if st.segments:
      h = h * refs["m0"][self.last]
    return h

  def query_side(self, x, rows):
    """x[S, K] * exp(Gq) (* row mask) * scale: how query rows read the entering state."""
    st, refs = self.st, self.refs
    if st.kind == "vector":
      x = x * jnp.exp(refs["Gq"][rows, :])
    elif st.kind == "scalar":
      x = x * jnp.exp(refs["Gq"][rows])[:, None]
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
    if st.segments:
      seg = refs["seg"]
      mask = mask & (seg[self.rows][:, None] == seg[ch.rows][None, :])
    self.mask = mask
    if st.kind == "vector":
      gq = refs["Gq"][self.rows, :]                      # [S, K]
      r = refs["Gq"][index * s + s // 2 - 1, :]          # [K] reference: middle row
      self.qfac = jnp.exp(jnp.minimum(gq - r[None, :], CLAMP))     # [S, K]
      self.kfac = jnp.exp(jnp.minimum(r[None, :] - ch.G, CLAMP))   # [C, K]
    elif st.kind == "scalar":
      gq = refs["Gq"][self.rows]                         # [S]
      self.pair = jnp.exp(jnp.where(mask, gq[:, None] - ch.G[None, :], -jnp.inf))  # [S, C]

  def weigh(self, x):
    """Applies the pair decay, the mask and the scale to an [S, C] matrix of raw products."""
    st = self.ch.st
    if st.kind == "scalar":
      return x * self.pair * st.scale
    return jnp.where(self.mask, x, 0.0) * st.scale

  def factored(self, q, k):
    """(q, k) with the vector-decay factors applied (unchanged otherwise), input dtype."""
    if self.ch.st.kind != "vector":
      return q, k
    dt = k.dtype
    return ((q.astype(F32) * self.qfac).astype(dt), (k.astype(F32) * self.kfac).astype(dt))

  def scores(self, q, k):
    """A[S, C] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), masked; float32."""
    qf, kf = self.factored(q, k)
    return self.weigh(_dot(qf, kf, tb=True))


def _unpack(names, refs):
  return dict(zip(names, refs))


def _decay_names(st, query_side):
  names = []
  if st.kind != "none":
    names += ["G", "Gq"] if query_side else ["G"]
  if st.segments:
    names += ["m0", "mk"]
  return names


def _input_names(st):
  names = ["q", "k", "v"]
  if st.kind != "none":
    names += ["G", "Gq"]
  if st.segments:
    names += ["seg", "m0", "mk"]
  return names


# ----------------------------------------------------------------------------- kernels

def _states_kernel(st, *refs):
  """Forward over chunks: stores the entering state h_n of every chunk; returns the last."""
  r = _unpack(["k", "v"] + _decay_names(st, False) + ["h0", "hs", "hT"], refs)
  c = st.chunk
  dt = r["k"].dtype

  def body(n, h):
    ch = _Chunk(st, r, pl.multiple_of(n * c, c))
    r["hs"][n, :, :] = h.astype(r["hs"].dtype)
    kd = ch.kd(r["k"][ch.rows, :]).astype(dt)
    return ch.carry(h) + _dot(kd, r["v"][ch.rows, :], ta=True)

  r["hT"][...] = lax.fori_loop(0, r["k"].shape[0] // c, body, r["h0"][...].astype(F32))


def _dstates_kernel(st, *refs):
  """Reverse over chunks: stores the state gradient at every chunk's exit; returns dh_0."""
  r = _unpack(["q", "do"] + _decay_names(st, True) + ["dhT", "dhs", "dh0"], refs)
  c = st.chunk
  dt = r["q"].dtype
  n_chunks = r["q"].shape[0] // c

  def body(i, dh):
    n = n_chunks - 1 - i
    ch = _Chunk(st, r, pl.multiple_of(n * c, c))
    r["dhs"][n, :, :] = dh.astype(r["dhs"].dtype)
    qs = ch.query_side(r["q"][ch.rows, :].astype(F32), ch.rows).astype(dt)
    return ch.carry(dh) + _dot(qs, r["do"][ch.rows, :], ta=True)

  r["dh0"][...] = lax.fori_loop(0, n_chunks, body, r["dhT"][...].astype(F32))


def _output_kernel(st, *refs):
  """One chunk and V tile: o = A v + scale (q e^{Gq}) h_n."""
  r = _unpack(_input_names(st) + ["hs", "o"], refs)
  ch = _Chunk(st, r, 0)
  dt = r["q"].dtype
  k, v, h = r["k"][...], r["v"][...], r["hs"][...].astype(dt)
  for index in range(st.chunk // st.sub):
    rows = _Rows(ch, index)
    q = r["q"][rows.rows, :]
    o = _dot(rows.scores(q, k).astype(dt), v)
    o = o + _dot(ch.query_side(q.astype(F32), rows.rows).astype(dt), h)
    r["o"][rows.rows, :] = o.astype(r["o"].dtype)


def _grad_kernel(st, *refs):
  """One chunk, all V tiles: dq, dk, dv; R_n; for scalar decay the pair sums of A * dA (rows
  and columns) and q . dq_state (how the rows' reading of h_n depends on Gq)."""
  names = _input_names(st) + ["do", "hs", "dhs", "dq", "dk", "dv"]
  names += (["R"] if st.kind != "none" else []) + (
      ["rowm", "colm", "qdq"] if st.kind == "scalar" else [])
  r = _unpack(names, refs)
  c, bv = st.chunk, st.block_v_out
  dt = r["q"].dtype
  k = r["k"][...]
  tiles = [pl.ds(j * bv, bv) for j in range(r["v"].shape[1] // bv)]
  # the state's part: dv = (k e^{Gamma-G}) dh, dk = (v dh^T) e^{Gamma-G}, and R_n
  ch = _Chunk(st, r, 0)
  kd = ch.kd(k).astype(dt)
  dvs, dk, r_state = [], None, None
  for tile in tiles:
    dh = r["dhs"][:, tile]
    dvs.append(_dot(kd, dh))                                           # [C, BV]
    term = _dot(r["v"][:, tile], dh, tb=True)                          # [C, K]
    dk = term if dk is None else dk + term
    if st.kind != "none":
      hd = jnp.sum(ch.carry(r["hs"][:, tile].astype(F32)) * dh.astype(F32), axis=1)
      r_state = hd if r_state is None else r_state + hd
  f = ch.key_factor()
  if f is not None:
    dk = dk * f
  if st.kind != "none":
    u = k.astype(F32) * dk                                             # [C, K]
    r["R"][...] = r_state + jnp.sum(u, axis=0)
    if st.kind == "scalar":
      colm = jnp.sum(u, axis=1)                                        # k . dk_state  [C]
  # the intra-chunk part, per sub-block of query rows
  for index in range(c // st.sub):
    rows = _Rows(ch, index)
    q = r["q"][rows.rows, :]
    qf, kf = rows.factored(q, k)
    a32 = rows.weigh(_dot(qf, kf, tb=True))                            # [S, C]
    a = a32.astype(dt)
    ds_raw = dq_state = None
    for j, tile in enumerate(tiles):
      do = r["do"][rows.rows, tile]
      dvs[j] = dvs[j] + _dot(a, do, ta=True)
      x = _dot(do, r["v"][:, tile], tb=True)                           # [S, C]
      y = _dot(do, r["hs"][:, tile].astype(dt), tb=True)               # [S, K]
      ds_raw = x if ds_raw is None else ds_raw + x
      dq_state = y if dq_state is None else dq_state + y
    dq_state = ch.query_side(dq_state, rows.rows)
    ds = rows.weigh(ds_raw).astype(dt)
    dq = _dot(ds, kf)
    dk_intra = _dot(ds, qf, ta=True)
    if st.kind == "vector":
      dq = dq * rows.qfac
      dk_intra = dk_intra * rows.kfac
    dk = dk + dk_intra
    if st.kind == "scalar":
      m = a32 * ds_raw                                       # dL/d(log pair weight)
      r["rowm"][rows.rows] = jnp.sum(m, axis=1)
      colm = colm + jnp.sum(m, axis=0)
      r["qdq"][rows.rows] = jnp.sum(q.astype(F32) * dq_state, axis=1)
    r["dq"][rows.rows, :] = (dq + dq_state).astype(r["dq"].dtype)
  if st.kind == "scalar":
    r["colm"][...] = colm
  r["dk"][...] = dk.astype(r["dk"].dtype)
  for tile, dv in zip(tiles, dvs):
    r["dv"][:, tile] = dv.astype(r["dv"].dtype)


# ----------------------------------------------------------------------------- pallas_call glue

class _Specs:
  """BlockSpecs of the sequential grid (b, h, K tile, V tile) and of the chunk grid
  (b, h, n[, V tile])."""

  def __init__(self, st, t, k_dim, v_dim):
    self.st, self.t, self.k, self.v = st, t, k_dim, v_dim
    self.n = t // st.chunk

  # sequential kernels: whole sequences of one K or V tile
  def seq(self, name):
    st, t, bk, bv = self.st, self.t, self.st.block_k, self.st.block_v
    if name in ("q", "k") or (name in ("G", "Gq") and st.kind == "vector"):
      return pl.BlockSpec((None, t, None, bk), lambda b, h, i, j: (b, 0, h, i))
    if name in ("v", "do"):
      return pl.BlockSpec((None, t, None, bv), lambda b, h, i, j: (b, 0, h, j))
    if name in ("G", "Gq"):
      return pl.BlockSpec((None, t, None), lambda b, h, i, j: (b, 0, h))
    if name in ("m0", "mk"):
      return pl.BlockSpec((None, t), lambda b, h, i, j: (b, 0))
    if name == "state":
      return pl.BlockSpec((None, None, bk, bv), lambda b, h, i, j: (b, h, i, j))
    assert name == "states", name
    return pl.BlockSpec((None, None, self.n, bk, bv), lambda b, h, i, j: (b, h, 0, i, j))

  # chunk kernels: one chunk, all of K, one V tile (output) or all of V (grads)
  def chunk(self, name, v_tiled):
    c, kd = self.st.chunk, self.k
    vw = self.st.block_v_out if v_tiled else self.v
    if v_tiled:
      idx = lambda f: (lambda b, h, n, j: f(b, h, n, j))
    else:
      idx = lambda f: (lambda b, h, n: f(b, h, n, 0))
    if name in ("q", "k", "dq", "dk") or (name in ("G", "Gq") and self.st.kind == "vector"):
      return pl.BlockSpec((None, c, None, kd), idx(lambda b, h, n, j: (b, n, h, 0)))
    if name in ("v", "do", "o", "dv"):
      return pl.BlockSpec((None, c, None, vw), idx(lambda b, h, n, j: (b, n, h, j)))
    if name in ("G", "Gq", "rowm", "colm", "qdq"):
      return pl.BlockSpec((None, c, None), idx(lambda b, h, n, j: (b, n, h)))
    if name in ("seg", "m0", "mk"):
      return pl.BlockSpec((None, c), idx(lambda b, h, n, j: (b, n)))
    if name == "R":
      return pl.BlockSpec((None, None, None, kd), idx(lambda b, h, n, j: (b, h, n, 0)))
    assert name == "states", name
    return pl.BlockSpec((None, None, None, kd, vw), idx(lambda b, h, n, j: (b, h, n, 0, j)))


def _call(st, kernel, grid, in_specs, out_specs, out_shape, args, sequential):
  kwargs = {}
  if st.interpret:
    kwargs["interpret"] = True
  else:
    from jax.experimental.pallas import triton as pltriton
    cfg = st.config
    if sequential:
      warps, stages = cfg.state_warps or 4, cfg.state_stages or 2
    else:
      warps, stages = cfg.num_warps or 4, cfg.num_stages or 2
    kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=warps, num_stages=stages)
  return pl.pallas_call(
      functools.partial(kernel, st), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, name=kernel.__name__.strip("_"), **kwargs)(*args)


def _arrays(names, arrays):
  return [arrays[n] for n in names]


def _states(st, a):
  """Kernel 1: (h_n for every chunk [B,H,N,K,V] in the input dtype, final state f32)."""
  b, t, h, k_dim = a["k"].shape
  v_dim = a["v"].shape[-1]
  sp = _Specs(st, t, k_dim, v_dim)
  names = ["k", "v"] + _decay_names(st, False)
  return _call(st, _states_kernel, (b, h, k_dim // st.block_k, v_dim // st.block_v),
               [sp.seq(n) for n in names] + [sp.seq("state")],
               [sp.seq("states"), sp.seq("state")],
               [jax.ShapeDtypeStruct((b, h, sp.n, k_dim, v_dim), a["k"].dtype),
                jax.ShapeDtypeStruct((b, h, k_dim, v_dim), F32)],
               _arrays(names, a) + [a["h0"]], sequential=True)


def _forward(st, a):
  hs, hT = _states(st, a)
  b, t, h, k_dim = a["q"].shape
  v_dim = a["v"].shape[-1]
  sp = _Specs(st, t, k_dim, v_dim)
  names = _input_names(st)
  o = _call(st, _output_kernel, (b, h, sp.n, v_dim // st.block_v_out),
            [sp.chunk(n, True) for n in names] + [sp.chunk("states", True)],
            sp.chunk("o", True),
            jax.ShapeDtypeStruct(a["v"].shape, st.out_dtype or a["v"].dtype),
            _arrays(names, a) + [hs], sequential=False)
  return o, hT


def _backward(st, a, do, dhT):
  """Gradients w.r.t. q, k, v, the chunk-local cumsums G and Gq, and h0."""
  q, k = a["q"], a["k"]
  b, t, h, k_dim = q.shape
  v_dim = a["v"].shape[-1]
  sp = _Specs(st, t, k_dim, v_dim)
  hs, _ = _states(st, a)
  names = ["q", "do"] + _decay_names(st, True)
  dhs, dh0 = _call(st, _dstates_kernel, (b, h, k_dim // st.block_k, v_dim // st.block_v),
                   [sp.seq(n) for n in names] + [sp.seq("state")],
                   [sp.seq("states"), sp.seq("state")],
                   [jax.ShapeDtypeStruct(hs.shape, hs.dtype),
                    jax.ShapeDtypeStruct((b, h, k_dim, v_dim), F32)],
                   _arrays(names, dict(a, do=do)) + [dhT], sequential=True)
  names = _input_names(st)
  kdt = F32 if st.kind == "vector" else q.dtype   # dGq = q dq, dG = -k dk need float32
  outs = ["dq", "dk", "dv"] + (["R"] if st.kind != "none" else [])
  out_shape = [jax.ShapeDtypeStruct(q.shape, kdt), jax.ShapeDtypeStruct(k.shape, kdt),
               jax.ShapeDtypeStruct(a["v"].shape, a["v"].dtype)]
  if st.kind != "none":
    out_shape.append(jax.ShapeDtypeStruct((b, h, sp.n, k_dim), F32))
  if st.kind == "scalar":
    outs += ["rowm", "colm", "qdq"]
    out_shape += [jax.ShapeDtypeStruct((b, t, h), F32)] * 3
  res = _call(st, _grad_kernel, (b, h, sp.n),
              [sp.chunk(n, False) for n in names + ["do", "states", "states"]],
              [sp.chunk(n, False) for n in outs], out_shape,
              _arrays(names, a) + [do, hs, dhs], sequential=False)
  dq, dk, dv = res[:3]
  dG = dGq = None
  if st.kind != "none":
    # R_n sits on the chunk's last row of dG
    R = res[3].transpose(0, 2, 1, 3)                                   # [B,N,H,K]
    last = jnp.zeros((b, sp.n, st.chunk, h, k_dim), F32).at[:, :, -1].set(R)
    last = last.reshape(b, t, h, k_dim)
    if st.kind == "scalar":
      rowm, colm, qdq = res[4:]
      dGq = rowm + qdq
      dG = jnp.sum(last, axis=-1) - colm
    else:
      dGq = q.astype(F32) * dq
      dG = last - k.astype(F32) * dk
  return dq.astype(q.dtype), dk.astype(k.dtype), dv, dG, dGq, dh0


_ARGS = ("q", "k", "v", "G", "Gq", "h0", "seg", "m0", "mk")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, q, k, v, G, Gq, h0, seg, m0, mk):
  return _forward(st, dict(zip(_ARGS, (q, k, v, G, Gq, h0, seg, m0, mk))))


def _core_fwd(st, *args):
  return _forward(st, dict(zip(_ARGS, args))), args


def _core_bwd(st, args, cts):
  do, dhT = cts
  a = dict(zip(_ARGS, args))
  dq, dk, dv, dG, dGq, dh0 = _backward(st, a, do.astype(a["v"].dtype), dhT.astype(F32))
  return dq, dk, dv, dG, dGq, dh0.astype(a["h0"].dtype), None, None, None


_core.defvjp(_core_fwd, _core_bwd)


def _canonical_segments(segment_ids):
  """Segment index that increases by one at every change of id (0 at the first token)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                          jnp.cumsum(change.astype(jnp.int32), axis=1)], axis=1)


def _prepare(q, k, v, log_decay, *, scale, bonus, initial_state, segment_ids, config,
             interpret, out_dtype):
  """The static description and the padded kernel inputs (a dict keyed by _ARGS): T padded to
  whole chunks, K to a power of two, V to whole tiles; chunk-local cumulative decays G, Gq;
  segment masks."""
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  cfg = config or default_config(b, h, k_dim, v_dim, kind)
  c = cfg.chunk
  tp = -(-t // c) * c
  kp = _next_pow2(max(16, k_dim))
  bk = min(cfg.block_k, kp)
  vw = _next_pow2(max(16, v_dim))
  bv, bvo = min(cfg.block_v, vw), min(cfg.block_v_out, vw)
  while max(bv, bvo) > 16 and -(-v_dim // max(bv, bvo)) * max(bv, bvo) > 1.5 * v_dim:
    bv, bvo = min(bv, max(bv, bvo) // 2), min(bvo, max(bv, bvo) // 2)  # V=129: tiles of 64
  vp = -(-v_dim // max(bv, bvo)) * max(bv, bvo)
  st = _Static(kind=kind, exclusive=bonus is not None, segments=segment_ids is not None,
               scale=float(scale), chunk=c, sub=(cfg.sub or c) if kind == "vector" else c,
               interpret=bool(interpret), block_k=bk, block_v=bv, block_v_out=bvo,
               out_dtype=out_dtype, config=cfg)

  def pad(x, width):
    cfgpad = [(0, 0), (0, tp - t), (0, 0)] + ([(0, width - x.shape[-1])] if x.ndim == 4 else [])
    return jnp.pad(x, cfgpad)

  qp, kpd, vpd = pad(q, kp), pad(k, kp), pad(v, vp)
  g = None if log_decay is None else pad(log_decay.astype(F32), kp)
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
  G = Gq = None
  if g is not None:  # chunk-local cumulative log decay (autodiff maps dG, dGq back to g)
    gg = g.reshape(b, tp // c, c, *g.shape[2:])
    G = jnp.cumsum(gg, axis=2).reshape(g.shape)
    Gq = G - g if bonus is not None else G
  return st, dict(zip(_ARGS, (qp, kpd, vpd, G, Gq, h0, seg, m0, mk)))


def linear_attention(q, k, v, log_decay=None, *, scale, bonus=None, initial_state=None,
                     segment_ids=None, config: KernelConfig | None = None, interpret=False,
                     out_dtype=None):
  """Decayed linear attention; returns (o[B,T,H,V] in v's dtype, final_state[B,H,K,V] f32).

  log_decay: None | [B,T,H] | [B,T,H,K] float, <= 0. bonus: None or u[H,K]; when given the
  readout is RWKV-6's, o_t = scale (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t).
  initial_state: [B,H,K,V] float32 (zeros when None). segment_ids: [B,T] int; the state is
  reset to zero where the id changes. T, K and V need no particular size (padded here).
  out_dtype: dtype of o (default v's).
  """
  why = reason(q, k, v, log_decay, scale=scale, bonus=bonus, initial_state=initial_state,
               segment_ids=segment_ids, config=config)
  if why is not None:
    raise NotImplementedError(f"pallas linear_attention: {why}")
  st, a = _prepare(q, k, v, log_decay, scale=scale, bonus=bonus, initial_state=initial_state,
                   segment_ids=segment_ids, config=config, interpret=interpret,
                   out_dtype=out_dtype)
  args = tuple(a[n] for n in _ARGS)
  b, t, h, k_dim = q.shape
  c, kp = st.chunk, a["q"].shape[-1]
  if st.kind == "vector" and st.config.sub is None and c > 16:
    # one sub-block per chunk is exact when no chunk decays by more than e^-CLAMP
    exact = jnp.min(a["G"].reshape(b, -1, c, h, kp)[:, :, -1]) >= -CLAMP
    narrow = dataclasses.replace(st, sub=16)
    o, hT = lax.cond(exact, functools.partial(_core, st), functools.partial(_core, narrow), *args)
  else:
    o, hT = _core(st, *args)
  v_dim = v.shape[-1]
  o = o[:, :t, :, :v_dim]
  hT = hT[:, :, :k_dim, :v_dim]
  if bonus is not None:
    beta = jnp.einsum("bthk,hk,bthk->bth", q.astype(F32), bonus.astype(F32), k.astype(F32))
    o = (o.astype(F32) + scale * beta[..., None] * v.astype(F32)).astype(o.dtype)
  return o, hT
