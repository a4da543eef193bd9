"""The RWKV-4 WKV operator (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era";
the RWKV of Zoology's Figure 2), per channel c with decay rate w_c > 0 and bonus u_c:

  wkv_t = (Σ_{i<t} e^{-(t-1-i) w + k_i} v_i + e^{u + k_t} v_t)
        / (Σ_{i<t} e^{-(t-1-i) w + k_i}     + e^{u + k_t})

i.e. a causal softmax over i of the logits k_i - (t-1-i) w (i < t) and u + k_t (i = t).
Layout: k, v [B,T,C]; w, u [C]. Every form works in log space with a running maximum, so
large keys never overflow (RWKV-LM's CUDA kernel does the same).

State after token t (for decoding and chunking), float32 [B,3,C]: (p, q, o) with
  p e^o = Σ_{i<=t} e^{-(t-i) w + k_i} v_i,   q e^o = Σ_{i<=t} e^{-(t-i) w + k_i};
the empty state is (0, 0, -1e38). `segment_ids` [B,T] restart the sum at segment starts;
`initial_state` feeds the first segment only.

Forms: `reference` (the quadratic softmax form, [B,T,T,C]), `recurrent` (lax.scan of the
stable `step`), "xla" = `chunked` (lax.scan over chunks of `chunk` tokens, the quadratic form
inside a chunk, the state between chunks).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32
EMPTY_LOG = -1e38
MASKED = -1e30

dispatcher = Dispatcher("wkv4", auto_order={"default": ("xla",)})


def _canonical(k, v, w, u, initial_state, segment_ids):
  if k.ndim != 3 or v.shape != k.shape or w.shape != k.shape[2:] or u.shape != k.shape[2:]:
    raise ValueError(
      f"wkv4 wants k, v [B,T,C], w, u [C]; got {k.shape}, {v.shape}, {w.shape}, {u.shape}"
    )
  b, t, c = k.shape
  if initial_state is not None and initial_state.shape != (b, 3, c):
    raise ValueError(f"wkv4: initial_state must be [B,3,C]={(b, 3, c)}; got {initial_state.shape}")
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f"wkv4: segment_ids must be [B,T]={(b, t)}; got {segment_ids.shape}")


def init_state(batch: int, channels: int) -> jax.Array:
  """The empty state (p, q, o) = (0, 0, -1e38): [B,3,C] float32."""
  zeros = jnp.zeros((batch, channels), F32)
  return jnp.stack([zeros, zeros, jnp.full((batch, channels), EMPTY_LOG, F32)], axis=1)


def _initial(initial_state, batch, channels):
  return init_state(batch, channels) if initial_state is None else initial_state.astype(F32)


def _shifted(logits, carried, axis):
  """Log-space weights of tokens (`logits`, reduced over `axis`) and of a carried state (log
  scale `carried`) after one shared max shift m: (exp(logits - m), exp(carried - m), m)."""
  m = jnp.maximum(jnp.max(logits, axis=axis), carried)
  return jnp.exp(logits - jnp.expand_dims(m, axis)), jnp.exp(carried - m), m


def _quadratic(k, v, w, u, state, seg, first_seg):
  """Quadratic form over one stretch with a carried state (p, q, o) that belongs to segment
  first_seg [B]. Returns (y [B,T,C] float32, final state [B,3,C])."""
  b, t, c = k.shape
  k, v, w, u = k.astype(F32), v.astype(F32), w.astype(F32), u.astype(F32)
  p, q, o = state[:, 0], state[:, 1], state[:, 2]
  ti = jnp.arange(t, dtype=F32)
  lag = ti[:, None] - ti[None, :]  # t - i
  logits = k[:, None, :, :] - (lag - 1)[None, :, :, None] * w  # [B,T(t),T(i),C]
  logits = jnp.where((lag == 0)[None, :, :, None], (u + k)[:, None], logits)
  valid = (lag >= 0)[None] & (seg[:, :, None] == seg[:, None, :])
  logits = jnp.where(valid[..., None], logits, MASKED)
  past = jnp.where((seg == first_seg[:, None])[..., None], o[:, None] - ti[:, None] * w, MASKED)
  e, e_past, _ = _shifted(logits, past, axis=2)  # m: [B,T,C]
  num = jnp.einsum("btic,bic->btc", e, v) + e_past * p[:, None]
  den = jnp.sum(e, axis=2) + e_past * q[:, None]
  y = num / den
  # final state: tokens of the last segment, decayed to the last step; the carried state too
  last = seg == seg[:, -1:]
  logf = jnp.where(last[..., None], k - (t - 1 - ti)[None, :, None] * w, MASKED)
  carry = jnp.where((first_seg == seg[:, -1])[:, None], o - t * w, MASKED)
  ef, ec, of = _shifted(logf, carry, axis=1)
  pf = jnp.einsum("btc,btc->bc", ef, v) + ec * p
  qf = jnp.sum(ef, axis=1) + ec * q
  return y, jnp.stack([pf, qf, of], axis=1)


def reference(
  k: jax.Array,
  v: jax.Array,
  w: jax.Array,
  u: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The quadratic softmax form with a max shift; returns v's dtype."""
  _canonical(k, v, w, u, initial_state, segment_ids)
  b, t, c = k.shape
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  state = _initial(initial_state, b, c)
  y, final = _quadratic(k, v, w, u, state, seg, seg[:, 0])
  y = y.astype(v.dtype)
  return (y, final) if return_final_state else y


def step(
  state: jax.Array,
  k: jax.Array,
  v: jax.Array,
  w: jax.Array,
  u: jax.Array,
  *,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One token (RWKV-LM's stable recurrence): state [B,3,C], k, v [B,C]; reset [B] empties
  the state first. Returns (state float32, y [B,C] in v's dtype)."""
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None], init_state(*k.shape), state)
  p, q, o = state[:, 0], state[:, 1], state[:, 2]
  kf, vf, w, u = k.astype(F32), v.astype(F32), w.astype(F32), u.astype(F32)
  b, a, _ = _shifted((u + kf)[..., None], o, axis=-1)  # the token with its bonus, the state
  y = (a * p + b[..., 0] * vf) / (a * q + b[..., 0])
  b, a, m = _shifted(kf[..., None], o - w, axis=-1)
  b = b[..., 0]
  return jnp.stack([a * p + b * vf, a * q + b, m], axis=1), y.astype(v.dtype)


def recurrent(
  k: jax.Array,
  v: jax.Array,
  w: jax.Array,
  u: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time."""
  _canonical(k, v, w, u, initial_state, segment_ids)
  b, t, c = k.shape
  s0 = _initial(initial_state, b, c)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)

  def body(state, inp):
    return step(state, inp[0], inp[1], w, u, reset=inp[2])

  final, y = lax.scan(body, s0, (k.swapaxes(0, 1), v.swapaxes(0, 1), reset.swapaxes(0, 1)))
  y = y.swapaxes(0, 1)
  return (y, final) if return_final_state else y


def chunked(
  k: jax.Array,
  v: jax.Array,
  w: jax.Array,
  u: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  chunk: int = 64,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The quadratic form inside chunks of `chunk` tokens, the (p, q, o) state across them:
  O(T chunk C) work and [B,chunk,chunk,C] memory. T need not be a multiple of chunk: padding
  tokens join the last segment with keys of -1e30 (they only decay the state, undone at the
  end)."""
  _canonical(k, v, w, u, initial_state, segment_ids)
  b, t, c = k.shape
  chunk = max(1, min(chunk, t))
  n = -(-t // chunk)
  pad = n * chunk - t
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  segs = jnp.pad(seg, ((0, 0), (0, pad)), mode="edge").reshape(b, n, chunk)
  to_chunks = lambda x, fill: jnp.pad(
    x.astype(F32), ((0, 0), (0, pad), (0, 0)), constant_values=fill
  ).reshape(b, n, chunk, c)
  ks, vs = to_chunks(k, MASKED), to_chunks(v, 0.0)
  s0 = _initial(initial_state, b, c)

  def body(carry, inp):
    state, prev_seg = carry
    kc, vc, sc = inp
    y, new = _quadratic(kc, vc, w, u, state, sc, prev_seg)
    return (new, sc[:, -1]), y

  (final, _), y = lax.scan(
    body, (s0, seg[:, 0]), (ks.swapaxes(0, 1), vs.swapaxes(0, 1), segs.swapaxes(0, 1))
  )
  y = y.swapaxes(0, 1).reshape(b, n * chunk, c)[:, :t].astype(v.dtype)
  final = final.at[:, 2].add(pad * w.astype(F32))
  return (y, final) if return_final_state else y


@dispatcher.register("xla")
def _xla(**kwargs):
  return chunked(**kwargs)


@dispatcher.register("reference")
def _reference(**kwargs):
  return reference(**kwargs)


def wkv4(
  k: jax.Array,
  v: jax.Array,
  w: jax.Array,
  u: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """wkv [B,T,C] (or (wkv, final_state [B,3,C])). implementation: "auto" | "xla" (chunked)
  | "reference"."""
  _canonical(k, v, w, u, initial_state, segment_ids)
  return dispatcher(
    implementation,
    k=k,
    v=v,
    w=w,
    u=u,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )
