"""`linear_attention`: argument checks (`reason`), padding and layout (`prepare`), and the
custom_vjp around the kernels' forward and backward passes (calls.py).

Residuals of the backward: the inputs, G and the h_n (kd is the forward's only). The h_n are
B*H*(T/C)*K*V in the input dtype, 4x v's bytes at K=128, C=64; recomputing them instead saves
nothing under jit, where XLA merges the identical states kernels of the forward and the
backward and keeps h_n alive anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels import common

from . import calls
from .kernels import Static
from .tuning import Tuning, check, default_splits, default_tuning

F32 = jnp.float32


def reason(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None = None,
  *,
  scale: float | None = None,
  bonus: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  tuning: Tuning | None = None,
) -> str | None:
  """Why these arguments cannot be served by the kernels, or None (no tracing)."""
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
  tuning = tuning or Tuning()
  why = check(tuning)
  if why is None and tuning.state_splits and -(-q.shape[1] // tuning.chunk) % tuning.state_splits:
    why = f"state_splits={tuning.state_splits} does not divide the chunks of T={q.shape[1]}"
  return why


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _core(st, *args):
  o, hT, _ = calls.forward(st, calls.with_cumsum(st, args))
  return o, hT


def _core_fwd(st, *args):
  a = calls.with_cumsum(st, args)
  o, hT, hs = calls.forward(st, a)
  return (o, hT), ({n: x for n, x in a.items() if n != "kd"}, hs)  # kd: forward only


def _core_bwd(st, res, cts):
  a, hs = res
  do, dhT = cts
  do = do.astype(a["v"].dtype)
  dq, dk, dv, dg, dh0 = calls.with_sub(st, a, calls.backward, a, do, dhT.astype(F32), hs)
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
  u = a["u"] if st.tpu else a["u"][:, 0, :]  # broadcasts against [..., H, T|., K]
  q, k = f(a["q"]), f(a["k"])
  beta = jnp.sum(q * u * k, axis=-1, keepdims=True) * st.scale
  dbeta = jnp.sum(f(do) * f(a["v"]), axis=-1, keepdims=True) * st.scale
  du = jnp.sum(dbeta * q * k, axis=(0, 2) if st.tpu else (0, 1))
  grads = (f(dq) + dbeta * u * k, f(dk) + dbeta * u * q, f(dv) + beta * f(do))
  return (*(g.astype(x.dtype) for g, x in zip(grads, (dq, dk, dv))), du.reshape(a["u"].shape))


def prepare(
  q,
  k,
  v,
  log_decay,
  *,
  scale,
  bonus,
  initial_state,
  segment_ids,
  tuning,
  interpret,
  out_dtype,
  platform=None,
):
  """The static description and the padded kernel inputs (a dict keyed by calls.ARGS): T
  padded to whole chunks, K to a power of two, V to whole tiles; the log decay in float32;
  segment masks; in the platform's layout (see calls.py)."""
  tpu = common.resolve_platform(platform) == "tpu"
  b, t, h, k_dim = q.shape
  v_dim = v.shape[-1]
  kind = "none" if log_decay is None else ("scalar" if log_decay.ndim == 3 else "vector")
  tuning = tuning or default_tuning(b, h, k_dim, v_dim, kind)
  c = tuning.chunk
  tp = common.round_up(t, c)
  kp = common.next_pow2(k_dim, 16)
  bk = min(tuning.block_k, kp)
  vw = common.next_pow2(v_dim, 16)
  bv, bvo = min(tuning.block_v, vw), min(tuning.block_v_out, vw)
  while max(bv, bvo) > 16 and common.round_up(v_dim, max(bv, bvo)) > 1.5 * v_dim:
    bv, bvo = min(bv, max(bv, bvo) // 2), min(bvo, max(bv, bvo) // 2)  # V=129: tiles of 64
  vp = common.round_up(v_dim, max(bv, bvo))
  bkg = kp if kind == "scalar" or tuning.block_k_grad is None else min(tuning.block_k_grad, kp)
  if tpu:
    bk, bv, bvo, bkg = kp, vp, vp, kp
  splits = 1 if tpu else tuning.state_splits
  if splits is None:
    splits = default_splits(b * h * (kp // bk) * (vp // bv), tp // c)
  st = Static(
    kind=kind,
    exclusive=bonus is not None,
    segments=segment_ids is not None,
    scale=float(scale),
    chunk=c,
    sub=(tuning.sub or c) if kind == "vector" else c,
    choose_sub=kind == "vector" and tuning.sub is None and c > 16,
    interpret=bool(interpret),
    tpu=tpu,
    block_k=bk,
    block_v=bv,
    block_v_out=bvo,
    block_k_grad=bkg,
    splits=splits,
    out_dtype=out_dtype,
    tuning=tuning,
  )

  def pad(x, width):
    widths = [(0, 0), (0, tp - t), (0, 0)] + ([(0, width - x.shape[-1])] if x.ndim == 4 else [])
    return jnp.pad(x, widths)

  qp, kpd, vpd = pad(q, kp), pad(k, kp), pad(v, vp)
  g = None if log_decay is None else pad(log_decay.astype(F32), kp)
  u = None if bonus is None else jnp.pad(bonus.astype(F32), [(0, 0), (0, kp - k_dim)])[:, None]
  if initial_state is None:
    h0 = jnp.zeros((b, h, kp, vp), F32)
  else:
    h0 = jnp.pad(initial_state.astype(F32), [(0, 0), (0, 0), (0, kp - k_dim), (0, vp - v_dim)])
  seg = m0 = mk = None
  if segment_ids is not None:
    cs = common.canonical_segments(segment_ids)
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
  return st, dict(zip(calls.ARGS, (qp, kpd, vpd, g, u, h0, seg, m0, mk)))


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None = None,
  *,
  scale: float,
  bonus: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  tuning: Tuning | None = None,
  interpret: bool = False,
  out_dtype: jax.typing.DTypeLike | None = None,
  platform: str | None = None,
) -> tuple[jax.Array, jax.Array]:
  """Decayed linear attention; returns (o[B,T,H,V] in v's dtype, final_state[B,H,K,V] f32).

  log_decay: None | [B,T,H] | [B,T,H,K] float, <= 0. bonus: None or u[H,K]; when given the
  readout is RWKV-6's, o_t = scale (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t).
  initial_state: [B,H,K,V] float32 (zeros when None). segment_ids: [B,T] int; the state is
  reset to zero where the id changes. T, K and V need no particular size (padded here).
  out_dtype: dtype of o (default v's). platform: "gpu" (Triton) | "tpu" (Mosaic) | None (TPU
  when JAX's default backend is TPU); with interpret=True, the interpreter of that form.
  """
  why = reason(
    q,
    k,
    v,
    log_decay,
    scale=scale,
    bonus=bonus,
    initial_state=initial_state,
    segment_ids=segment_ids,
    tuning=tuning,
  )
  if why is not None:
    raise NotImplementedError(f"pallas linear_attention: {why}")
  st, a = prepare(
    q,
    k,
    v,
    log_decay,
    scale=scale,
    bonus=bonus,
    initial_state=initial_state,
    segment_ids=segment_ids,
    tuning=tuning,
    interpret=interpret,
    out_dtype=out_dtype,
    platform=platform,
  )
  o, hT = _core(st, *(a[n] for n in calls.ARGS))
  if st.tpu:
    o = jnp.swapaxes(o, 1, 2)
  t, k_dim, v_dim = q.shape[1], q.shape[-1], v.shape[-1]
  o = o[:, :t, :, :v_dim]
  hT = hT[:, :, :k_dim, :v_dim]
  return o, hT
