"""`selective_scan`: argument checks (`reason`), padding and layout (`prepare`), and the
custom_vjp around the forward and backward kernels (calls.py).

Residuals of the backward: the prepared inputs and the chunk-entry states hs
(B * T/C * N * D float32, 1/C of the full [B, T, D, N] states). The gradients of A, D, the
delta bias and the B, C partials over channel blocks are summed here in XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common

from . import calls
from .chunked_jnp import keep_mask
from .tuning import Tuning, check, default_tuning

F32 = jnp.float32
FLOATS = (jnp.float32, jnp.bfloat16, jnp.float16)


def reason(
  x: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  *,
  tuning: Tuning | None = None,
  interpret: bool = False,
) -> str | None:
  """Why the kernels cannot serve these arguments, or None (no tracing)."""
  if x.ndim != 3 or delta.shape != x.shape:
    return f"wants x, delta [B,T,D]; got {x.shape}, {delta.shape}"
  if A.ndim != 2 or A.shape[0] != x.shape[2] or B.shape != C.shape:
    return f"wants A [D,N] and B, C [B,T,N]; got {A.shape}, {B.shape}, {C.shape}"
  if B.shape != (*x.shape[:2], A.shape[1]):
    return f"wants B, C [B,T,N] = {(*x.shape[:2], A.shape[1])}; got {B.shape}"
  for name, arr in (("x", x), ("delta", delta), ("B", B), ("C", C)):
    if arr.dtype not in FLOATS:
      return f"needs float32/bfloat16/float16 {name}, got {arr.dtype}"
  limit = 256 if interpret else 64
  if A.shape[1] > limit:
    return f"state size {A.shape[1]} > {limit} (the [N, block_d] state lives in registers)"
  return check(tuning or Tuning())


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, *args):
  y, _, hT = calls.forward(st, dict(zip(calls.ARGS, args)))
  return y, hT


def _core_fwd(st, *args):
  a = dict(zip(calls.ARGS, args))
  y, hs, hT = calls.forward(st, a)
  return (y, hT), (a, hs)


def _core_bwd(st, res, cts):
  a, hs = res
  dy, dhT = cts
  dy = dy.astype(a["x"].dtype)
  dx, ddt, dbt, dct, da, dh0 = calls.backward(st, a, hs, dy, dhT.astype(F32))
  f = lambda z: z.astype(F32)
  grads = dict(
    x=dx,
    delta=ddt,
    bias=jnp.sum(f(ddt), axis=(0, 1))[None],
    a=jnp.sum(da, axis=(0, 1)),
    dskip=jnp.sum(f(dy) * f(a["x"]), axis=(0, 1))[None],
    bt=jnp.sum(dbt, axis=1).astype(a["bt"].dtype),
    ct=jnp.sum(dct, axis=1).astype(a["ct"].dtype),
    keep=None if a["keep"] is None else jnp.zeros_like(a["keep"]),
    h0=dh0,
  )
  return tuple(grads[name] for name in calls.ARGS)


_core.defvjp(_core_fwd, _core_bwd)


def prepare(
  x,
  delta,
  A,
  B,
  C,
  D,
  *,
  delta_bias,
  delta_softplus,
  initial_state,
  segment_ids,
  tuning,
  interpret,
  platform,
):
  """The static description and the kernel inputs (a dict keyed by calls.ARGS): T padded to
  whole chunks (padded steps have dt = 0, so they keep the state), D to whole channel blocks,
  N to a power of two >= 8; B, C and the keep mask chunk-major [B, T/C, N, C]; A and the
  state transposed to [N, D]."""
  tpu = common.resolve_platform(platform) == "tpu"
  b, t, d = x.shape
  n = A.shape[1]
  tuning = tuning or default_tuning(b, d)
  c = tuning.chunk
  tp = common.round_up(t, c)
  npad = common.next_pow2(n, 8)
  if tpu:  # Mosaic blocks: 128 lanes or the whole axis
    bd = 128 if d % 128 == 0 else d
  else:
    bd = min(tuning.block_d, common.next_pow2(d, 16))
  dp = common.round_up(d, bd)
  st = calls.Static(
    b=b,
    tp=tp,
    dp=dp,
    n=npad,
    chunk=c,
    block_d=bd,
    softplus=bool(delta_softplus),
    segmented=segment_ids is not None,
    tpu=tpu,
    interpret=bool(interpret),
    launch_forward=tuning.forward,
    launch_backward=tuning.backward,
  )
  rows = lambda z, fill=0.0: jnp.pad(z, ((0, 0), (0, tp - t), (0, dp - d)), constant_values=fill)
  channels = lambda v: jnp.pad(v.astype(F32), (0, dp - d))[None]
  bias = jnp.zeros((d,), F32) if delta_bias is None else delta_bias.astype(F32)
  if delta_softplus:  # softplus(-1e4 + bias) == 0 on the padded steps
    delta_in, bias_in = rows(delta, -1e4), channels(bias)
  else:  # dt = delta + bias, folded here so that padded steps are exactly 0
    delta_in, bias_in = rows(delta.astype(F32) + bias), channels(jnp.zeros_like(bias))

  def columns(z):  # [B, T, N] -> [B, T/C, N', C]
    z = jnp.pad(z, ((0, 0), (0, tp - z.shape[1]), (0, npad - z.shape[-1])))
    return jnp.swapaxes(z.reshape(b, tp // c, c, npad), 2, 3)

  keep = keep_mask(segment_ids, tp)
  if keep is not None:
    keep = columns(jnp.broadcast_to(keep[..., None], (b, tp, npad)))
  if initial_state is None:
    h0 = jnp.zeros((b, npad, dp), F32)
  else:
    h0 = jnp.pad(
      jnp.swapaxes(initial_state.astype(F32), 1, 2), ((0, 0), (0, npad - n), (0, dp - d))
    )
  args = dict(
    x=rows(x),
    delta=delta_in,
    bias=bias_in,
    a=jnp.pad(A.astype(F32).T, ((0, npad - n), (0, dp - d))),
    dskip=channels(jnp.zeros((d,), F32) if D is None else D),
    bt=columns(B),
    ct=columns(C),
    keep=keep,
    h0=h0,
  )
  return st, args


def selective_scan(
  x: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  *,
  delta_bias: jax.Array | None = None,
  delta_softplus: bool = True,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  tuning: Tuning | None = None,
  interpret: bool = False,
  platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The selective scan through the Pallas kernels, differentiable in every float input.

  x, delta [B,T,D] (raw delta: dt = softplus(delta + delta_bias) with delta_softplus), A [D,N],
  B, C [B,T,N], D [D] or None, delta_bias [D] or None, initial_state [B,D,N] or None,
  segment_ids [B,T] or None (state reset where the id changes). tuning: None is
  `default_tuning`. platform: "gpu" (Triton) | "tpu" (Mosaic) | None (from JAX's default
  backend); with interpret=True, the interpreter of that form.
  Returns (y [B,T,D] in x's dtype, final_state [B,D,N] float32).
  """
  why = reason(x, delta, A, B, C, tuning=tuning, interpret=interpret)
  if why is not None:
    raise NotImplementedError(f"pallas selective_scan: {why}")
  st, a = prepare(
    x,
    delta,
    A,
    B,
    C,
    D,
    delta_bias=delta_bias,
    delta_softplus=delta_softplus,
    initial_state=initial_state,
    segment_ids=segment_ids,
    tuning=tuning,
    interpret=interpret,
    platform=platform,
  )
  y, hT = _core(st, *(a[name] for name in calls.ARGS))
  t, d = x.shape[1:]
  return y[:, :t, :d], jnp.swapaxes(hT, 1, 2)[:, :d, : A.shape[1]]
