"""`delta_rule`: argument checks (`reason`), padding and layout, and the custom_vjp around the
kernels' forward and backward (saving the inputs and T = (I + A)^{-1}, as fla does)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import common

from . import chunked_jnp
from .calls import Kernels
from .tuning import Tuning, default_tuning

F32 = jnp.float32


def reason(
  q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float, interpret: bool = False
) -> str | None:
  """Why the kernels cannot serve these arguments, or None (no tracing). Compiled (not
  `interpret`) the [K, V] state tiles live in registers (GPU) or VMEM (TPU): head dims <= 128."""
  if q.dtype not in (jnp.float32, jnp.bfloat16):
    return f"needs float32 or bfloat16 inputs, got {q.dtype}"
  if not isinstance(scale, (int, float, np.floating)):
    return "needs one static Python scalar scale"
  limit = 256 if interpret else 128
  if q.shape[-1] > limit or v.shape[-1] > limit:
    return f"head dims (key {q.shape[-1]}, value {v.shape[-1]}) > {limit}"
  return None


def _gates(g, g0, run):
  return ([g, g0] if g is not None else []) + ([run] if run is not None else [])


def _kernels(q, v, g, run, chunk, interpret, tuning, platform):
  return Kernels(
    q,
    v,
    chunk=chunk,
    gated=g is not None,
    segmented=run is not None,
    tuning=tuning,
    interpret=interpret,
    platform=platform,
  )


_STATIC = ("scale", "chunk", "interpret", "tuning", "platform")


@functools.partial(jax.jit, static_argnames=_STATIC + ("with_t",))
def forward(
  q,
  k,
  v,
  beta,
  g,
  g0,
  run,
  initial_state,
  *,
  scale,
  chunk,
  tuning,
  interpret=False,
  platform=None,
  with_t=False,
):
  """Kernel forward on prepared inputs (see chunked_jnp.chunked; q, k, v in the platform's
  token layout, see `Kernels`); head dims powers of two >= 16. Returns (o, final_state), and
  T = (I + A)^{-1} [B,H,Tp,C] (the backward's residual) with_t."""
  calls = _kernels(q, v, g, run, chunk, interpret, tuning, platform)
  gates = _gates(g, g0, run)
  w, u_tilde, *t = calls.wy(k, v, beta, gates, with_t=with_t)
  states, u, final = calls.states(w, u_tilde, k, initial_state, gates)
  return (calls.output(q, k, states, u, gates, scale, v.dtype), final, *t)


@functools.partial(jax.jit, static_argnames=_STATIC)
def backward(
  q,
  k,
  v,
  beta,
  g,
  g0,
  run,
  initial_state,
  t,
  do,
  dfinal,
  *,
  scale,
  chunk,
  tuning,
  interpret=False,
  platform=None,
):
  """Kernel backward from the inputs and the forward's T: recomputes W, U~, the chunk states
  and U, then the reverse state-gradient pass and the two per-chunk gradient kernels.
  Returns (dq, dk, dv, dbeta, dg, dg0, ds0)."""
  calls = _kernels(q, v, g, run, chunk, interpret, tuning, platform)
  gates = _gates(g, g0, run)
  w, u_tilde = calls.wu(k, v, beta, t, gates)
  states, u, _ = calls.states(w, u_tilde, k, initial_state, gates)
  do = do.astype(v.dtype)
  dvl = calls.dv_local(q, k, do, gates, scale)
  dstates, du, ds0 = calls.dstates(q, k, w, do, dvl, dfinal.astype(F32), gates, scale)
  dq, dk_part, dw, *dg_qk = calls.grad_qk(q, k, states, dstates, do, u, du, gates, scale)
  dk, dv, dbeta, *dg_wy = calls.grad_wy(k, v, beta, t, dw, du, dk_part, gates)
  dg = dg0 = None
  if g is not None:
    dg, dg0 = (part.sum(axis=2) + wy for part, wy in zip(dg_qk, dg_wy))
  return dq, dk, dv, dbeta, dg, dg0, ds0


@functools.partial(jax.custom_vjp, nondiff_argnums=(8, 9, 10, 11, 12))
def _delta_rule_vjp(
  q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret, tuning, platform
):
  return forward(
    q,
    k,
    v,
    beta,
    g,
    g0,
    run,
    initial_state,
    scale=scale,
    chunk=chunk,
    interpret=interpret,
    tuning=tuning,
    platform=platform,
  )


def _vjp_fwd(q, k, v, beta, g, g0, run, initial_state, scale, chunk, interpret, tuning, platform):
  o, final, t = forward(
    q,
    k,
    v,
    beta,
    g,
    g0,
    run,
    initial_state,
    scale=scale,
    chunk=chunk,
    interpret=interpret,
    tuning=tuning,
    platform=platform,
    with_t=True,
  )
  return (o, final), (q, k, v, beta, g, g0, run, initial_state, t)


def _vjp_bwd(scale, chunk, interpret, tuning, platform, residuals, cotangents):
  run = residuals[6]
  dq, dk, dv, dbeta, dg, dg0, ds0 = backward(
    *residuals,
    *cotangents,
    scale=scale,
    chunk=chunk,
    interpret=interpret,
    tuning=tuning,
    platform=platform,
  )
  drun = None if run is None else jnp.zeros_like(run)
  return dq, dk, dv, dbeta, dg, dg0, drun, ds0


_delta_rule_vjp.defvjp(_vjp_fwd, _vjp_bwd)


def delta_rule(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  chunk: int | None = None,
  interpret: bool = False,
  tuning: Tuning | None = None,
  platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Chunked delta rule through the Pallas kernels, differentiable.

  q, k [B,T,H,K], v [B,T,H,V] (one dtype), beta [B,T,H], log_decay [B,T,H] or None,
  initial_state [B,H,K,V] or None, segment_ids [B,T] or None (state reset where it changes).
  chunk: None picks `chunked_jnp.chunk_size_for(T)`. tuning: None is `default_tuning`.
  platform: "gpu" | "tpu" | None (from JAX's default backend); with interpret=True it picks
  the interpreter (TPU: Pallas' TPU interpret mode) and the layout that runs there.
  Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32).
  """
  why = reason(q, k, v, scale=scale, interpret=interpret)
  if why is not None:
    raise NotImplementedError(f"pallas delta_rule: {why}")
  platform = common.resolve_platform(platform)
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  chunk = chunk or chunked_jnp.chunk_size_for(t)
  beta_p, g, g0, run = chunked_jnp.prepare_gates(beta, log_decay, segment_ids, chunk)
  tp = beta_p.shape[-1]
  pk, pv = common.next_pow2(dk, 16), common.next_pow2(dv, 16)
  tuning = tuning or default_tuning(b, h, pv)
  pad = lambda x, d: jnp.pad(x, ((0, 0), (0, tp - t), (0, 0), (0, d - x.shape[-1])))
  if initial_state is None:
    s0 = jnp.zeros((b, h, pk, pv), F32)
  else:
    s0 = jnp.pad(initial_state.astype(F32), ((0, 0), (0, 0), (0, pk - dk), (0, pv - dv)))
  q, k, v = pad(q, pk), pad(k, pk), pad(v, pv)
  if platform == "tpu":  # token layout [B, H, T, D]
    q, k, v = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))
  o, final = _delta_rule_vjp(
    q, k, v, beta_p, g, g0, run, s0, float(scale), chunk, interpret, tuning, platform
  )
  if platform == "tpu":
    o = jnp.swapaxes(o, 1, 2)
  return o[:, :t, :, :dv], final[:, :, :dk, :dv]
