"""Selective scan: the state-space recurrence of Mamba (Gu & Dao 2023, "Mamba: Linear-Time
Sequence Modeling with Selective State Spaces", Algorithm 2), per channel d with a float32
state h [D, N]:

  dt_t = softplus(delta_t + delta_bias)            (input-dependent step size; bias optional)
  h_t = exp(dt_t A) * h_{t-1} + (dt_t x_t) B_t     (A discretised by ZOH, B by Euler, as the
  y_t = C_t . h_t + D * x_t                         official selective_scan_ref)

Layout channels-last: x, delta [B,T,D], A [D,N] (negative), B, C [B,T,N] (input-dependent,
shared by the channels), D [D] or None, delta_bias [D] or None; state [B,D,N] float32.
`segment_ids` [B,T] (packed sequences): the state is reset to zero where the id changes;
`initial_state` feeds the first segment only. The gate y * silu(z) is the mixer's.

Implementations: `reference` (lax.associative_scan over the whole sequence, [B,T,D,N] in
float32), `recurrent` (lax.scan of `step`), "xla" (the kernels' chunked pure-jnp twin,
pallas_kernels.selective_scan.chunked: memory linear in T), "pallas"
(pallas_kernels.selective_scan: Triton on GPU, Mosaic on TPU v5 and newer) and "interpret"
(that kernel in Pallas interpret mode, any backend). "associative" and "scan" name the two
references for the benchmark.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts
from pallas_kernels import selective_scan as kernels

F32 = jnp.float32

dispatcher = Dispatcher(
  "selective_scan",
  auto_order={"gpu": ("pallas", "xla"), "tpu": ("pallas", "xla"), "default": ("xla",)},
)


def _canonical(x, delta, A, B, C, D, delta_bias, initial_state, segment_ids):
  if x.ndim != 3 or delta.shape != x.shape or A.ndim != 2 or A.shape[0] != x.shape[2]:
    raise ValueError(
      f"selective_scan wants x, delta [B,T,D] and A [D,N]; got x{x.shape} delta{delta.shape} "
      f"A{A.shape}"
    )
  b, t, d = x.shape
  n = A.shape[1]
  for name, arr in (("B", B), ("C", C)):
    if arr.shape != (b, t, n):
      raise ValueError(f"selective_scan: {name} must be [B,T,N]=({b},{t},{n}); got {arr.shape}")
  for name, arr in (("D", D), ("delta_bias", delta_bias)):
    if arr is not None and arr.shape != (d,):
      raise ValueError(f"selective_scan: {name} must be [D]=({d},); got {arr.shape}")
  if initial_state is not None and initial_state.shape != (b, d, n):
    raise ValueError(
      f"selective_scan: initial_state must be [B,D,N]=({b},{d},{n}); got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(
      f"selective_scan: segment_ids must be [B,T]=({b},{t}); got {segment_ids.shape}"
    )


def _finish(y, final_state, return_final_state):
  return (y, final_state) if return_final_state else y


def init_state(batch: int, d_inner: int, d_state: int) -> jax.Array:
  """Zero state [B, D, N] float32."""
  return jnp.zeros((batch, d_inner, d_state), F32)


def _initial(x, A, initial_state):
  b, _, d = x.shape
  return init_state(b, d, A.shape[1]) if initial_state is None else initial_state.astype(F32)


def reference(
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
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.associative_scan over the whole sequence (float32; materialises [B,T,D,N])."""
  _canonical(x, delta, A, B, C, D, delta_bias, initial_state, segment_ids)
  h0 = _initial(x, A, initial_state)
  keep = None if segment_ids is None else kernels.keep_mask(segment_ids)
  dt = kernels.discretize(delta, delta_bias, delta_softplus)
  y, final = kernels.block_scan(dt, x, A, B, C, keep, h0)
  if D is not None:
    y = y + D.astype(F32) * x.astype(F32)
  return _finish(y.astype(x.dtype), final, return_final_state)


def step(
  state: jax.Array,
  x: jax.Array,
  delta: jax.Array,
  A: jax.Array,
  B: jax.Array,
  C: jax.Array,
  D: jax.Array | None = None,
  *,
  delta_bias: jax.Array | None = None,
  delta_softplus: bool = True,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step: state [B,D,N], x, delta [B,D], B, C [B,N]; reset [B] bool zeroes the
  state first. Returns (new state float32, y [B,D] in x's dtype)."""
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None], 0.0, state)
  dt = kernels.discretize(delta, delta_bias, delta_softplus)
  xf = x.astype(F32)
  state = (
    jnp.exp(dt[..., None] * A.astype(F32)) * state
    + (dt * xf)[..., None] * B.astype(F32)[:, None, :]
  )
  y = jnp.einsum("bdn,bn->bd", state, C.astype(F32))
  if D is not None:
    y = y + D.astype(F32) * xf
  return state, y.astype(x.dtype)


def recurrent(
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
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time (float32 state)."""
  _canonical(x, delta, A, B, C, D, delta_bias, initial_state, segment_ids)
  h0 = _initial(x, A, initial_state)
  reset = jnp.zeros(x.shape[:2], bool) if segment_ids is None else segment_starts(segment_ids)
  one = functools.partial(step, delta_bias=delta_bias, delta_softplus=delta_softplus)

  def body(state, inputs):
    xt, dt, bt, ct, rt = inputs
    return one(state, xt, dt, A, bt, ct, D, reset=rt)

  xs = tuple(z.swapaxes(0, 1) for z in (x, delta, B, C, reset))
  final, y = lax.scan(body, h0, xs)
  return _finish(y.swapaxes(0, 1), final, return_final_state)


# ----------------------------------------------------------------------------- implementations


def _xla(*, return_final_state, chunk_size=64, **args):
  y, final = kernels.chunked(**args, chunk=chunk_size)
  return _finish(y, final, return_final_state)


dispatcher.register("xla")(_xla)


@dispatcher.register("associative")
def _associative(**args):
  return reference(**args)


@dispatcher.register("scan")
def _scan(**args):
  return recurrent(**args)


def _kernel_reason(*, x, delta, A, B, C, interpret, **_):
  return kernels.reason(x, delta, A, B, C, interpret=interpret)


def _run_kernel(*, return_final_state, interpret, **args):
  y, final = kernels.selective_scan(**args, interpret=interpret)
  return _finish(y, final, return_final_state)


dispatcher.register_kernel(_run_kernel, _kernel_reason, "the selective-scan kernels")


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
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The selective scan (module docstring). Returns y [B,T,D] in x's dtype, or (y,
  final_state [B,D,N] float32). implementation: "auto" | "xla" | "pallas" | "interpret" |
  "associative" | "scan"."""
  _canonical(x, delta, A, B, C, D, delta_bias, initial_state, segment_ids)
  args = dict(
    x=x,
    delta=delta,
    A=A,
    B=B,
    C=C,
    D=D,
    delta_bias=delta_bias,
    delta_softplus=delta_softplus,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.selective_scan(plan, **args, implementation=implementation)
  return dispatcher(implementation, **args)
