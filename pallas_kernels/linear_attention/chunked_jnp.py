"""Chunked decayed linear attention in pure JAX: the XLA twin of the Pallas kernels.

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,  o_t = scale * S_t^T q_t,  log a_t = g_t <= 0
  exclusive (RWKV-6 readout, with `bonus`): o_t = scale * (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t)

The chunkwise form of kernels.py: intra-chunk scores from chunk-local cumulative decays (for
vector decay per 16-row sub-block, referenced to its middle row and clamped at e^CLAMP), the
chunks' entering states by a lax.scan, matmuls in the input dtype, states in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

F32 = jnp.float32
CLAMP = 80.0  # largest positive exponent of either side of the vector-decay sub-block trick


def _decay_kind(log_decay):
  if log_decay is None:
    return "none"
  return "scalar" if log_decay.ndim == 3 else "vector"


def _core(q, k, v, g, *, scale, exclusive, h0, seg, chunk):
  """The chunkwise form without the bonus term: (o float32, final state)."""
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  c = chunk
  tp = -(-t // c) * c
  n = tp // c
  dt = q.dtype
  pad = lambda x: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2))
  q, k, v = pad(q), pad(k), pad(v)
  q = q.reshape(b, n, c, h, kd)
  k = k.reshape(b, n, c, h, kd)
  v = v.reshape(b, n, c, h, vd)
  kind = _decay_kind(g)
  if kind != "none":
    g = pad(g.astype(F32)).reshape(b, n, c, *g.shape[2:])
    G = jnp.cumsum(g, axis=2)
    Gq = G - g if exclusive else G
    if kind == "scalar":
      G, Gq = G[..., None], Gq[..., None]  # [B,N,C,H,1]
  seg = jnp.zeros((b, t), jnp.int32) if seg is None else seg
  cs = jnp.pad(seg, [(0, 0), (0, tp - t)], mode="edge").reshape(b, n, c)
  prev = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), cs[:, :-1, -1]], axis=1)  # [B,N]
  m0 = (cs == prev[..., None])[..., None, None]  # [B,N,C,1,1]
  mk = (cs == cs[..., -1:])[..., None, None]
  passes = (cs[..., -1] == prev)[..., None, None, None]  # [B,N,1,1,1]
  i = jnp.arange(c)[:, None]
  j = jnp.arange(c)[None, :]
  causal = j < i if exclusive else j <= i
  mask = (causal & (cs[..., :, None] == cs[..., None, :]))[:, :, None]  # [B,N,1,C,C]
  # intra-chunk scores [B,N,H,C,C]
  if kind == "vector":
    s = min(16, c)
    gq = Gq.reshape(b, n, c // s, s, h, kd)
    # reference row: the output does not depend on it, so no gradient flows through it
    r = lax.stop_gradient(gq[:, :, :, s // 2 - 1 : s // 2])  # [B,N,M,1,H,K] middle row
    qf = q.reshape(b, n, c // s, s, h, kd) * jnp.exp(jnp.minimum(gq - r, CLAMP))
    kf = k[:, :, None] * jnp.exp(jnp.minimum(r - G[:, :, None], CLAMP))  # [B,N,M,C,H,K]
    sc = jnp.einsum(
      "bnmihk,bnmjhk->bnhmij", qf.astype(dt), kf.astype(dt), preferred_element_type=F32
    ).reshape(b, n, h, c, c)
    sc = jnp.where(mask, sc, 0.0)
  else:
    sc = jnp.einsum("bnihk,bnjhk->bnhij", q, k, preferred_element_type=F32)
    if kind == "scalar":
      gi = Gq[..., 0].transpose(0, 1, 3, 2)  # [B,N,H,C]
      gj = G[..., 0].transpose(0, 1, 3, 2)
      diff = jnp.where(mask, gi[..., :, None] - gj[..., None, :], 0.0)
      sc = sc * jnp.exp(diff)
    sc = jnp.where(mask, sc, 0.0)
  o = jnp.einsum("bnhij,bnjhv->bnihv", (sc * scale).astype(dt), v, preferred_element_type=F32)
  # chunk states
  kdec = k.astype(F32) * mk
  if kind != "none":
    gam = G[:, :, -1:]  # [B,N,1,H,K|1]
    kdec = kdec * jnp.exp(gam - G)
    carry = jnp.exp(gam[:, :, 0])[..., None] * passes  # [B,N,H,K|1,1]
  else:
    carry = passes.astype(F32)
  st = jnp.einsum("bnjhk,bnjhv->bnhkv", kdec.astype(dt), v, preferred_element_type=F32)

  def scan_fn(hc, x):
    st_n, carry_n = x
    return carry_n * hc + st_n, hc

  h0 = jnp.zeros((b, h, kd, vd), F32) if h0 is None else h0.astype(F32)
  hT, hs = lax.scan(scan_fn, h0, (st.swapaxes(0, 1), carry.swapaxes(0, 1)))
  hs = hs.swapaxes(0, 1)  # [B,N,H,K,V] entering
  qd = q.astype(F32) * m0
  if kind != "none":
    qd = qd * jnp.exp(Gq)
  o = o + scale * jnp.einsum(
    "bnihk,bnhkv->bnihv", qd.astype(dt), hs.astype(dt), preferred_element_type=F32
  )
  return o.reshape(b, tp, h, vd)[:, :t], hT


def chunked(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None = None,
  *,
  scale: float,
  bonus: jax.Array | None = None,
  initial_state: jax.Array | None = None,
  segment_ids: jax.Array | None = None,
  chunk: int = 64,
) -> tuple[jax.Array, jax.Array]:
  """Decayed linear attention, chunkwise in pure jnp; the arguments of `linear_attention`.
  Returns (o [B,T,H,V] float32, final_state [B,H,K,V] float32)."""
  seg = None if segment_ids is None else common.canonical_segments(segment_ids)
  o, hT = _core(
    q,
    k,
    v,
    log_decay,
    scale=scale,
    exclusive=bonus is not None,
    h0=initial_state,
    seg=seg,
    chunk=chunk,
  )
  if bonus is not None:
    beta = jnp.einsum("bthk,hk,bthk->bth", q.astype(F32), bonus.astype(F32), k.astype(F32))
    o = o + scale * beta[..., None] * v.astype(F32)
  return o, hT
