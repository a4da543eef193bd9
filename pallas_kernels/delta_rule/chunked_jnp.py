"""Chunked (WY) delta rule in pure JAX: the XLA twin of the Pallas kernels.

Recurrence (state S in R^{K x V}, per batch and head):
  S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
with a_t = exp(log_decay_t) (Gated DeltaNet; a_t = 1 for DeltaNet) and S_{t-1} := 0 where a
segment starts.

Within a chunk of C steps with entering state S0, write g_i = sum_{j<=i} log a_j (chunk-local,
<= 0) and u_i = beta_i (v_i - a_i S_{i-1}^T k_i), so that S_i = e^{g_i} S0 + sum_{j<=i}
e^{g_i - g_j} k_j u_j^T. Then u solves the unit lower-triangular system
  (I + A) U = diag(beta) V - diag(beta e^{g}) K S0,   A_ij = beta_i e^{g_i - g_j} k_i.k_j (j < i)
so with T = (I + A)^{-1} (the WY representation):
  W = T diag(beta e^{g}) K,   U~ = T diag(beta) V,   U = U~ - W S0,
  O = scale (diag(e^{g}) Q S0 + [(Q K^T) . e^{g_i - g_j}]_{j<=i} U),
  S_C = e^{g_C} S0 + (K . e^{g_C - g})^T U.
Every exponent is <= 0. Segment resets enter as masks: `run` counts the resets up to each
position, pairs (i, j) interact only within one run, and S0 reaches position i only when no
reset happened in the chunk up to i (`g0` = g there, -inf elsewhere).

Layouts here: q, k [B, Tp, H, K], v [B, Tp, H, V] (Tp a multiple of the chunk), per-position
gates [B, H, Tp] float32, run ids [B, Tp] float32, states [B, H, K, V] float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common


def chunk_size_for(seq_len: int, max_chunk: int = 64) -> int:
  """Power-of-two chunk in [16, max_chunk], no larger than needed for short sequences."""
  c = 16
  while c < max_chunk and c < seq_len:
    c *= 2
  return c


def prepare_gates(beta, log_decay, segment_ids, chunk: int):
  """Pads the per-position inputs to a multiple of `chunk` and builds the chunk-local gates.

  beta [B,T,H], log_decay [B,T,H] or None, segment_ids [B,T] or None. Returns
  (beta [B,H,Tp], g [B,H,Tp] | None, g0 [B,H,Tp] | None, run [B,Tp] | None), float32:
  g the within-chunk cumulative log decay, g0 the same where the entering state still reaches
  the position and -inf where a reset cut it off, run the reset count (segment run id).
  Padded steps have beta = 0 and log decay 0, so they leave the state unchanged.
  """
  b, t, h = beta.shape
  tp = -(-t // chunk) * chunk
  n = tp // chunk
  pad = tp - t
  beta = jnp.pad(beta.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
  beta = jnp.transpose(beta, (0, 2, 1))
  if log_decay is None and segment_ids is None:
    return beta, None, None, None
  if log_decay is None:
    g = jnp.zeros((b, h, tp), jnp.float32)
  else:
    ld = jnp.pad(log_decay.astype(jnp.float32), ((0, 0), (0, pad), (0, 0)))
    ld = jnp.transpose(ld, (0, 2, 1)).reshape(b, h, n, chunk)
    g = jnp.cumsum(ld, axis=-1).reshape(b, h, tp)
  if segment_ids is None:
    return beta, g, g, None
  reset = jnp.pad(common.segment_starts(segment_ids), ((0, 0), (0, pad)))
  run = jnp.cumsum(reset.astype(jnp.int32), axis=1)  # [B, Tp]
  run_c = run.reshape(b, n, chunk)
  run_in = run_c[:, :, 0] - reset.reshape(b, n, chunk)[:, :, 0].astype(jnp.int32)
  reach = (run_c == run_in[:, :, None]).reshape(b, 1, tp)  # S0 reaches i
  g0 = jnp.where(reach, g, -jnp.inf)
  return beta, g, g0, run.astype(jnp.float32)


def _dot(a, b, spec, precision):
  return jnp.einsum(spec, a, b, precision=precision, preferred_element_type=jnp.float32)


def chunked(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  beta: jax.Array,
  g: jax.Array | None,
  g0: jax.Array | None,
  run: jax.Array | None,
  initial_state: jax.Array,
  *,
  scale: float,
  chunk: int,
) -> tuple[jax.Array, jax.Array]:
  """Chunked delta rule on prepared inputs (`prepare_gates`; q, k, v padded to Tp); returns
  (o [B,Tp,H,V] in v.dtype, S [B,H,K,V] f32)."""
  b, tp, h, dk = q.shape
  dv = v.shape[-1]
  n = tp // chunk
  cd = q.dtype
  precision = lax.Precision.HIGHEST if cd == jnp.float32 else None

  def split(x):  # [B, Tp, H, D] -> [B, H, N, C, D]
    return jnp.transpose(x.reshape(b, n, chunk, h, x.shape[-1]), (0, 3, 1, 2, 4))

  qc, kc, vc = split(q), split(k), split(v)
  bc = beta.reshape(b, h, n, chunk)
  idx = jnp.arange(chunk)
  strict = idx[:, None] > idx[None, :]
  incl = idx[:, None] >= idx[None, :]
  if run is not None:
    rc = run.reshape(b, 1, n, chunk)
    same = rc[..., :, None] == rc[..., None, :]
    strict, incl = strict & same, incl & same

  if g is not None:
    gc = g.reshape(b, h, n, chunk)
    g0c = g0.reshape(b, h, n, chunk)
    diff = gc[..., :, None] - gc[..., None, :]
    decay_strict = jnp.exp(jnp.where(strict, diff, 0.0))
    decay_incl = jnp.exp(jnp.where(incl, diff, 0.0))
    gate0 = jnp.exp(g0c)  # e^{g_i}, 0 after a reset
    end = jnp.exp(gc[..., -1:] - gc)  # e^{g_C - g_j}
    if run is not None:
      end = jnp.where(rc == rc[..., -1:], end, 0.0)
    gate_end = jnp.exp(g0c[..., -1])  # [B, H, N]
  else:
    decay_strict = decay_incl = 1.0
    gate0 = jnp.ones((b, h, n, chunk), jnp.float32)
    end = jnp.ones((b, h, n, chunk), jnp.float32)
    gate_end = jnp.ones((b, h, n), jnp.float32)

  kk = _dot(kc, kc, "bhnik,bhnjk->bhnij", precision)
  a = jnp.where(strict, bc[..., :, None] * kk * decay_strict, 0.0)
  eye = jnp.eye(chunk, dtype=jnp.float32)
  tinv = jax.scipy.linalg.solve_triangular(
    eye + a, jnp.broadcast_to(eye, a.shape), lower=True, unit_diagonal=True
  )
  hp = lax.Precision.HIGHEST
  w = _dot(tinv, kc.astype(jnp.float32) * (bc * gate0)[..., None], "bhnij,bhnjk->bhnik", hp)
  u_tilde = _dot(tinv, vc.astype(jnp.float32) * bc[..., None], "bhnij,bhnjv->bhniv", hp)
  kend = kc.astype(jnp.float32) * end[..., None]

  def body(state, xs):
    w_n, ut_n, kend_n, ge_n = xs
    u_n = ut_n - _dot(w_n, state, "bhik,bhkv->bhiv", hp)
    new = ge_n[..., None, None] * state + _dot(kend_n, u_n, "bhik,bhiv->bhkv", hp)
    return new, (state, u_n)

  move = lambda x: jnp.moveaxis(x, 2, 0)
  s0 = initial_state.astype(jnp.float32)
  final, (states, u) = lax.scan(body, s0, (move(w), move(u_tilde), move(kend), move(gate_end)))
  states, u = jnp.moveaxis(states, 0, 2), jnp.moveaxis(u, 0, 2)  # [B,H,N,K,V], [B,H,N,C,V]

  qk = _dot(qc, kc, "bhnik,bhnjk->bhnij", precision)
  p = jnp.where(incl, qk * decay_incl, 0.0)
  o = gate0[..., None] * _dot(qc.astype(jnp.float32), states, "bhnik,bhnkv->bhniv", hp)
  o = scale * (o + _dot(p, u, "bhnij,bhnjv->bhniv", hp))
  o = jnp.transpose(o, (0, 2, 3, 1, 4)).reshape(b, tp, h, dv).astype(v.dtype)
  return o, final
