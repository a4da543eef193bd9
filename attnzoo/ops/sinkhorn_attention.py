"""Sinkhorn attention (Sander et al. 2022, "Sinkformers: Transformers with Doubly Stochastic
Attention"): the kernel exp(q·k·scale) is scaled by Sinkhorn's algorithm towards a doubly
stochastic matrix instead of only row-normalised. In the log domain (ε = 1, uniform marginals,
as the Sinkformers code), starting from u = w = 0, iteration i updates

  i even: u_a = -LSE_b(L_ab + w_b)    (rows sum to 1)
  i odd:  w_b = -LSE_a(L_ab + u_a)    (columns sum to 1)

and P = exp(L + u + w); one iteration is softmax, the paper's NLP runs use 3. Masked entries
stay out of every sum (an empty row or column gets no mass).

Causal treatment (ours; the paper covers encoders): the column step of one matrix would let a
row see later queries, so with causal=True the output of the query at position p is row p of
Sinkhorn run on the square block of the queries and keys at positions <= p (same segment):
doubly stochastic over the prefix, O(T^2) per query, and exactly causal. Its rows come from
`kv_queries` [B,Tk,H,D], the queries at the key positions (q itself when Tq = Tk; the cached
queries when decoding). causal=False runs one Sinkhorn over the whole [Tq, Tk] matrix (within
segments).

Forms: `reference` (every prefix block at once, [B,H,Tq,Tk,Tk]) and "xla" (`lax.map` over
queries, 8 at a time, rematerialised: [8,B,H,Tk,Tk] memory). Layout BTHD; Hkv divides H
(grouped queries).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import EMPTY

F32 = jnp.float32
NEG = -1e30

dispatcher = Dispatcher("sinkhorn_attention", auto_order={"default": ("xla",)})


def sinkhorn(logits: jax.Array, mask: jax.Array, n_iter: int) -> jax.Array:
  """P over the last two axes of logits [..., R, C] (mask broadcast to them) after n_iter
  alternating row / column normalisations in the log domain; 0 where masked."""
  logits = logits.astype(F32)
  u = jnp.zeros(logits.shape[:-1], F32)
  w = jnp.zeros(logits.shape[:-2] + logits.shape[-1:], F32)
  lse = lambda x, axis: jax.nn.logsumexp(jnp.where(mask, x, NEG), axis=axis)
  rows = lambda w: -lse(logits + w[..., None, :], -1)
  columns = lambda u: -lse(logits + u[..., None], -2)

  def both(_, uw):
    u = rows(uw[1])
    return u, columns(u)

  u, w = lax.fori_loop(0, n_iter // 2, both, (u, w))
  if n_iter % 2:
    u = rows(w)
  return jnp.where(
    mask, jnp.exp(jnp.where(mask, logits + u[..., None] + w[..., None, :], NEG)), 0.0
  )


def _canonical(q, k, v, kv_queries, q_positions, kv_positions, segment_ids, causal, n_iter):
  if q.ndim != 4 or k.ndim != 4 or v.shape[:3] != k.shape[:3] or q.shape[-1] != k.shape[-1]:
    raise ValueError(f"sinkhorn_attention wants BTHD q, k, v; got {q.shape}, {k.shape}, {v.shape}")
  if q.shape[2] % k.shape[2]:
    raise ValueError(f"sinkhorn_attention: kv heads ({k.shape[2]}) must divide ({q.shape[2]})")
  if n_iter < 1:
    raise ValueError(f"sinkhorn_attention: n_iter must be >= 1, got {n_iter}")
  b, tq, tk = q.shape[0], q.shape[1], k.shape[1]
  if kv_queries is None:
    if causal and tq != tk:
      raise ValueError("sinkhorn_attention: causal with Tq != Tk needs kv_queries")
    kv_queries = q
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (b, tq))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (b, tk))
  if segment_ids is not None and tq != tk:
    raise ValueError("sinkhorn_attention: segment_ids need Tq = Tk")
  return kv_queries, q_positions, kv_positions


def _heads(q, k, v, kv_queries):
  groups = q.shape[2] // k.shape[2]
  rep = lambda x: jnp.repeat(x.astype(F32), groups, axis=2)
  return q.astype(F32), rep(k), rep(v), kv_queries.astype(F32)


def _bidirectional(q, k, v, scale, n_iter, segment_ids, kv_positions):
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale
  mask = (kv_positions != EMPTY)[:, None, None, :]
  if segment_ids is not None:
    mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
  return sinkhorn(logits, mask, n_iter)


def _prefix_row(logits, kv_ok, kv_pos, kv_seg, q_pos, q_seg, n_iter):
  """Row of one query (position q_pos, segment q_seg) of Sinkhorn over its prefix block.
  logits [B,H,Tk,Tk] (kv_queries x keys); kv_* [B,Tk]; q_* [B]. Returns [B,H,Tk]."""
  inside = kv_ok & (kv_pos <= q_pos[:, None]) & (kv_seg == q_seg[:, None])  # [B,Tk]
  mask = (inside[:, :, None] & inside[:, None, :])[:, None]
  p = sinkhorn(logits, mask, n_iter)
  me = (kv_pos == q_pos[:, None]) & inside  # the query's own row in the block
  return jnp.einsum("zhac,za->zhc", p, me.astype(F32))


def _matrix(
  q, k, v, kv_queries, *, scale, n_iter, causal, segment_ids, q_positions, kv_positions, per_query
):
  q, k, v, kv_queries = _heads(q, k, v, kv_queries)
  if not causal:
    return _bidirectional(q, k, v, scale, n_iter, segment_ids, kv_positions)
  logits = jnp.einsum("bahd,bkhd->bhak", kv_queries, k) * scale
  seg_q = jnp.zeros(q_positions.shape, jnp.int32) if segment_ids is None else segment_ids
  seg_kv = jnp.zeros(kv_positions.shape, jnp.int32) if segment_ids is None else segment_ids
  row = lambda qp, qs: _prefix_row(
    logits, kv_positions != EMPTY, kv_positions, seg_kv, qp, qs, n_iter
  )
  return per_query(row, q_positions.T, seg_q.T)  # [Tq,B,H,Tk] -> caller transposes


def _attend(
  q,
  k,
  v,
  kv_queries=None,
  *,
  scale,
  n_iter,
  causal,
  segment_ids,
  q_positions,
  kv_positions,
  per_query,
):
  kv_queries, q_positions, kv_positions = _canonical(
    q, k, v, kv_queries, q_positions, kv_positions, segment_ids, causal, n_iter
  )
  p = _matrix(
    q,
    k,
    v,
    kv_queries,
    scale=scale,
    n_iter=n_iter,
    causal=causal,
    segment_ids=segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    per_query=per_query,
  )
  if causal:
    p = jnp.transpose(p, (1, 2, 0, 3))  # [B,H,Tq,Tk]
  _, _, vf, _ = _heads(q, k, v, kv_queries)
  return jnp.einsum("bhqk,bkhd->bqhd", p, vf).astype(v.dtype)


def _all_at_once(row, *xs):
  return jax.vmap(row)(*xs)


def _one_by_one(row, *xs):
  return lax.map(lambda a: jax.checkpoint(row)(*a), xs, batch_size=8)


def reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  kv_queries: jax.Array | None = None,
  *,
  scale: float,
  n_iter: int = 3,
  causal: bool = False,
  segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
) -> jax.Array:
  """Every query's prefix block at once ([B,H,Tq,Tk,Tk] when causal), float32 math."""
  return _attend(
    q,
    k,
    v,
    kv_queries,
    scale=scale,
    n_iter=n_iter,
    causal=causal,
    segment_ids=segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    per_query=_all_at_once,
  )


@dispatcher.register("xla")
def _xla(**kwargs):
  return _attend(**kwargs, per_query=_one_by_one)


@dispatcher.register("reference")
def _reference(**kwargs):
  return reference(**kwargs)


def sinkhorn_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  kv_queries: jax.Array | None = None,
  *,
  scale: float,
  n_iter: int = 3,
  causal: bool = False,
  segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array:
  """o [B,Tq,H,Dv]; see the module docstring. implementation: "auto" | "xla" | "reference"."""
  return dispatcher(
    implementation,
    q=q,
    k=k,
    v=v,
    kv_queries=kv_queries,
    scale=scale,
    n_iter=n_iter,
    causal=causal,
    segment_ids=segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
  )


def attention_matrix(
  q: jax.Array,
  k: jax.Array,
  kv_queries: jax.Array | None = None,
  *,
  scale: float,
  n_iter: int = 3,
  causal: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array:
  """P [B,H,Tq,Tk]: the Sinkhorn matrix (causal: row p of each query's prefix block)."""
  v = jnp.zeros(k.shape, F32)
  kv_queries, q_positions, kv_positions = _canonical(
    q, k, v, kv_queries, None, None, segment_ids, causal, n_iter
  )
  p = _matrix(
    q,
    k,
    v,
    kv_queries,
    scale=scale,
    n_iter=n_iter,
    causal=causal,
    segment_ids=segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    per_query=_all_at_once,
  )
  return jnp.transpose(p, (1, 2, 0, 3)) if causal else p
