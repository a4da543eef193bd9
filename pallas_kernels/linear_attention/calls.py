"""The pallas_calls of the linear-attention kernels and the forward and backward passes they
make up (the kernel bodies are in kernels.py).

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
Pallas' TPU interpreter. Of `Tuning` only `chunk` and `sub` apply there.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import common

from . import kernels
from .chunked_jnp import CLAMP

F32 = jnp.float32


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
      return pl.BlockSpec(
        (None, None, None, self.n // st.splits, bk), lambda b, h, i, j, p: (b, h, j, p, i)
      )
    assert name == "states", name
    return pl.BlockSpec(
      (None, None, self.n // st.splits, bk, bv), lambda b, h, i, j, p: (b, h, p, i, j)
    )

  # chunk kernels: one chunk; all of K and V, or one V tile (tiled="v"), or one K tile ("k")
  def chunk(self, name, tiled=None):
    c = self.st.chunk
    kw = self.st.block_k_grad if tiled == "k" else self.k
    vw = self.st.block_v_out if tiled == "v" else self.v
    if tiled:
      idx = lambda f: lambda b, h, n, j: f(b, h, n, j)
    else:
      idx = lambda f: lambda b, h, n: f(b, h, n, 0)
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
    if name == "rs":  # summed over the V tiles (see dstates)
      return pl.BlockSpec((None, None, 1, None, kw), idx(lambda b, h, n, j: (b, h, 0, n, kj(j))))
    if name == "u":  # the RWKV-6 bonus [H, 1, K]
      return pl.BlockSpec((None, 1, self.k), idx(lambda b, h, n, j: (h, 0, 0)))
    assert name == "states", name
    return pl.BlockSpec((None, None, None, kw, vw), idx(lambda b, h, n, j: (b, h, n, kj(j), vj(j))))

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
    if name in ("q", "k", "kd", "dq", "dk") or (
      name in ("g", "G", "Gq", "dg") and self.st.kind == "vector"
    ):
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
    assert name == "states", name  # the sequential kernels index their one chunk as [0]
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


def _call(
  st,
  kernel,
  grid,
  in_specs,
  out_specs,
  out_shape,
  args,
  chunks=None,
  stages=None,
  store=True,
  turn=None,
):
  """chunks: for the sequential kernels, the number of chunks they loop over carrying a
  [BK, BV] float32 state (`common.pallas_call`); on GPU their grid gains the split axis.
  stages: Triton pipeline stages instead of the tuning's. store=False: a sequential kernel's
  first pass over a split sequence (no per-chunk states). turn=(flag [1] int32, value, the
  output so far or None): the kernel runs only where flag == value, else every program
  returns at once, leaving the output so far (written in place; see `_output`)."""
  sequential = chunks is not None
  cfg = st.tuning
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
    body,
    tpu=st.tpu,
    interpret=st.interpret,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    name=kernel.__name__ + ("" if store else "_local"),
    carry=(st.block_k, st.block_v) if sequential else None,
    chunks=chunks,
    launch=launch,
    aliases=aliases,
  )
  return call(*args)


def _taking_turns(body, value, n_in, n_so_far):
  """body under `flag == value`, its flag ref first and the aliased output-so-far ref (left
  as it is) dropped."""

  def kernel(flag_ref, *refs):
    @pl.when(flag_ref[0] == value)
    def _():
      body(*refs[:n_in], *refs[n_in + n_so_far :])

  return kernel


def _arrays(names, arrays):
  return [arrays[n] for n in names]


def _chunk_ends(st, x):
  """x at every chunk's last position: G or a mask [B,T,...] on GPU, a vector decay's G
  [B,H,T,K] on TPU."""
  return x[:, :, st.chunk - 1 :: st.chunk] if st.tpu else x[:, st.chunk - 1 :: st.chunk]


def _split_decays(st, a):
  """[B, H, splits, K or 1, 1]: the factor by which a state crosses each split of the
  sequence, the product over its chunks of e^Gamma (times the crossing mask)."""
  b, _, h, _, _, sp = _sizes(st, a)
  p = st.splits
  log_a = jnp.zeros((b, p, h, 1), F32)
  if st.kind != "none":
    ends = _chunk_ends(st, a["G"])  # [B, N, H(, K)]
    ends = ends if st.kind == "vector" else ends[..., None]
    log_a = jnp.sum(ends.reshape(b, p, sp.n // p, h, -1), axis=2)
  f = jnp.exp(log_a)
  if st.segments:
    f = f * jnp.prod(_chunk_ends(st, a["m0"]).reshape(b, p, -1), axis=2)[:, :, None, None]
  return jnp.moveaxis(f, 1, 2)[..., None]


def sequential(st, a, kernel, names, init, reverse, out_dtype, extra_in=(), extra_out=(), **kw):
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
    local = _call(
      st,
      kernel,
      grid,
      specs + [seq("state")],
      seq("state"),
      state,
      _arrays(names, a) + [jnp.zeros(state.shape, F32)],
      chunks=sp.n,
      store=False,
      **kw,
    )
    decay = _split_decays(st, a)
    carries = [init]
    for p in range(st.splits - 1, 0, -1) if reverse else range(st.splits - 1):
      carries.append(decay[:, :, p] * carries[-1] + local[:, :, p])
    inits = jnp.stack(carries[::-1] if reverse else carries, axis=2)
  states, last, *extra = _call(
    st,
    kernel,
    grid,
    specs + [seq(n) for n, _ in extra_in] + [seq("state")],
    [seq("states"), seq("state")] + [seq(n) for n, _ in extra_out],
    [jax.ShapeDtypeStruct((b, h, sp.n, k_dim, v_dim), out_dtype), state]
    + [jax.ShapeDtypeStruct(shape, F32) for _, shape in extra_out],
    _arrays(names, a) + [x for _, x in extra_in] + [inits],
    chunks=sp.n,
    **kw,
  )
  return (states, last[:, :, 0 if reverse else -1], *extra)


def states(st, a):
  """Kernel 1: (h_n for every chunk [B,H,N,K,V] in the input dtype, final state f32)."""
  return sequential(
    st, a, kernels.states_kernel, kernels.states_names(st), a["h0"], False, a["v"].dtype
  )


def forward(st, a):
  """(o, final state, h_n of every chunk)."""
  hs, hT = states(st, a)
  return with_sub(st, a, _output, a, hs, turns=True), hT, hs


def _output(st, a, hs):
  """Kernel 2: o. When the vector sub-block size is left to it (`with_sub`), two launches
  write o: the whole-chunk form where a["exact"] is 1, then the 16-row form where it is 0, in
  place of the first's o; all programs of the form not chosen read the flag and return (one
  form per kernel: both forms in one kernel are slower)."""
  b, _, h, _, v_dim, sp = _sizes(st, a)
  names = kernels.input_names(st) + (["u"] if st.exclusive else [])
  call = functools.partial(
    _call,
    kernel=kernels.output_kernel,
    grid=(b, h, sp.n, v_dim // st.block_v_out),
    in_specs=[sp.chunk(n, "v") for n in names] + [sp.chunk("states", "v")],
    out_specs=sp.chunk("o", "v"),
    out_shape=jax.ShapeDtypeStruct(a["v"].shape, st.out_dtype or a["v"].dtype),
    args=_arrays(names, a) + [hs],
  )
  if not st.choose_sub:
    return call(st)
  wide = dataclasses.replace(st, choose_sub=False)
  o = call(wide, turn=(a["exact"], 1, None))
  return call(dataclasses.replace(wide, sub=16), turn=(a["exact"], 0, o))


def dstates(st, a, do, dhT, hs):
  """Kernel 3: (dh_n for every chunk, dh_0, [the state part of R_n]); on GPU the R_n pieces
  of the V tiles are summed here (one small XLA reduction)."""
  b, _, h, _, _, sp = _sizes(st, a)
  decay = st.kind != "none"
  dhs, dh0, *rs = sequential(
    st,
    dict(a, do=do),
    kernels.dstates_kernel,
    ["q", "do"] + kernels.decay_names(st, True),
    dhT,
    True,
    hs.dtype,
    extra_in=[("states", hs)] if decay else [],
    extra_out=[("rs", sp.rs_shape(b, h))] if decay else [],
    stages=st.tuning.dstates_stages,
  )
  return dhs, dh0, [x if st.tpu else jnp.sum(x, axis=2, keepdims=True) for x in rs]


def dv(st, a, do, dhs):
  """Kernel 4: dv."""
  b, _, h, _, v_dim, sp = _sizes(st, a)
  names = kernels.input_names(st)
  return _call(
    st,
    kernels.dv_kernel,
    (b, h, sp.n, v_dim // st.block_v_out),
    [sp.chunk(n, "v") for n in names + ["do", "states"]],
    sp.chunk("dv", "v"),
    jax.ShapeDtypeStruct(a["v"].shape, a["v"].dtype),
    _arrays(names, a) + [do, dhs],
  )


def dqk(st, a, do, hs, dhs, rs):
  """Kernel 5: dq, dk and dg (None without decay)."""
  q, k = a["q"], a["k"]
  b, _, h, k_dim, _, sp = _sizes(st, a)
  names = kernels.input_names(st)
  outs = ["dq", "dk"]
  out_shape = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k)]
  if st.kind != "none":
    outs.append("dg")
    out_shape.append(jax.ShapeDtypeStruct(a["G"].shape, F32))
  grid, tiled = (b, h, sp.n), None
  if st.block_k_grad < k_dim:
    grid, tiled = grid + (k_dim // st.block_k_grad,), "k"
  spec = functools.partial(sp.chunk, tiled=tiled)
  res = _call(
    st,
    kernels.dqk_kernel,
    grid,
    [spec(n) for n in names + ["do", "states", "states"]] + [spec("rs") for _ in rs],
    [spec(n) for n in outs],
    out_shape,
    _arrays(names, a) + [do, hs, dhs] + rs,
  )
  return res[0], res[1], (res[2] if st.kind != "none" else None)


def backward(st, a, do, dhT, hs):
  """Gradients w.r.t. q, k, v, the per-step log decay g, and h0, from the forward's h_n."""
  dhs, dh0, rs = dstates(st, a, do, dhT, hs)
  dq, dk, dg = dqk(st, a, do, hs, dhs, rs)
  return dq, dk, dv(st, a, do, dhs), dg, dh0


def with_sub(st, a, fn, *args, turns=False):
  """fn(st, *args) with the vector-decay sub-block size chosen at run time: the whole chunk
  where a["exact"] (no chunk decays by more than e^-CLAMP, so nothing is clamped), else 16
  rows. Through lax.cond, or with `turns` on GPU by fn's output kernel taking turns
  (`_output`). XLA's GPU conditional copies its predicate to the host and blocks there until
  it arrives (ConditionalThunk), stalling the dispatch of everything after it. Turns serve the
  forward (one kernel after the choice); in the backward (two kernels) they cost more than
  the wait (the idle launch of a 4096-8192-program kernel is not free; both measured in
  experiments/results/kernels/linear_nvidia_h200.md). TPU: lax.cond (Mosaic prefetches every
  input block of a program, so an idle launch would read them all)."""
  if not st.choose_sub or (turns and not st.tpu):
    return fn(st, *args)
  wide = dataclasses.replace(st, choose_sub=False)
  narrow = dataclasses.replace(wide, sub=16)
  return lax.cond(
    a["exact"][0] == 1, functools.partial(fn, wide), functools.partial(fn, narrow), *args
  )


ARGS = ("q", "k", "v", "g", "u", "h0", "seg", "m0", "mk")


def with_cumsum(st, args):
  """The kernel inputs: the arguments plus G, the chunk-local cumsum of g (float32), Gq for the
  exclusive readout, kd for vector decay (`kernels.cumsum_kernel`), and with the sub-block
  size chosen at run time its flag "exact" [1] int32."""
  a = dict(zip(ARGS, args))
  g = a["g"]
  if g is not None:
    b, _, h, _, _, sp = _sizes(st, a)
    names, outs = kernels.cumsum_names(st)
    shapes = [
      jax.ShapeDtypeStruct(a["k"].shape, a["k"].dtype)
      if n == "kd"
      else jax.ShapeDtypeStruct(g.shape, F32)
      for n in outs
    ]
    res = _call(
      st,
      kernels.cumsum_kernel,
      (b, h, sp.n),
      [sp.chunk(n) for n in names],
      [sp.chunk(n) for n in outs],
      shapes,
      _arrays(names, a),
    )
    a.update(zip(outs, res))
    if st.choose_sub:
      a["exact"] = (jnp.min(_chunk_ends(st, a["G"])) >= -CLAMP).astype(jnp.int32).reshape(1)
  return a
