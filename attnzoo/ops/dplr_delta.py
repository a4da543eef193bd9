"""Generalised (diagonal-plus-low-rank) delta rule of RWKV-7 (Peng et al. 2025, "RWKV-7 "Goose"
with Expressive Dynamic State Evolution"), layout BTHD.

dplr_delta(r[B,T,H,K], k[B,T,H,K], v[B,T,H,V], log_decay[B,T,H,K], a[B,T,H,K], b[B,T,H,K], *,
           scale, ...) -> o[B,T,H,V]  (or (o, final_state[B,H,K,V] float32))

Per batch and head, with state S in R^{K x V} (the transpose of the paper's V x K state):
  S_t = (diag(w_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T r_t,
w_t = exp(log_decay_t) a vector decay (log_decay <= 0). The paper's update
S_t = S_{t-1} (diag(w_t) + a_t b_t^T) + v_t k_t^T with a = -kappa_hat and b = kappa_hat * alpha
(alpha the in-context learning rate) is this one transposed; RWKV-7 uses scale 1.
`initial_state` is S_{-1}; where `segment_ids` changes between t-1 and t, S_{t-1} := 0.

Forms: `reference` (a lax.scan over the explicit K x K transition matrices, float32: the
ground truth), `recurrent` (a lax.scan of the rank-1 `step`, float32) and "xla" (chunked: within
a chunk of C steps with entering state S0, g_i = sum_{j<=i} log w_j (chunk-local) and
u_i = a_i^T S_{i-1} [V], so S_i = e^{g_i} S0 + sum_{j<=i} e^{g_i - g_j} (b_j u_j^T + k_j v_j^T);
then u solves the unit lower-triangular system
  (I - A_ab) U = A~ S0 + A_ak V,  A_ab[i,j] = sum_c a_ic b_jc e^{g_{i-1,c} - g_jc} (j < i),
A_ak likewise with k, A~_i = a_i e^{g_{i-1}};
  O = scale (R~ S0 + Q_b U + Q_k V),  Q_b[i,j] = sum_c r_ic b_jc e^{g_ic - g_jc} (j <= i),
  S_C = e^{g_C} S0 + sum_j e^{g_C - g_j} (b_j u_j^T + k_j v_j^T);
every exponent is <= 0, the pairwise decays are materialised per chunk [C,C,K], matmuls and the
solve run in float32, the state is float32 and carried across chunks by a lax.scan).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts
from pallas_kernels import common

F32 = jnp.float32
_HI = lax.Precision.HIGHEST
CHUNK = 16

dispatcher = Dispatcher(
  "dplr_delta",
  auto_order={"cpu": ("recurrent", "xla"), "default": ("xla",)},
)


def init_state(batch: int, heads: int, key_dim: int, value_dim: int) -> jax.Array:
  """Zero recurrent state [B, H, K, V] float32."""
  return jnp.zeros((batch, heads, key_dim, value_dim), F32)


def step(
  state: jax.Array,
  r: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array,
  a: jax.Array,
  b: jax.Array,
  *,
  scale: float,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step. state [B,H,K,V] f32; r, k, log_decay, a, b [B,H,K]; v [B,H,V]; reset
  [B] bool (a new segment starts: the state is zeroed first) or None.
  Returns (new state [B,H,K,V] f32, o [B,H,V] in v.dtype)."""
  f32 = lambda x: x.astype(F32)
  s = state.astype(F32)
  if reset is not None:
    s = jnp.where(reset[:, None, None, None], 0.0, s)
  sa = jnp.einsum("bhkv,bhk->bhv", s, f32(a), precision=_HI)
  s = jnp.exp(f32(log_decay))[..., None] * s + f32(b)[..., :, None] * sa[..., None, :]
  s = s + f32(k)[..., :, None] * f32(v)[..., None, :]
  o = scale * jnp.einsum("bhkv,bhk->bhv", s, f32(r), precision=_HI)
  return s, o.astype(v.dtype)


def _time_major(*xs):
  return tuple(jnp.moveaxis(x, 1, 0) for x in xs)


def _scan(body, r, k, v, log_decay, a, b, initial_state, segment_ids, return_final_state):
  bsz, t, h, dk = r.shape
  s0 = init_state(bsz, h, dk, v.shape[-1]) if initial_state is None else initial_state
  reset = jnp.zeros((bsz, t), bool) if segment_ids is None else segment_starts(segment_ids)
  xs = _time_major(*(x.astype(F32) for x in (r, k, v, log_decay, a, b)), reset)
  final, o = lax.scan(body, s0.astype(F32), xs)
  o = jnp.moveaxis(o, 0, 1)
  return (o, final) if return_final_state else o


def recurrent(
  r: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array,
  a: jax.Array,
  b: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The token-by-token recurrence: a lax.scan of `step`, float32 outputs."""

  def body(s, x):
    *inputs, reset = x
    return step(s, *inputs, scale=scale, reset=reset)

  return _scan(body, r, k, v, log_decay, a, b, initial_state, segment_ids, return_final_state)


def reference(
  r: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array,
  a: jax.Array,
  b: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The definition, naively: S_t = M_t S_{t-1} + k_t v_t^T with the explicit transition
  M_t = diag(w_t) + b_t a_t^T [K,K], in float32 (the ground truth)."""

  def body(s, x):
    rt, kt, vt, lt, at, bt, reset = x
    s = jnp.where(reset[:, None, None, None], 0.0, s)
    m = (
      jnp.exp(lt)[..., :, None] * jnp.eye(lt.shape[-1], dtype=F32)
      + bt[..., :, None] * at[..., None, :]
    )
    s = jnp.einsum("bhij,bhjv->bhiv", m, s, precision=_HI) + kt[..., :, None] * vt[..., None, :]
    return s, scale * jnp.einsum("bhkv,bhk->bhv", s, rt, precision=_HI)

  return _scan(body, r, k, v, log_decay, a, b, initial_state, segment_ids, return_final_state)


def _dot(spec, x, y):
  return jnp.einsum(spec, x, y, precision=_HI, preferred_element_type=F32)


def chunked(
  r: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array,
  a: jax.Array,
  b: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  chunk: int = CHUNK,
) -> tuple[jax.Array, jax.Array]:
  """The chunked form of the module docstring; returns (o [B,T,H,V] in v.dtype, S [B,H,K,V] f32).
  Padded steps have w = 1 and k = v = a = b = 0, so they leave the state unchanged."""
  bsz, t, h, dk = r.shape
  dv = v.shape[-1]
  tp = common.round_up(t, chunk)
  n = tp // chunk

  def split(x):  # [B,T,H,D] -> [B,H,N,C,D] float32, zero-padded
    x = jnp.pad(x.astype(F32), ((0, 0), (0, tp - t), (0, 0), (0, 0)))
    return jnp.transpose(x.reshape(bsz, n, chunk, h, x.shape[-1]), (0, 3, 1, 2, 4))

  rc, kc, vc, ac, bc = (split(x) for x in (r, k, v, a, b))
  g = jnp.cumsum(split(log_decay), axis=3)  # g_i, chunk-local, [B,H,N,C,K]
  g_prev = g - split(log_decay)  # g_{i-1}
  idx = jnp.arange(chunk)
  strict = idx[:, None] > idx[None, :]
  incl = idx[:, None] >= idx[None, :]
  reach = end_mask = None
  if segment_ids is not None:
    reset = jnp.pad(segment_starts(segment_ids), ((0, 0), (0, tp - t))).reshape(bsz, n, chunk)
    run = jnp.cumsum(reset.astype(jnp.int32), axis=2)  # resets inside the chunk up to i
    same = run[..., :, None] == run[..., None, :]  # [B,N,C,C]
    strict, incl = (strict & same)[:, None], (incl & same)[:, None]
    reach = (run == 0)[:, None, :, :, None]  # S0 reaches position i
    end_mask = (run == run[..., -1:])[:, None, :, :, None]  # j reaches the chunk's end

  def pairwise(x, y, gx, mask):  # sum_c x_ic y_jc e^{gx_ic - g_jc}, masked: [B,H,N,C,C]
    diff = gx[..., :, None, :] - g[..., None, :, :]
    decay = jnp.exp(jnp.where(mask[..., None], diff, 0.0))
    return jnp.where(mask, jnp.sum(x[..., :, None, :] * y[..., None, :, :] * decay, -1), 0.0)

  a_ab, a_ak = pairwise(ac, bc, g_prev, strict), pairwise(ac, kc, g_prev, strict)
  q_b, q_k = pairwise(rc, bc, g, incl), pairwise(rc, kc, g, incl)
  a_start, r_start = ac * jnp.exp(g_prev), rc * jnp.exp(g)
  if reach is not None:
    a_start, r_start = jnp.where(reach, a_start, 0.0), jnp.where(reach, r_start, 0.0)
  eye = jnp.eye(chunk, dtype=F32)
  tinv = lax.linalg.triangular_solve(
    eye - a_ab, jnp.broadcast_to(eye, a_ab.shape), left_side=True, lower=True, unit_diagonal=True
  )
  w_s0 = _dot("bhnij,bhnjk->bhnik", tinv, a_start)  # U = W S0 + U~
  u_tilde = _dot("bhnij,bhnjv->bhniv", tinv, _dot("bhnij,bhnjv->bhniv", a_ak, vc))
  to_end = jnp.exp(g[..., -1:, :] - g)
  if end_mask is not None:
    to_end = jnp.where(end_mask, to_end, 0.0)
  b_end, k_end = bc * to_end, kc * to_end
  gate_end = jnp.exp(g[..., -1, :])  # [B,H,N,K]
  if reach is not None:
    gate_end = jnp.where(reach[..., -1, :], gate_end, 0.0)
  kv_end = _dot("bhnik,bhniv->bhnkv", k_end, vc)

  def body(state, xs):
    w_n, ut_n, b_n, kv_n, ge_n = xs
    u_n = ut_n + _dot("bhik,bhkv->bhiv", w_n, state)
    new = ge_n[..., None] * state + _dot("bhik,bhiv->bhkv", b_n, u_n) + kv_n
    return new, (state, u_n)

  move = lambda x: jnp.moveaxis(x, 2, 0)
  s0 = init_state(bsz, h, dk, dv) if initial_state is None else initial_state.astype(F32)
  final, (states, u) = lax.scan(
    body, s0, (move(w_s0), move(u_tilde), move(b_end), move(kv_end), move(gate_end))
  )
  states, u = jnp.moveaxis(states, 0, 2), jnp.moveaxis(u, 0, 2)
  o = _dot("bhnik,bhnkv->bhniv", r_start, states)
  o = o + _dot("bhnij,bhnjv->bhniv", q_b, u) + _dot("bhnij,bhnjv->bhniv", q_k, vc)
  o = scale * jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(bsz, tp, h, dv)[:, :t]
  return o.astype(v.dtype), final


def _canonical(r, k, v, log_decay, a, b, *, scale, initial_state, segment_ids):
  if r.ndim != 4 or v.ndim != 4 or v.shape[:3] != r.shape[:3]:
    raise ValueError(f"dplr_delta wants r [B,T,H,K] and v [B,T,H,V]; got r{r.shape} v{v.shape}")
  for name, x in (("k", k), ("log_decay", log_decay), ("a", a), ("b", b)):
    if x.shape != r.shape:
      raise ValueError(f"dplr_delta: {name} must be [B,T,H,K]={r.shape}, got {x.shape}")
  bsz, t, h, dk = r.shape
  state_shape = (bsz, h, dk, v.shape[-1])
  if initial_state is not None and initial_state.shape != state_shape:
    raise ValueError(
      f"dplr_delta: initial_state must be [B,H,K,V]={state_shape}, got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (bsz, t):
    raise ValueError(f"dplr_delta: segment_ids must be [B,T]={bsz, t}, got {segment_ids.shape}")
  if scale is None:
    raise ValueError("dplr_delta: pass `scale` explicitly (RWKV-7 uses 1.0)")
  return dict(
    r=r,
    k=k,
    v=v,
    log_decay=log_decay,
    a=a,
    b=b,
    scale=scale,
    initial_state=initial_state,
    segment_ids=segment_ids,
  )


@dispatcher.register("recurrent")
def _recurrent(**args):
  o, final = recurrent(**args, return_final_state=True)
  return o.astype(args["v"].dtype), final


@dispatcher.register("xla")
def _xla(**args):
  return chunked(**args)


def dplr_delta(
  r: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array,
  a: jax.Array,
  b: jax.Array,
  *,
  scale: float,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The generalised delta rule; see the module docstring. implementation: "auto" | "xla"
  (chunked) | "recurrent" (the float32 scan; "auto" takes it on CPU)."""
  args = _canonical(
    r,
    k,
    v,
    log_decay,
    a,
    b,
    scale=scale,
    initial_state=initial_state,
    segment_ids=segment_ids,
  )
  o, final = dispatcher(implementation, **args)
  return (o, final) if return_final_state else o
