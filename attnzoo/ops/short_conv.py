"""Short causal depthwise convolution (H3 / Mamba / Based / DeltaNet "short conv").

  y_t[c] = bias[c] + sum_{i=0}^{K-1} weight[i, c] * x_{t-(K-1)+i}[c]

Layout: x [B,T,C] (channels last), weight [K,C] with weight[K-1] multiplying the current
input, or per-position weights [B,T,K,C] (the dynamic convolutions of Wu et al. 2019: y_t uses
weight[:, t]), bias [C] or None. The recurrent state is the buffer of the last K-1 inputs, oldest
first: state [B,K-1,C] (float32 in `step`/`init_state`). Inputs before the first token are
taken from `initial_state` (zeros by default).

`segment_ids` [B,T] (packed sequences): a token never sees inputs of an earlier segment (the
buffer is reset to zero where the id changes); `initial_state` feeds the first segment only.
`return_final_state` also returns the buffer after the last token (entries from before the
last segment's start are zero), so `op(x1) ; op(x2, initial_state=state)` == `op([x1, x2])`.

Implementations: `reference` (a sum of K shifted copies, pure jnp, differentiable), "xla" (the
same), `recurrent` (lax.scan of `step`, for tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32

dispatcher = Dispatcher("short_conv", auto_order={"default": ("xla",)})


def _canonical(x, weight, bias, initial_state, segment_ids):
  static = weight.ndim == 2 and weight.shape[1] == x.shape[-1]
  dynamic = weight.ndim == 4 and weight.shape[:2] + weight.shape[3:] == x.shape
  if x.ndim != 3 or not (static or dynamic):
    raise ValueError(
      "short_conv wants x [B,T,C] and weight [K,C] or [B,T,K,C]; "
      f"got x{x.shape} weight{weight.shape}"
    )
  b, t, c = x.shape
  k = weight.shape[-2]
  if bias is not None and bias.shape != (c,):
    raise ValueError(f"short_conv: bias must be [C]=({c},); got {bias.shape}")
  if initial_state is not None and initial_state.shape != (b, k - 1, c):
    raise ValueError(
      f"short_conv: initial_state must be [B,K-1,C]=({b},{k - 1},{c}); got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"short_conv: segment_ids must be [B,T]=({b},{t}); got {segment_ids.shape}")


def init_state(
  batch: int, kernel_size: int, channels: int, dtype: jax.typing.DTypeLike = F32
) -> jax.Array:
  """Zero buffer [B, K-1, C] of the last K-1 inputs."""
  return jnp.zeros((batch, kernel_size - 1, channels), dtype)


def reference(
  x: jax.Array,
  weight: jax.Array,
  bias: jax.Array | None = None,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Sum of K shifted, masked copies of x; accumulates in float32, returns x's dtype."""
  _canonical(x, weight, bias, initial_state, segment_ids)
  b, t, c = x.shape
  k = weight.shape[-2]
  xf = x.astype(F32)
  prefix = jnp.zeros((b, k - 1, c), F32) if initial_state is None else initial_state.astype(F32)
  xp = jnp.concatenate([prefix, xf], axis=1)  # [B, K-1+T, C]
  if segment_ids is None:
    seg = jnp.zeros((b, t), jnp.int32)
  else:
    seg = segment_ids
  # The buffer belongs to the first segment.
  segp = jnp.concatenate([jnp.broadcast_to(seg[:, :1], (b, k - 1)), seg], axis=1)
  wf = weight.astype(F32)
  y = jnp.zeros((b, t, c), F32)
  for i in range(k):  # i = K-1 is the current x
    xi = lax.slice_in_dim(xp, i, i + t, axis=1)
    same = lax.slice_in_dim(segp, i, i + t, axis=1) == seg
    y = y + jnp.where(same[..., None], xi, 0.0) * (wf[i] if wf.ndim == 2 else wf[:, :, i])
  if bias is not None:
    y = y + bias.astype(F32)
  y = y.astype(x.dtype)
  if not return_final_state:
    return y
  if k == 1:
    return y, jnp.zeros((b, 0, c), F32)
  last = segp[:, -(k - 1) :] == seg[:, -1:]
  final = jnp.where(last[..., None], xp[:, -(k - 1) :], 0.0)
  return y, final


def step(
  state: jax.Array,
  x: jax.Array,
  weight: jax.Array,
  bias: jax.Array | None = None,
  *,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step: state [B,K-1,C], x [B,C], weight [K,C] or this step's [B,K,C]; reset
  [B] bool zeroes the buffer first. Returns (new state float32, y [B,C] in x's dtype)."""
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None], 0.0, state)
  # The barrier keeps XLA from fusing the producer of x (at batch 1 a projection rewritten as
  # multiply + reduce) into the concatenation, a fusion measured at ~100 us per call on an
  # H200 (gated_deltanet decoding 2.1 ms per token, 2026-12-03).
  x = lax.optimization_barrier(x)
  window = jnp.concatenate([state, x.astype(F32)[:, None]], axis=1)  # [B,K,C]
  y = jnp.sum(window * weight.astype(F32), axis=1)
  if bias is not None:
    y = y + bias.astype(F32)
  return window[:, 1:], y.astype(x.dtype)


def recurrent(
  x: jax.Array,
  weight: jax.Array,
  bias: jax.Array | None = None,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time."""
  _canonical(x, weight, bias, initial_state, segment_ids)
  b, t, c = x.shape
  k = weight.shape[-2]
  s0 = init_state(b, k, c) if initial_state is None else initial_state.astype(F32)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)
  # static weights are a constant of the scan; per-position ones are scanned over with x
  weights = (
    jnp.broadcast_to(weight, (t,) + weight.shape) if weight.ndim == 2 else weight.swapaxes(0, 1)
  )

  def body(state, inp):
    xt, wt, rt = inp
    return step(state, xt, wt, bias, reset=rt)

  final, y = lax.scan(body, s0, (x.swapaxes(0, 1), weights, reset.swapaxes(0, 1)))
  y = y.swapaxes(0, 1)
  return (y, final) if return_final_state else y


@dispatcher.register("xla")
def _xla(*, x, weight, bias, initial_state, return_final_state, segment_ids):
  return reference(
    x,
    weight,
    bias,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )


def short_conv(
  x: jax.Array,
  weight: jax.Array,
  bias: jax.Array | None = None,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Causal depthwise convolution (see the module docstring).

  Returns y [B,T,C] in x's dtype, or (y, final_state [B,K-1,C] float32).
  implementation: "auto" | "xla".
  """
  _canonical(x, weight, bias, initial_state, segment_ids)
  args = dict(
    x=x,
    weight=weight,
    bias=bias,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.short_conv(plan, **args, implementation=implementation)
  return dispatcher(implementation, **args)
