"""Blockwise softmax attention in pure JAX: the XLA twin of the flash forward kernel.

The algorithm of `kernels.fwd_kernel` on whole query rows: a lax.scan over blocks of
`block_k` keys carries the float32 output accumulator, the running row max and the running
sum of exponentials (online softmax), so no [Tq, Tk] buffer is formed. Logits are base 2
(s2 = log2(e) * scale * q.k, or log2(e) * softcap * tanh(scale * q.k / softcap)); the masks
are `schedule.visible` (causal, window, segments, empty cache slots) and the block mask.
Gradients come from autodiff through the scan with each step rematerialised
(jax.checkpoint): the backward keeps the carries between key blocks, not their probabilities.
The running max is a constant shift of the exponents that cancels in o and lse, so no
gradient flows through it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import common

from .kernels import LN2, LOG2E
from .schedule import visible

F32 = jnp.float32


def chunked(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  causal: bool = False,
  window: int | tuple[int, int] | None = None,
  segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  softcap: float | None = None,
  block_mask: jax.Array | None = None,
  block_mask_size: tuple[int, int] | None = None,
  return_lse: bool = False,
  block_k: int = 128,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Softmax attention with the arguments of `flash_attention` (`block_k`: keys per step).

  Returns o[B,Tq,H,Dv] in v's dtype (and lse[B,Tq,H] float32, natural log, -inf on rows that
  see nothing, when return_lse)."""
  batch, tq, heads, d = q.shape
  tk, kv_heads, dv = k.shape[1], k.shape[2], v.shape[-1]
  groups = heads // kv_heads
  if isinstance(window, int):
    window = (window, 0)
  bk = min(block_k, tk)
  n = -(-tk // bk)
  pad = n * bk - tk
  if q_positions is None:
    q_positions = jnp.arange(tq, dtype=jnp.int32)[None]
  if kv_positions is None:
    kv_positions = jnp.arange(tk, dtype=jnp.int32)[None]

  def blocks(x, value=0):  # [B, Tk, ...] -> [N, B, bk, ...], padded with `value`
    x = jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)
    return jnp.moveaxis(x.reshape(x.shape[0], n, bk, *x.shape[2:]), 1, 0)

  q_seg = kv_seg = None
  if segment_ids is not None:
    q_seg = segment_ids[:, None, None, :, None]
    kv_seg = blocks(segment_ids if kv_segment_ids is None else kv_segment_ids)
  user = None
  if block_mask is not None:
    rows = jnp.arange(tq) // block_mask_size[0]
    user = jnp.asarray(block_mask, bool)[:, rows]  # [B|1, Tq, nkb]
  scale = jnp.broadcast_to(jnp.asarray(scale, F32).reshape(-1), (heads,))
  scale = scale.reshape(1, kv_heads, groups, 1, 1)
  precision = lax.Precision.HIGHEST if q.dtype == F32 else None
  qg = jnp.moveaxis(q.reshape(batch, tq, kv_heads, groups, d), 1, 3)  # [B, Hkv, G, Tq, D]
  q_pos = q_positions[:, None, None, :, None]

  def step(carry, x):
    acc, m, l = carry
    kb, vb, kp, ks, j = x
    qk = jnp.einsum("bhgqd,bkhd->bhgqk", qg, kb, precision=precision, preferred_element_type=F32)
    if softcap is None:
      s2 = qk * (scale * LOG2E)
    else:
      s2 = jnp.tanh(qk * (scale / softcap)) * (softcap * LOG2E)
    ks = None if ks is None else ks[:, None, None, None, :]
    mask = visible(q_pos, kp[:, None, None, None, :], q_seg, ks, causal=causal, window=window)
    if user is not None:
      cols = jnp.minimum((j * bk + jnp.arange(bk)) // block_mask_size[1], user.shape[-1] - 1)
      mask &= user[:, None, None][..., cols]
    s2 = jnp.where(mask, s2, -jnp.inf)
    m_new = lax.stop_gradient(jnp.maximum(m, s2.max(axis=-1)))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a row may still have seen nothing
    p = jnp.exp2(s2 - m_use[..., None])
    alpha = jnp.exp2(m - m_use)
    l = l * alpha + p.sum(axis=-1)
    acc = acc * alpha[..., None] + jnp.einsum(
      "bhgqk,bkhd->bhgqd", p.astype(v.dtype), vb, precision=precision, preferred_element_type=F32
    )
    return (acc, m_new, l), None

  stat = (batch, kv_heads, groups, tq)
  carry = (jnp.zeros(stat + (dv,), F32), jnp.full(stat, -jnp.inf, F32), jnp.zeros(stat, F32))
  (acc, m, l), _ = lax.scan(
    jax.checkpoint(step),
    carry,
    (
      blocks(k),
      blocks(v),
      blocks(jnp.asarray(kv_positions, jnp.int32), common.EMPTY),
      kv_seg,
      jnp.arange(n),
    ),
  )
  empty = l == 0.0
  l = jnp.where(empty, 1.0, l)
  o = jnp.moveaxis(acc / l[..., None], 3, 1).reshape(batch, tq, heads, dv).astype(v.dtype)
  if not return_lse:
    return o
  lse = jnp.where(empty, -jnp.inf, (m + jnp.log2(l)) * LN2)
  return o, jnp.moveaxis(lse, 3, 1).reshape(batch, tq, heads)
