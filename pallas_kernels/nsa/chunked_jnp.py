"""The NSA selected-attention forward kernel's algorithm in pure JAX (the op's "xla" path): a
lax.scan over the n selection slots gathers one block of keys per (token, kv head) at a time
and carries the online softmax (float32 accumulator, row max, sum), so memory is one block per
token ([B,T,Hkv,block,D]) rather than all n. Gradients by autodiff through the scan, each step
rematerialised (jax.checkpoint); the running max is a constant shift that gets no gradient."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

F32 = jnp.float32


def chunked(q, k, v, indices, *, q_positions, scale: float, block: int):
  """The arguments ([B,T,H,D] q, [B,Tk,Hkv,D] k, v, [B,T,Hkv,n] indices, [B,T] q_positions) and
  results (o [B,T,H,Dv], lse [B,T,H]) of `selected_attention` (op.py)."""
  batch, t, heads, d = q.shape
  tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  groups = heads // kv_heads
  nb = -(-tk // block)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, nb * block - tk), (0, 0), (0, 0)))
  kb = pad(k).reshape(batch, nb, block, kv_heads, d)
  vb = pad(v).reshape(batch, nb, block, kv_heads, dv)
  rows = jnp.arange(batch)[:, None, None]
  heads_ = jnp.arange(kv_heads)[None, None, :]
  qg = q.reshape(batch, t, kv_heads, groups, d)
  precision = lax.Precision.HIGHEST if q.dtype == F32 else None
  qpos = q_positions[:, :, None, None, None]

  def step(carry, blk):  # blk [B, T, Hkv]
    acc, m, l = carry
    safe = jnp.maximum(blk, 0)
    ks, vs = kb[rows, safe, :, heads_], vb[rows, safe, :, heads_]  # [B,T,Hkv,block,D]
    kpos = (safe[..., None] * block + jnp.arange(block))[:, :, :, None, :]
    vis = (blk >= 0)[..., None, None] & (kpos <= qpos) & (kpos < tk)
    s = jnp.einsum("btgzd,btgkd->btgzk", qg, ks, precision=precision, preferred_element_type=F32)
    s = jnp.where(vis, s * scale, -jnp.inf)
    m_new = lax.stop_gradient(jnp.maximum(m, s.max(-1)))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp(s - m_use[..., None])
    alpha = jnp.exp(m - m_use)
    pv = jnp.einsum(
      "btgzk,btgke->btgze", p.astype(v.dtype), vs, precision=precision, preferred_element_type=F32
    )
    return (acc * alpha[..., None] + pv, m_new, l * alpha + p.sum(-1)), None

  stat = (batch, t, kv_heads, groups)
  carry = (jnp.zeros(stat + (dv,), F32), jnp.full(stat, -jnp.inf, F32), jnp.zeros(stat, F32))
  (acc, m, l), _ = lax.scan(jax.checkpoint(step), carry, jnp.moveaxis(indices, -1, 0))
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o = (acc / l[..., None]).reshape(batch, t, heads, dv).astype(v.dtype)
  lse = jnp.where(empty, -jnp.inf, m + jnp.log(l)).reshape(batch, t, heads)
  return o, lse
