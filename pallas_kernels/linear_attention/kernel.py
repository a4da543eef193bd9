"""Chunked decayed linear attention in Pallas: forward and backward kernels with a custom VJP.

Recurrence (layout BTHD; state [K, V] per batch and head, float32):

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t,  log a_t = g_t <= 0
  exclusive (RWKV-6 readout): o_t = scale * S_{t-1}^T q_t   (the state before step t)

`g` is None (no decay), [B,T,H] (one decay per head and step) or [B,T,H,K] (per key channel).
Segment ids [B,T] reset the state to zero wherever the id changes (packed sequences).

Algorithm (one program per (batch, head, V-block); a sequential `fori_loop` over chunks of C
tokens carries the float32 state h[K, BV] in registers):
  G = chunk-local cumsum of g (float32, computed outside the kernel), Gq = G (or G - g when
  exclusive), Gamma = G at the chunk's last row. Every exponent is <= 0:
  - intra-chunk scores A[i, j] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), j <= i (j < i),
    masked with `where`. Scalar decay: (q k^T) * exp(Gq_i - G_j). Vector decay: per 16-row
    sub-block I with reference r = Gq at its middle row, A_I = (q_I e^{Gq_I - r}) (k e^{r - G})^T;
    both exponents are clamped at 80, so the result is exact unless the decay over the 8 steps
    on either side of the reference is stronger than e^-80 (about -10 per step); the keys of
    earlier sub-blocks always have r - G <= 0;
  - o = A v + scale (q e^{Gq}) h,   h <- e^{Gamma} h + (k e^{Gamma - G})^T v.
Matmul operands are in the input dtype (tensor cores), accumulation and state in float32.

Backward: two sweeps that recompute the states (only the inputs are saved by the forward):
  a forward sweep (h) gives dq and writes the state after every chunk (float32, T/C x K x V per
  head: linear in T); a reverse sweep (dh, from the final-state cotangent) gives dk, dv, dh0.
  With several V-blocks dq and dk are partial sums, added outside. The kernel differentiates
  w.r.t. the chunk-local cumsums G (keys, chunk total) and Gq (queries); autodiff of the cumsum
  maps them back to g, so every reverse cumsum stays inside one chunk:
    dGq = q * dq,  dG = -k * dk (+ d/dGamma on the chunk's last row),
    d/dGamma = sum_v (e^Gamma h_n) * dh_{n+1} + sum_j k_j * dk_state_j,
  per key channel (vector decay); the forward sweep stores the entering states h_n. For scalar decay the intra-chunk part is summed from the pair
  matrix A * dA (rows for dGq, columns for dG) so that pairs inside a suffix cancel exactly
  instead of through two noisy K-dim dot products.

GPU: lowered through Pallas' Triton backend (explicit `CompilerParams`): the kernels use
general in-register arithmetic (exp, where, broadcasting, 16..64-row dots) that Triton lowers
for any shape, which the Mosaic GPU pallas_call lowering does not; the same kernel runs with
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
SUB = 16      # rows per intra-chunk sub-block for vector decay


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Tuning knobs (static): chunk length, V-block width, Triton warps and pipeline stages."""
  chunk: int = 64
  block_v: int = 64
  num_warps: int | None = None
  num_stages: int | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
  kind: str          # "none" | "scalar" | "vector"
  exclusive: bool
  segments: bool
  scale: float
  chunk: int
  sub: int
  interpret: bool
  block_v: int
  out_dtype: object
  num_warps: int | None
  num_stages: int | None


def _next_pow2(n):
  return 1 << max(0, (int(n) - 1).bit_length())


def default_config(batch, heads, k_dim, v_dim, kind="scalar") -> KernelConfig:
  """A fixed block configuration per shape class (no autotuning), from the H200 sweeps in
  experiments/results/kernels/linear_nvidia_h200.md."""
  vp = _next_pow2(v_dim)
  if kind == "vector":
    # chunk 64 with 4 sub-blocks overflows shared memory (Triton pipelining buffers) and
    # spills; chunk 32 (two 16-row sub-blocks) ran 1.5-2x faster than 64 and beat chunk 16
    return KernelConfig(chunk=32, block_v=min(64, max(16, vp)), num_warps=8, num_stages=2)
  block_v = min(64, max(16, vp))
  # small batch*heads: narrower V-blocks give more programs to fill the SMs
  if batch * heads * max(1, vp // block_v) < 64 and block_v > 32:
    block_v = 32
  return KernelConfig(chunk=64, block_v=block_v)


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
  cfg = config or KernelConfig()
  if cfg.chunk < 16 or cfg.chunk & (cfg.chunk - 1) or cfg.block_v < 16 or cfg.block_v & (cfg.block_v - 1):
    return f"chunk and block_v must be powers of two >= 16, got {cfg}"
  if log_decay is not None and log_decay.shape not in (q.shape[:3], q.shape):
    return f"log_decay must be [B,T,H] or [B,T,H,K], got {log_decay.shape}"
  return None


# ----------------------------------------------------------------------------- kernel pieces

def _dot(a, b, ta=False, tb=False):
  """2-D dot with float32 accumulation; ta/tb contract over the first/last axis."""
  dims = (((0 if ta else 1,), (1 if tb else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, preferred_element_type=F32)


class _Chunk:
  """Loads of one chunk's shared quantities (all rows)."""

  def __init__(self, st, refs, start, dt):
    c = st.chunk
    self.st, self.refs, self.start, self.dt = st, refs, start, dt
    self.rows = rows = pl.ds(start, c)
    self.last = last = start + c - 1
    self.k = refs["k"][rows, :]
    self.v = refs["v"][rows, :]
    if st.kind == "vector":
      self.state_decay = jnp.exp(refs["G"][last, :])[:, None]     # [K, 1]
    elif st.kind == "scalar":
      self.state_decay = jnp.exp(refs["G"][last])                 # scalar
    else:
      self.state_decay = None
    if st.segments:
      self.seg = refs["seg"][rows]                     # [C] int32
      self.mk = refs["mk"][rows][:, None]              # [C, 1] key feeds the end state
      self.passes = refs["m0"][last]                   # scalar: state crosses the chunk
    else:
      self.seg = self.mk = self.passes = None

  # Decay factors are (re)loaded where they are used rather than kept live across the
  # sub-block loop: [C, K] float32 tiles held in registers would spill.
  @property
  def G(self):
    if self.st.kind == "vector":
      return self.refs["G"][self.rows, :]              # [C, K]
    if self.st.kind == "scalar":
      return self.refs["G"][self.rows]                 # [C]
    return None

  @property
  def kdecay(self):
    """exp(Gamma - G) <= 1: [C, K] (vector), [C, 1] (scalar) or None."""
    if self.st.kind == "vector":
      return jnp.exp(self.refs["G"][self.last, :][None, :] - self.G)
    if self.st.kind == "scalar":
      return jnp.exp(self.refs["G"][self.last] - self.G)[:, None]
    return None

  def kd(self):
    """k * exp(Gamma - G) (* key mask), in float32: the keys as seen from the chunk end."""
    kd = self.k.astype(F32)
    if self.kdecay is not None:
      kd = kd * self.kdecay
    if self.mk is not None:
      kd = kd * self.mk
    return kd

  def carry(self, h):
    """h * exp(Gamma) (* crossing mask)."""
    if self.state_decay is not None:
      h = h * self.state_decay
    if self.passes is not None:
      h = h * self.passes
    return h


class _Rows:
  """One sub-block of S query rows of a chunk, with its masks and decay factors."""

  def __init__(self, ch: _Chunk, index):
    st, refs = ch.st, ch.refs
    s, c = st.sub, st.chunk
    self.ch = ch
    self.rows = pl.ds(ch.start + index * s, s)
    i = index * s + lax.broadcasted_iota(jnp.int32, (s, c), 0)
    j = lax.broadcasted_iota(jnp.int32, (s, c), 1)
    mask = j < i if st.exclusive else j <= i
    if st.segments:
      seg_rows = refs["seg"][self.rows]
      mask = mask & (seg_rows[:, None] == ch.seg[None, :])
      self.m0 = refs["m0"][self.rows][:, None]           # [S, 1] row sees the entering state
    else:
      self.m0 = None
    self.mask = mask
    if st.kind == "vector":
      gq = refs["Gq"][self.rows, :]                      # [S, K]
      r = refs["Gq"][ch.start + index * s + s // 2 - 1, :]  # [K] reference: middle row
      self.qdecay_r = jnp.exp(jnp.minimum(gq - r[None, :], CLAMP))   # [S, K]
      self.kfac = jnp.exp(jnp.minimum(r[None, :] - ch.G, CLAMP))     # [C, K]
      self.qdecay = jnp.exp(gq)                          # [S, K] <= 1
    elif st.kind == "scalar":
      gq = refs["Gq"][self.rows]                         # [S]
      self.pair = jnp.exp(jnp.where(mask, gq[:, None] - ch.G[None, :], -jnp.inf))  # [S, C]
      self.qdecay = jnp.exp(gq)[:, None]                 # [S, 1]
    else:
      self.qdecay = None

  def weigh(self, x):
    """Applies the pair decay, the mask and the scale to an [S, C] matrix of raw products."""
    st = self.ch.st
    if st.kind == "scalar":
      return x * self.pair * st.scale
    return jnp.where(self.mask, x, 0.0) * st.scale

  def scores(self, q):
    """A[S, C] = scale * sum_k q_ik k_jk exp(Gq_ik - G_jk), masked; float32."""
    ch = self.ch
    if ch.st.kind == "vector":
      qf = (q.astype(F32) * self.qdecay_r).astype(ch.dt)
      kf = (ch.k.astype(F32) * self.kfac).astype(ch.dt)
      return self.weigh(_dot(qf, kf, tb=True))
    return self.weigh(_dot(q, ch.k, tb=True))

  def state_side(self, x):
    """x[S, K] * exp(Gq) (* row mask) * scale: how query rows read the entering state."""
    if self.qdecay is not None:
      x = x * self.qdecay
    if self.m0 is not None:
      x = x * self.m0
    return x * self.ch.st.scale


def _unpack(names, refs):
  return dict(zip(names, refs))


def _input_names(st):
  names = ["q", "k", "v"]
  if st.kind != "none":
    names += ["G", "Gq"]
  if st.segments:
    names += ["seg", "m0", "mk"]
  return names


# ----------------------------------------------------------------------------- kernels

def _fwd_kernel(st, *refs):
  names = _input_names(st) + ["h0", "o", "hT"]
  r = _unpack(names, refs)
  c, s = st.chunk, st.sub
  dt = r["q"].dtype
  n_chunks = r["q"].shape[0] // c

  def body(n, h):
    ch = _Chunk(st, r, pl.multiple_of(n * c, c), dt)
    hd = h.astype(dt)
    for index in range(c // s):
      rows = _Rows(ch, index)
      q = r["q"][rows.rows, :]
      a = rows.scores(q)
      o = _dot(a.astype(dt), ch.v)
      qs = rows.state_side(q.astype(F32)).astype(dt)
      o = o + _dot(qs, hd)
      r["o"][rows.rows, :] = o.astype(r["o"].dtype)
    return ch.carry(h) + _dot(ch.kd().astype(dt), ch.v, ta=True)

  h = lax.fori_loop(0, n_chunks, body, r["h0"][...].astype(F32))
  r["hT"][...] = h


def _bwd_dq_kernel(st, *refs):
  """Forward sweep: dq (partial over V-blocks), the state entering every chunk, and for scalar
  decay q.dq_inter (how the query rows' reading of the entering state depends on Gq)."""
  names = _input_names(st) + ["h0", "do", "dq", "hs"] + (["qdq"] if st.kind == "scalar" else [])
  r = _unpack(names, refs)
  c, s = st.chunk, st.sub
  dt = r["k"].dtype
  n_chunks = r["k"].shape[0] // c

  def body(n, h):
    ch = _Chunk(st, r, pl.multiple_of(n * c, c), dt)
    hd = h.astype(dt)
    for index in range(c // s):
      rows = _Rows(ch, index)
      do = r["do"][rows.rows, :]
      ds = rows.weigh(_dot(do, ch.v, tb=True))              # [S, C]
      if st.kind == "vector":
        kf = (ch.k.astype(F32) * rows.kfac).astype(dt)
        dq = _dot(ds.astype(dt), kf) * rows.qdecay_r
      else:
        dq = _dot(ds.astype(dt), ch.k)
      dq_inter = rows.state_side(_dot(do, hd, tb=True))     # [S, K]
      if st.kind == "scalar":
        q = r["q"][rows.rows, :]
        r["qdq"][rows.rows] = jnp.sum(q.astype(F32) * dq_inter, axis=1)
      r["dq"][rows.rows, :] = dq + dq_inter
    r["hs"][n, :, :] = h                                    # the state entering chunk n
    return ch.carry(h) + _dot(ch.kd().astype(dt), ch.v, ta=True)

  lax.fori_loop(0, n_chunks, body, r["h0"][...].astype(F32))


def _bwd_dkv_kernel(st, *refs):
  """Reverse sweep: dk (partial), dv, dh0, R_n (the gradient w.r.t. the chunk's total log
  decay), and for scalar decay the intra-chunk pair sums of A * dA."""
  names = _input_names(st) + ["do", "dhT", "hs", "dk", "dv", "dh0", "R"]
  if st.kind == "scalar":
    names += ["rowm", "colm"]
  r = _unpack(names, refs)
  c, s = st.chunk, st.sub
  dt = r["k"].dtype
  n_chunks = r["k"].shape[0] // c
  k_dim, bv = r["k"].shape[1], r["v"].shape[1]

  def body(i, dh):
    n = n_chunks - 1 - i
    ch = _Chunk(st, r, pl.multiple_of(n * c, c), dt)
    dhd = dh.astype(dt)
    kd = ch.kd()
    dv = _dot(kd.astype(dt), dhd)                           # [C, BV]
    dk = _dot(ch.v, dhd, tb=True)                           # [C, K]
    if ch.kdecay is not None:
      dk = dk * ch.kdecay
    if ch.mk is not None:
      dk = dk * ch.mk
    if st.kind != "none":
      # d/dGamma: the carried state's term plus, exactly, the keys' state-update terms that
      # dG takes back out (so they cancel inside the chunk's reverse cumsum)
      u = ch.k.astype(F32) * dk                             # [C, K]
      r["R"][n, :] = (jnp.sum(ch.carry(r["hs"][n, :, :]) * dh, axis=1)
                      + jnp.sum(u, axis=0))
    if st.kind == "scalar":
      colm = jnp.sum(u, axis=1)                             # k . dk_state  [C]
    dh_in = jnp.zeros((k_dim, bv), F32)
    for index in range(c // s):
      rows = _Rows(ch, index)
      q = r["q"][rows.rows, :]
      do = r["do"][rows.rows, :]
      a = rows.scores(q)                                    # [S, C]
      dv = dv + _dot(a.astype(dt), do, ta=True)
      ds_raw = _dot(do, ch.v, tb=True)                      # [S, C]
      ds = rows.weigh(ds_raw)
      if st.kind == "scalar":
        m = a * ds_raw                                      # dL/d(log pair weight)
        r["rowm"][rows.rows] = jnp.sum(m, axis=1)
        colm = colm + jnp.sum(m, axis=0)
      if st.kind == "vector":
        qf = (q.astype(F32) * rows.qdecay_r).astype(dt)
        dk = dk + _dot(ds.astype(dt), qf, ta=True) * rows.kfac
      else:
        dk = dk + _dot(ds.astype(dt), q, ta=True)
      qs = rows.state_side(q.astype(F32)).astype(dt)
      dh_in = dh_in + _dot(qs, do, ta=True)                 # [K, BV]
    if st.kind == "scalar":
      r["colm"][pl.ds(ch.start, c)] = colm
    r["dk"][pl.ds(ch.start, c), :] = dk
    r["dv"][pl.ds(ch.start, c), :] = dv.astype(r["dv"].dtype)
    return ch.carry(dh) + dh_in

  dh = lax.fori_loop(0, n_chunks, body, r["dhT"][...].astype(F32))
  r["dh0"][...] = dh


# ----------------------------------------------------------------------------- pallas_call glue

def _specs(st, t, k_dim, bv):
  """BlockSpecs; grid = (B, H, NV)."""
  n = t // st.chunk
  tok_k = pl.BlockSpec((None, t, None, k_dim), lambda b, h, j: (b, 0, h, 0))
  tok_v = pl.BlockSpec((None, t, None, bv), lambda b, h, j: (b, 0, h, j))
  specs = {"q": tok_k, "k": tok_k, "v": tok_v}
  if st.kind == "vector":
    specs["G"] = specs["Gq"] = tok_k
  elif st.kind == "scalar":
    specs["G"] = specs["Gq"] = pl.BlockSpec((None, t, None), lambda b, h, j: (b, 0, h))
  if st.segments:
    specs["seg"] = specs["m0"] = specs["mk"] = pl.BlockSpec((None, t), lambda b, h, j: (b, 0))
  specs["state"] = pl.BlockSpec((None, None, k_dim, bv), lambda b, h, j: (b, h, 0, j))
  specs["do"] = tok_v
  specs["part_k"] = pl.BlockSpec((None, None, t, None, k_dim), lambda b, h, j: (j, b, 0, h, 0))
  specs["part_tok"] = pl.BlockSpec((None, None, t, None), lambda b, h, j: (j, b, 0, h))
  specs["hs"] = pl.BlockSpec((None, None, n, k_dim, bv), lambda b, h, j: (b, h, 0, 0, j))
  specs["R"] = pl.BlockSpec((None, None, None, n, k_dim), lambda b, h, j: (j, b, h, 0, 0))
  return specs


def _call(st, kernel, grid, in_specs, out_specs, out_shape, args, num_warps_default,
          num_stages_default=2):
  kwargs = {}
  if st.interpret:
    kwargs["interpret"] = True
  else:
    from jax.experimental.pallas import triton as pltriton
    kwargs["compiler_params"] = pltriton.CompilerParams(
        num_warps=st.num_warps or num_warps_default,
        num_stages=st.num_stages or num_stages_default)
  return pl.pallas_call(
      functools.partial(kernel, st), grid=grid, in_specs=in_specs, out_specs=out_specs,
      out_shape=out_shape, **kwargs)(*args)


def _inputs(st, q, k, v, G, Gq, seg, m0, mk):
  args = [q, k, v]
  if st.kind != "none":
    args += [G, Gq]
  if st.segments:
    args += [seg, m0, mk]
  return args


def _forward(st, q, k, v, G, Gq, h0, seg, m0, mk):
  b, t, h, k_dim = q.shape
  vp = v.shape[-1]
  bv = st.block_v
  sp = _specs(st, t, k_dim, bv)
  names = _input_names(st)
  in_specs = [sp[n] for n in names] + [sp["state"]]
  out_specs = [sp["v"], sp["state"]]
  out_shape = [jax.ShapeDtypeStruct(v.shape, st.out_dtype or v.dtype),
               jax.ShapeDtypeStruct((b, h, k_dim, vp), F32)]
  o, hT = _call(st, _fwd_kernel, (b, h, vp // bv), in_specs, out_specs, out_shape,
                _inputs(st, q, k, v, G, Gq, seg, m0, mk) + [h0],
                4 if st.kind != "vector" else 8, 3 if st.kind != "vector" else 2)
  return o, hT


def _bwd_defaults(st):
  """(num_warps, num_stages) of the backward kernels (H200 sweep: 4/3 scalar, 8/2 vector)."""
  return (8, 2) if st.kind == "vector" else (4, 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, q, k, v, G, Gq, h0, seg, m0, mk):
  return _forward(st, q, k, v, G, Gq, h0, seg, m0, mk)


def _core_fwd(st, q, k, v, G, Gq, h0, seg, m0, mk):
  o, hT = _forward(st, q, k, v, G, Gq, h0, seg, m0, mk)
  return (o, hT), (q, k, v, G, Gq, h0, seg, m0, mk)


def _core_bwd(st, res, cts):
  """Gradients w.r.t. q, k, v, the chunk-local cumsums G and Gq, and h0."""
  q, k, v, G, Gq, h0, seg, m0, mk = res
  do, dhT = cts
  b, t, h, k_dim = q.shape
  vp = v.shape[-1]
  bv = st.block_v
  nv = vp // bv
  n = t // st.chunk
  sp = _specs(st, t, k_dim, bv)
  names = _input_names(st)
  ins = _inputs(st, q, k, v, G, Gq, seg, m0, mk)
  do = do.astype(v.dtype)
  dhT = dhT.astype(F32)
  scalar = st.kind == "scalar"
  part_k = jax.ShapeDtypeStruct((nv, b, t, h, k_dim), F32)
  part_tok = jax.ShapeDtypeStruct((nv, b, t, h), F32)
  # forward sweep: dq (partial over V-blocks) and the states after every chunk
  outs = _call(st, _bwd_dq_kernel, (b, h, nv),
               [sp[x] for x in names] + [sp["state"], sp["do"]],
               [sp["part_k"], sp["hs"]] + ([sp["part_tok"]] if scalar else []),
               [part_k, jax.ShapeDtypeStruct((b, h, n, k_dim, vp), F32)]
               + ([part_tok] if scalar else []),
               ins + [h0, do], *_bwd_defaults(st))
  dq, hs = outs[0], outs[1]
  qdq = outs[2] if scalar else None
  # reverse sweep: dk (partial), dv, dh0, and the decay-gradient pieces
  outs = _call(st, _bwd_dkv_kernel, (b, h, nv),
               [sp[x] for x in names] + [sp["do"], sp["state"], sp["hs"]],
               [sp["part_k"], sp["v"], sp["state"], sp["R"]]
               + ([sp["part_tok"]] * 2 if scalar else []),
               [part_k, jax.ShapeDtypeStruct(v.shape, v.dtype),
                jax.ShapeDtypeStruct((b, h, k_dim, vp), F32),
                jax.ShapeDtypeStruct((nv, b, h, n, k_dim), F32)]
               + ([part_tok] * 2 if scalar else []),
               ins + [do, dhT, hs], *_bwd_defaults(st))
  dk, dv, dh0, R = outs[:4]
  dq = jnp.sum(dq, axis=0)
  dk = jnp.sum(dk, axis=0)
  dG = dGq = None
  if st.kind != "none":
    # d/dGamma_n (the chunk's last row of G)
    R = jnp.sum(R, axis=0).transpose(0, 2, 1, 3)                 # [B,N,H,K]
    last = jnp.zeros((b, n, st.chunk, h, k_dim), F32).at[:, :, -1].set(R)
    last = last.reshape(b, t, h, k_dim)
    if scalar:
      rowm, colm = (jnp.sum(x, axis=0) for x in outs[4:6])
      dGq = rowm + jnp.sum(qdq, axis=0)
      dG = jnp.sum(last, axis=-1) - colm
    else:
      dGq = q.astype(F32) * dq
      dG = last - k.astype(F32) * dk
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv, dG, dGq, dh0.astype(h0.dtype),
          None, None, None)


_core.defvjp(_core_fwd, _core_bwd)


def _canonical_segments(segment_ids):
  """Segment index that increases by one at every change of id (0 at the first token)."""
  change = segment_ids[:, 1:] != segment_ids[:, :-1]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], jnp.int32),
                          jnp.cumsum(change.astype(jnp.int32), axis=1)], axis=1)


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
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  cfg = config or default_config(b, h, k_dim, v_dim, kind)
  c = cfg.chunk
  tp = -(-t // c) * c
  kp = _next_pow2(max(16, k_dim))
  bv = min(cfg.block_v, _next_pow2(max(16, v_dim)))
  vp = -(-v_dim // bv) * bv
  st = _Static(kind=kind, exclusive=bonus is not None, segments=segment_ids is not None,
               scale=float(scale), chunk=c, sub=SUB if kind == "vector" else c,
               interpret=bool(interpret), block_v=bv, out_dtype=out_dtype,
               num_warps=cfg.num_warps,
               num_stages=cfg.num_stages)

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
  o, hT = _core(st, qp, kpd, vpd, G, Gq, h0, seg, m0, mk)
  o = o[:, :t, :, :v_dim]
  hT = hT[:, :, :k_dim, :v_dim]
  if bonus is not None:
    beta = jnp.einsum("bthk,hk,bthk->bth", q.astype(F32), bonus.astype(F32), k.astype(F32))
    o = (o.astype(F32) + scale * beta[..., None] * v.astype(F32)).astype(o.dtype)
  return o, hT
