"""Delta rule (DeltaNet, Yang et al. 2024) and its gated form (Gated DeltaNet), layout BTHD.

delta_rule(q[B,T,H,K], k[B,T,H,K], v[B,T,H,V], beta[B,T,H], *, scale, log_decay=None, ...)
  -> o[B,T,H,V]  (or (o, final_state[B,H,K,V] float32) with return_final_state)

Per batch and head, with state S in R^{K x V}:
  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t,
a_t = exp(log_decay_t) (log_decay <= 0, floored at linear_attention.LOG_DECAY_FLOOR = -9.5 by
every form, as in linear attention; a_t = 1 without it). `initial_state` is S_{-1}.
Where `segment_ids` changes between t-1 and t the state is reset: S_{t-1} := 0 (packed
documents). DeltaNet expects L2-normalised keys and beta in (0, 1); the op does not enforce it.

Implementations: "xla" (chunked WY form in pure JAX), "pallas" (the Pallas kernels: Triton on
GPU, Mosaic on TPU v5 and newer), "interpret" (the same kernels in Pallas interpret mode). The
forms differ only in floating-point rounding; `recurrent` (= `reference`) is the float32 ground
truth.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.linear_attention import LOG_DECAY_FLOOR
from attnzoo.ops.segments import segment_starts
from pallas_kernels import delta_rule as kernels

dispatcher = Dispatcher(
  "delta_rule",
  auto_order={
    "gpu": ("pallas", "xla"),
    "tpu": ("pallas", "xla"),
    # On CPU the scan beats the chunked form (its batched triangular solves are slow there).
    "cpu": ("recurrent", "xla"),
    "default": ("xla",),
  },
)

_HI = lax.Precision.HIGHEST


def init_state(batch: int, heads: int, key_dim: int, value_dim: int) -> jax.Array:
  """Zero recurrent state [B, H, K, V] float32."""
  return jnp.zeros((batch, heads, key_dim, value_dim), jnp.float32)


def step(
  state: jax.Array,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  log_decay: jax.Array | None = None,
  *,
  scale: float,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step. state [B,H,K,V] f32; q,k [B,H,K]; v [B,H,V]; beta, log_decay [B,H];
  reset [B] bool (start of a new segment: the state is zeroed first) or None.
  Returns (new state [B,H,K,V] f32, o [B,H,V] in v.dtype)."""
  f32 = lambda x: x.astype(jnp.float32)
  s = state.astype(jnp.float32)
  if reset is not None:
    s = jnp.where(reset[:, None, None, None], 0.0, s)
  if log_decay is not None:
    s = jnp.exp(jnp.maximum(f32(log_decay), LOG_DECAY_FLOOR))[..., None, None] * s
  k32 = f32(k)
  pred = jnp.einsum("bhkv,bhk->bhv", s, k32, precision=_HI)
  u = f32(beta)[..., None] * (f32(v) - pred)
  s = s + k32[..., :, None] * u[..., None, :]
  o = scale * jnp.einsum("bhkv,bhk->bhv", s, f32(q), precision=_HI)
  return s, o.astype(v.dtype)


def recurrent(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The token-by-token recurrence as a lax.scan over time, in float32 (the ground truth)."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  s0 = init_state(b, h, dk, dv) if initial_state is None else initial_state.astype(jnp.float32)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)
  ld = jnp.zeros(beta.shape, jnp.float32) if log_decay is None else log_decay
  xs = tuple(jnp.moveaxis(x.astype(jnp.float32), 1, 0) for x in (q, k, v, beta, ld))
  xs += (jnp.moveaxis(reset, 1, 0),)

  def body(s, x):
    qt, kt, vt, bt, lt, rt = x
    return step(s, qt, kt, vt, bt, lt, scale=scale, reset=rt)

  final, o = lax.scan(body, s0, xs)
  o = jnp.moveaxis(o, 0, 1)
  return (o, final) if return_final_state else o


reference = recurrent


def _canonical(q, k, v, beta, *, scale, log_decay, initial_state, segment_ids):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"delta_rule wants q,k [B,T,H,K] and v [B,T,H,V]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  if beta.shape != (b, t, h):
    raise ValueError(f"delta_rule: beta must be [B,T,H]={b, t, h}, got {beta.shape}")
  if log_decay is not None and log_decay.shape != (b, t, h):
    raise ValueError(f"delta_rule: log_decay must be [B,T,H]={b, t, h}, got {log_decay.shape}")
  if initial_state is not None and initial_state.shape != (b, h, dk, dv):
    raise ValueError(
      f"delta_rule: initial_state must be [B,H,K,V]={b, h, dk, dv}, got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"delta_rule: segment_ids must be [B,T]={b, t}, got {segment_ids.shape}")
  if scale is None:
    raise ValueError("delta_rule: pass `scale` explicitly (e.g. head_dim ** -0.5)")
  if not (q.dtype == k.dtype == v.dtype):
    raise ValueError(f"delta_rule: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
  return dict(
    q=q,
    k=k,
    v=v,
    beta=beta,
    scale=scale,
    log_decay=None if log_decay is None else jnp.maximum(log_decay, LOG_DECAY_FLOOR),
    initial_state=initial_state,
    segment_ids=segment_ids,
  )


@dispatcher.register("recurrent")
def _recurrent(*, q, k, v, beta, scale, log_decay, initial_state, segment_ids):
  o, final = recurrent(
    q,
    k,
    v,
    beta,
    scale=scale,
    log_decay=log_decay,
    initial_state=initial_state,
    return_final_state=True,
    segment_ids=segment_ids,
  )
  return o.astype(v.dtype), final


@dispatcher.register("xla")
def _xla(*, q, k, v, beta, scale, log_decay, initial_state, segment_ids):
  """Chunked WY form in pure JAX (the kernels' twin): matmuls in the input dtype with
  float32 accumulation, float32 triangular solve and state."""
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = kernels.chunk_size_for(t)
  beta_p, g, g0, run = kernels.prepare_gates(beta, log_decay, segment_ids, chunk)
  tp = beta_p.shape[-1]
  pad = lambda x: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, 0)))
  s0 = init_state(b, h, dk, dv) if initial_state is None else initial_state
  o, final = kernels.chunked(
    pad(q), pad(k), pad(v), beta_p, g, g0, run, s0, scale=scale, chunk=chunk
  )
  return o[:, :t], final


def _kernel_reason(*, q, k, v, scale, interpret, **_):
  return kernels.reason(q, k, v, scale=scale, interpret=interpret)


dispatcher.register_kernel(kernels.delta_rule, _kernel_reason, "the delta-rule Pallas kernels")


def delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Chunked delta rule; see the module docstring. implementation: "auto" | "xla" |
  "pallas" | "interpret" | "recurrent" (the float32 scan; "auto" takes it on CPU)."""
  args = _canonical(
    q,
    k,
    v,
    beta,
    scale=scale,
    log_decay=log_decay,
    initial_state=initial_state,
    segment_ids=segment_ids,
  )
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.delta_rule(
      plan, **args, implementation=implementation, return_final_state=return_final_state
    )
  o, final = dispatcher(implementation, **args)
  return (o, final) if return_final_state else o
