"""The pallas_calls of the selective-scan kernels (bodies in kernels.py) for one problem shape
(`Static`), on a (batch, channel block) grid; TPU adds the chunk axis (`common.pallas_call`)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import common

from . import kernels

F32 = jnp.float32
# Kernel inputs in order (op.prepare builds them); "keep" only with segments.
ARGS = ("x", "delta", "bias", "a", "dskip", "bt", "ct", "keep", "h0")


@dataclasses.dataclass(frozen=True)
class Static:
  """b, tp (padded T), dp (padded D), n (padded state size), chunk, block_d; softplus,
  segmented; tpu, interpret; Triton (num_warps, num_stages) of the two kernels."""

  b: int
  tp: int
  dp: int
  n: int
  chunk: int
  block_d: int
  softplus: bool
  segmented: bool
  tpu: bool
  interpret: bool
  launch_forward: tuple[int, int]
  launch_backward: tuple[int, int]

  @property
  def chunks(self) -> int:
    return self.tp // self.chunk


class _Specs:
  """BlockSpecs of one kernel. GPU: a (b, j) grid, blocks holding the whole sequence. TPU: a
  (b, j, s) grid, blocks holding chunk s (chunk N-1-s with `reverse`)."""

  def __init__(self, st: Static, reverse: bool = False):
    self.st = st
    last = st.chunks - 1
    self.at = (lambda s: last - s) if reverse else (lambda s: s)

  def _spec(self, gpu_block, tpu_block, index):
    """index(b, j, chunk) -> block index; chunk is 0 on GPU."""
    if self.st.tpu:
      return pl.BlockSpec(tpu_block, lambda b, j, s: index(b, j, self.at(s)))
    return pl.BlockSpec(gpu_block, lambda b, j: index(b, j, 0))

  def rows(self):  # [B, Tp, Dp]
    st = self.st
    return self._spec(
      (None, st.tp, st.block_d), (None, st.chunk, st.block_d), lambda b, j, c: (b, c, j)
    )

  def channels(self, lead):  # [lead, Dp]
    return pl.BlockSpec((lead, self.st.block_d), lambda b, j, *_: (0, j))

  def state(self):  # [B, N, Dp]
    return pl.BlockSpec((None, self.st.n, self.st.block_d), lambda b, j, *_: (b, 0, j))

  def columns(self):  # [B, T/C, N, C]
    st = self.st
    return self._spec(
      (None, st.chunks, st.n, st.chunk), (None, 1, st.n, st.chunk), lambda b, j, c: (b, c, 0, 0)
    )

  def chunk_states(self):  # [B, T/C, N, Dp]
    st = self.st
    return self._spec(
      (None, st.chunks, st.n, st.block_d),
      (None, 1, st.n, st.block_d),
      lambda b, j, c: (b, c, 0, j),
    )

  def partial_columns(self):  # [B, Dp/BD, T/C, N, C]
    st = self.st
    return self._spec(
      (None, None, st.chunks, st.n, st.chunk),
      (None, None, 1, st.n, st.chunk),
      lambda b, j, c: (b, j, c, 0, 0),
    )

  def inputs(self):
    """Specs of the seven per-program inputs (ARGS up to "ct")."""
    return [
      self.rows(),
      self.rows(),
      self.channels(1),
      self.channels(self.st.n),
      self.channels(1),
      self.columns(),
      self.columns(),
    ]

  def keep(self):
    return [self.columns()] * self.st.segmented


def _call(st: Static, body, name, launch, in_specs, out_specs, out_shape):
  kernel = functools.partial(
    body,
    chunk=st.chunk,
    n_chunks=1 if st.tpu else st.chunks,
    softplus=st.softplus,
    segmented=st.segmented,
  )
  return common.pallas_call(
    kernel,
    tpu=st.tpu,
    interpret=st.interpret,
    grid=(st.b, st.dp // st.block_d),
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    name=name,
    carry=(st.n, st.block_d),
    chunks=st.chunks,
    launch=launch,
  )


def _inputs(a):
  return [a[name] for name in ARGS[:7]]


def _keep(st, a):
  return [a["keep"]] * st.segmented


def forward(st: Static, a: dict):
  """(y [B,Tp,Dp] in x's dtype, hs [B,T/C,N,Dp] the chunk-entry states, hT [B,N,Dp]), float32
  states."""
  specs = _Specs(st)
  shape = lambda *s, dtype=F32: jax.ShapeDtypeStruct(s, dtype)
  return _call(
    st,
    kernels.forward_kernel,
    "selective_scan_forward",
    st.launch_forward,
    specs.inputs() + specs.keep() + [specs.state()],
    [specs.rows(), specs.chunk_states(), specs.state()],
    [
      shape(st.b, st.tp, st.dp, dtype=a["x"].dtype),
      shape(st.b, st.chunks, st.n, st.dp),
      shape(st.b, st.n, st.dp),
    ],
  )(*_inputs(a), *_keep(st, a), a["h0"])


def backward(st: Static, a: dict, hs, dy, dhT):
  """(dx, ddelta [B,Tp,Dp] in the inputs' dtypes; dB^T, dC^T partials [B,Dp/BD,T/C,N,C];
  dA^T partials [B,T/C,N,Dp]; dh0 [B,N,Dp]), float32 except dx, ddelta."""
  specs = _Specs(st, reverse=True)
  shape = lambda *s, dtype=F32: jax.ShapeDtypeStruct(s, dtype)
  partial = shape(st.b, st.dp // st.block_d, st.chunks, st.n, st.chunk)
  return _call(
    st,
    kernels.backward_kernel,
    "selective_scan_backward",
    st.launch_backward,
    specs.inputs() + [specs.chunk_states(), specs.rows()] + specs.keep() + [specs.state()],
    [
      specs.rows(),
      specs.rows(),
      specs.partial_columns(),
      specs.partial_columns(),
      specs.chunk_states(),
      specs.state(),
    ],
    [
      shape(st.b, st.tp, st.dp, dtype=a["x"].dtype),
      shape(st.b, st.tp, st.dp, dtype=a["delta"].dtype),
      partial,
      partial,
      shape(st.b, st.chunks, st.n, st.dp),
      shape(st.b, st.n, st.dp),
    ],
  )(*_inputs(a), hs, dy, *_keep(st, a), dhT)
