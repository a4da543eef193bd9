"""Exact sequence-parallel forms of the ops, one function per family, on the collectives of
attnzoo.ops.context_parallel. The ops route here while a `context_parallel.Plan` is in use; the
arguments are the op's own (global [B,T,...] arrays), already validated by the op.

- softmax attention: "ring" (Liu et al. 2023, Ring Attention: K/V blocks rotate by ppermute,
  each step's (o, lse) merged into the running one by softmax_attention.merge_partials; a
  custom VJP runs the backward as a second ring, `_ring`) or
  "allgather_kv" (LASP-2H's softmax layers: one all-gather of K and V); `zigzag` permutes the
  tokens so shard r holds chunks r and 2W-1-r (causal load balance, applied around the op);
  a causal left window no wider than a shard sends only its halo of K/V (one ppermute),
  whatever the strategy.
- linear attention (every decay form, bonus, normaliser), delta rule (plain and gated) and the
  selective scan: each shard summarises its tokens as an affine map of the incoming state
  (A, S), `exclusive_prefix` ("allgather" = LASP-2, "logscan" = log2(W) ppermutes) gives the
  state entering the shard, and the op runs locally from it. The delta rule's transition M
  (K x K) comes from the same op call as its outputs: v is widened by K zero columns whose
  initial state is the identity, so those columns carry M_t and their outputs M_t^T q_t.
- short and long convolutions: the K-1 inputs before the shard (a ppermute halo; a filter
  wider than a shard takes them from an all-gather).
Packed `segment_ids` are served everywhere: a shard whose first token starts a new segment
drops the state it is handed (and a reset inside a shard zeroes its map's transition); halos
keep only rows of the same segment. Not served (a ValueError says so): explicit positions,
additive bias, block masks and dropout in attention.
"""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops import context_parallel as cp
from attnzoo.ops import delta_rule as dr_ops
from attnzoo.ops import linear_attention as la_ops
from attnzoo.ops import long_conv as lc_ops
from attnzoo.ops import selective_scan as ss_ops
from attnzoo.ops import short_conv as sc_ops
from attnzoo.ops.segments import EMPTY, canonical_segments

# the package exports the function under the module's name
sa_ops = importlib.import_module("attnzoo.ops.softmax_attention")

F32 = jnp.float32


def _refuse(op: str, **unsupported) -> None:
  given = [name for name, value in unsupported.items() if value]
  if given:
    raise ValueError(
      f"{op} under context parallelism does not take {', '.join(given)}; run it with mesh.context=1"
    )


def _diag_apply(a, x):
  return a[..., None] * x if a.ndim < x.ndim else a * x


def _specs(return_final_state):
  """Outputs [B,T,...] and, when asked for, a final state [B,...]."""
  return lambda tokens, examples: (tokens, examples if return_final_state else None)


def _halo_segments(seg, width, plan):
  """Segment ids of the `width` tokens before the shard; rows before the sequence take the
  sequence's first id (an initial state belongs to the first segment). None without
  segments."""
  if seg is None:
    return None
  first = seg[:, :1]
  if width > seg.shape[1]:  # rows before the sequence reach past the first shard
    first = lax.all_gather(first, plan.axis)[0]
  return cp.previous_rows(seg, width, plan, jnp.broadcast_to(first, (seg.shape[0], width)))


def _maybe_final(out, final, return_final_state):
  return (out, final) if return_final_state else out


# ----------------------------------------------------------------------------- softmax


def softmax_attention(
  plan, q, k, v, *, scale, causal, window, segment_ids, kv_segment_ids, softcap, return_lse,
  implementation, explicit_positions=False, bias=None, block_mask=None, dropout=False, **_
):  # fmt: skip
  """Softmax attention over sequence shards (module docstring)."""
  _refuse(
    "softmax_attention",
    explicit_positions=explicit_positions,
    bias=bias is not None,
    block_mask=block_mask is not None,
    dropout=dropout,
    **{"Tq != Tk": q.shape[1] != k.shape[1]},
  )
  b, t = q.shape[:2]
  w = plan.size
  local = t // w
  halo = window is not None and causal and window[1] == 0 and window[0] <= local
  zigzag = plan.zigzag and causal and not halo and t % (2 * w) == 0
  order = cp.zigzag_order(t, w) if zigzag else jnp.arange(t)
  positions = jnp.broadcast_to(order.astype(jnp.int32), (b, t))
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  kv_seg = seg if kv_segment_ids is None else kv_segment_ids
  if zigzag:
    q, k, v, seg, kv_seg = (jnp.take(x, order, axis=1) for x in (q, k, v, seg, kv_seg))

  def attend(qs, pos, qseg, ks, vs, kpos, kseg):
    o, lse = sa_ops.softmax_attention(
      qs, ks, vs, scale=scale, causal=causal, window=window, segment_ids=qseg,
      kv_segment_ids=kseg, q_positions=pos, kv_positions=kpos, softcap=softcap,
      return_lse=True, implementation=implementation,
    )  # fmt: skip
    return o.astype(F32), lse

  def body(qs, ks, vs, pos, qseg, kseg):
    if halo:
      width = window[0]
      ks = jnp.concatenate([cp.previous_rows(ks, width, plan), ks], axis=1)
      vs = jnp.concatenate([cp.previous_rows(vs, width, plan), vs], axis=1)
      kpos = jnp.concatenate([cp.previous_rows(pos, width, plan, EMPTY), pos], axis=1)
      kseg = jnp.concatenate([cp.previous_rows(kseg, width, plan), kseg], axis=1)
      o, lse = attend(qs, pos, qseg, ks, vs, kpos, kseg)
    elif plan.attention == "allgather_kv":
      gather = lambda x: lax.all_gather(x, plan.axis, axis=1, tiled=True)
      o, lse = attend(qs, pos, qseg, gather(ks), gather(vs), gather(pos), gather(kseg))
    else:
      o, lse = _ring(attend, plan, qs, ks, vs, pos, qseg, kseg)
    return o.astype(qs.dtype), lse

  out_specs = lambda tokens, _: (tokens, tokens)
  o, lse = cp.shard_sequence(plan, body, (q, k, v, positions, seg, kv_seg), (), (), out_specs)
  if zigzag:
    inverse = jnp.argsort(order)
    o, lse = jnp.take(o, inverse, axis=1), jnp.take(lse, inverse, axis=1)
  return (o, lse) if return_lse else o


def _ring(attend, plan, qs, ks, vs, pos, qseg, kseg):
  """Ring attention inside the shard map: K/V blocks rotate W - 1 times (block j arrives at
  step (r - j) mod W) and each step's (o, lse) merges into the running one. A custom VJP keeps
  the backward's memory at one block: it saves only the inputs and the merged (o, lse), and a
  second ring pass recomputes each block's attention, takes its VJP with the merge's
  cotangents (do_j = p_j do, dlse_j = p_j (<do, o_j - o> + dlse), p_j = e^{lse_j - lse}) and
  sends the block's dK, dV along with it, one more rotation bringing them home. Plain autodiff
  through the scan would store every received block: the whole sequence's K/V per device."""
  w = plan.size
  perm = [(i, (i + 1) % w) for i in range(w)]
  rotate = lambda x: lax.ppermute(x, plan.axis, perm)

  def forward(qs, ks, vs, pos, qseg, kseg):
    o, lse = attend(qs, pos, qseg, ks, vs, pos, kseg)

    def step(carry, _):
      o, lse, blocks = carry
      blocks = rotate(blocks)
      o_new, lse_new = attend(qs, pos, qseg, *blocks)
      o, lse = sa_ops.merge_partials(jnp.stack([o, o_new]), jnp.stack([lse, lse_new]), axis=0)
      return (o, lse, blocks), None

    (o, lse, _), _ = lax.scan(step, (o, lse, (ks, vs, pos, kseg)), None, length=w - 1)
    return o, lse

  def ring_fwd(qs, ks, vs, pos, qseg, kseg):
    o, lse = forward(qs, ks, vs, pos, qseg, kseg)
    return (o, lse), (qs, ks, vs, pos, qseg, kseg, o, lse)

  def ring_bwd(res, cotangents):
    qs, ks, vs, pos, qseg, kseg, o, lse = res
    do, dlse = (c.astype(F32) for c in cotangents)
    finite = jnp.isfinite(lse)

    def contribution(blocks):
      kb, vb, kpos, kseg_ = blocks
      block = lambda q, k, v: attend(q, pos, qseg, k, v, kpos, kseg_)
      (o_j, lse_j), vjp = jax.vjp(block, qs, kb, vb)
      p = jnp.where(finite & jnp.isfinite(lse_j), jnp.exp(lse_j - jnp.where(finite, lse, 0.0)), 0)
      dlse_j = p * (jnp.sum(do * (o_j - o), axis=-1) + dlse)
      return vjp((p[..., None] * do, dlse_j))

    dq, dk, dv = contribution((ks, vs, pos, kseg))

    def step(carry, _):
      dq, blocks, dk, dv = carry
      blocks, dk, dv = rotate(blocks), rotate(dk), rotate(dv)
      dq_j, dk_j, dv_j = contribution(blocks)
      return (dq + dq_j, blocks, dk + dk_j, dv + dv_j), None

    init = (dq, (ks, vs, pos, kseg), dk, dv)
    (dq, _, dk, dv), _ = lax.scan(step, init, None, length=w - 1)
    return dq, rotate(dk), rotate(dv), None, None, None

  ring = jax.custom_vjp(forward)
  ring.defvjp(ring_fwd, ring_bwd)
  return ring(qs, ks, vs, pos, qseg, kseg)


# ----------------------------------------------------------------------------- state passing


def linear_attention(
  plan, *, q, k, v, scale, log_decay, bonus, normalize, initial_state, return_final_state,
  segment_ids, eps, implementation
):  # fmt: skip
  """Decayed linear attention over sequence shards: the shard's (decay, state) summary, the
  exclusive prefix, then the op from the entering state."""

  def body(q, k, v, g, seg, h0, bonus):
    carried = cp.continues(seg, plan)
    decay, state = la_ops.state_summary(k, v, g, normalize=normalize, segment_ids=seg)
    entering, final = cp.exclusive_prefix(
      cp.only_if(carried, decay), state, h0, plan, apply=_diag_apply, compose=jnp.multiply,
      total=return_final_state,
    )  # fmt: skip
    o = la_ops.linear_attention(
      q, k, v, scale=scale, log_decay=g, bonus=bonus, normalize=normalize,
      initial_state=cp.only_if(carried, entering), segment_ids=seg, eps=eps,
      implementation=implementation,
    )  # fmt: skip
    return o, final

  out_specs = _specs(return_final_state)
  o, final = cp.shard_sequence(
    plan, body, (q, k, v, log_decay, segment_ids), (initial_state,), (bonus,), out_specs
  )
  return _maybe_final(o, final, return_final_state)


def delta_rule(
  plan, *, q, k, v, beta, scale, log_decay, initial_state, segment_ids, implementation,
  return_final_state
):  # fmt: skip
  """Delta rule over sequence shards; the shard's map is S -> M S + S_local (module
  docstring for how M comes out of the same op call)."""
  vd, kd = v.shape[-1], k.shape[-1]

  def body(q, k, v, beta, g, seg, h0):
    b, t, h = beta.shape
    eye = jnp.broadcast_to(jnp.eye(kd, dtype=F32), (b, h, kd, kd))
    widened = jnp.concatenate([v, jnp.zeros((b, t, h, kd), v.dtype)], axis=-1)
    start = jnp.concatenate([jnp.zeros((b, h, kd, vd), F32), eye], axis=-1)
    o, last = dr_ops.delta_rule(
      q, k, widened, beta, scale=scale, log_decay=g, initial_state=start,
      return_final_state=True, segment_ids=seg, implementation=implementation,
    )  # fmt: skip
    carried = cp.continues(seg, plan)
    state, transition = last[..., :vd], cp.only_if(carried, last[..., vd:])
    apply = lambda m, x: jnp.einsum("bhij,bhjv->bhiv", m, x, precision=lax.Precision.HIGHEST)
    compose = lambda m2, m1: jnp.einsum("bhij,bhjk->bhik", m2, m1, precision=lax.Precision.HIGHEST)
    entering, final = cp.exclusive_prefix(
      transition, state, h0, plan, apply=apply, compose=compose, total=return_final_state
    )
    entering = cp.only_if(carried, entering)
    from_before = jnp.einsum(
      "bthj,bhjv->bthv", o[..., vd:].astype(F32), entering, precision=lax.Precision.HIGHEST
    )
    return (o[..., :vd].astype(F32) + from_before).astype(v.dtype), final

  out_specs = _specs(return_final_state)
  o, final = cp.shard_sequence(
    plan, body, (q, k, v, beta, log_decay, segment_ids), (initial_state,), (), out_specs
  )
  return _maybe_final(o, final, return_final_state)


def selective_scan(
  plan, *, x, delta, A, B, C, D, delta_bias, delta_softplus, initial_state, return_final_state,
  segment_ids, implementation
):  # fmt: skip
  """Selective scan over sequence shards: the shard's (exp(sum dt A), final state from zero)
  summary, the exclusive prefix, then the scan from the entering state."""

  def body(x, delta, B, C, seg, h0, A, D, delta_bias):
    run = lambda D, h: ss_ops.selective_scan(
      x, delta, A, B, C, D, delta_bias=delta_bias, delta_softplus=delta_softplus,
      initial_state=h, return_final_state=True, segment_ids=seg, implementation=implementation,
    )  # fmt: skip
    _, state = run(None, None)
    dt = ss_ops.kernels.discretize(delta, delta_bias, delta_softplus)
    decay = jnp.exp(jnp.einsum("btd,dn->bdn", dt, A.astype(F32)))
    carried = cp.continues(seg, plan)
    if seg is not None:  # a reset inside the shard forgets what came before it
      carried = carried & (canonical_segments(seg)[:, -1] == 0)
    entering, final = cp.exclusive_prefix(
      cp.only_if(carried, decay), state, h0, plan, apply=jnp.multiply, compose=jnp.multiply,
      total=return_final_state,
    )  # fmt: skip
    return run(D, cp.only_if(cp.continues(seg, plan), entering))[0], final

  out_specs = _specs(return_final_state)
  sequence, replicated = (x, delta, B, C, segment_ids), (A, D, delta_bias)
  y, final = cp.shard_sequence(plan, body, sequence, (initial_state,), replicated, out_specs)
  return _maybe_final(y, final, return_final_state)


# ----------------------------------------------------------------------------- convolutions


def short_conv(
  plan, *, x, weight, bias, initial_state, return_final_state, segment_ids, implementation
):
  """Short causal convolution over sequence shards: a halo of K-1 inputs from the previous
  shard (the first shard takes initial_state). Per-token weights [B,T,K,C] (dynamic
  convolution) split over the shards with x."""
  width = weight.shape[-2] - 1

  def body(x, seg, h0, weight, bias):
    first = 0 if h0 is None else h0
    halo = cp.previous_rows(x, width, plan, first)
    halo_seg = _halo_segments(seg, width, plan)
    if seg is not None:  # rows of the previous shard from another segment are not seen
      halo = jnp.where((halo_seg == seg[:, :1])[..., None], halo, 0)
    y = sc_ops.short_conv(
      x, weight, bias, initial_state=halo, segment_ids=seg, implementation=implementation
    )
    final = None
    if return_final_state:
      t = x.shape[1]
      tail = jnp.concatenate([halo, x], axis=1)[:, t:].astype(F32)
      if seg is not None:
        tail_seg = jnp.concatenate([halo_seg, seg], axis=1)[:, t:]
        tail = jnp.where((tail_seg == seg[:, -1:])[..., None], tail, 0.0)
      final = cp.last_shard(tail, plan)
    return y, final

  out_specs = _specs(return_final_state)
  if weight.ndim == 4:  # per token: a sequence array
    y, final = cp.shard_sequence(
      plan, lambda x, seg, w, h0, b: body(x, seg, h0, w, b),
      (x, segment_ids, weight), (initial_state,), (bias,), out_specs,
    )  # fmt: skip
  else:
    y, final = cp.shard_sequence(
      plan, body, (x, segment_ids), (initial_state,), (weight, bias), out_specs
    )
  return _maybe_final(y, final, return_final_state)


def long_conv(plan, *, u, kernel, segment_ids, implementation):
  """Causal long convolution over sequence shards: the L-1 inputs before the shard (a halo by
  ppermute when the filter fits in a shard, else from an all-gather) prepended to its own."""
  width = min(kernel.shape[0], u.shape[1]) - 1

  def body(u, seg, kernel):
    ext = jnp.concatenate([cp.previous_rows(u, width, plan), u], axis=1)
    ext_seg = None if seg is None else jnp.concatenate([_halo_segments(seg, width, plan), seg], 1)
    y = lc_ops.long_conv(ext, kernel, segment_ids=ext_seg, implementation=implementation)
    return y[:, width:]

  out_specs = lambda tokens, _: tokens
  return cp.shard_sequence(plan, body, (u, segment_ids), (), (kernel,), out_specs)
