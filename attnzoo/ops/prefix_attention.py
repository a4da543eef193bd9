"""Attention as a many-to-many RNN (Feng et al. 2024, "Attention as an RNN", the op of Aaren):
for the scores s_i [B,T,H] of one query against every token and values v [B,T,H,D],

  o_t = Σ_{i<=t} e^{s_i} v_i / Σ_{i<=t} e^{s_i}

i.e. the causal softmax-weighted average of the values seen so far. The state after token t is
(m, u, w): m = max_{i<=t} s_i, u = Σ e^{s_i - m}, w = Σ e^{s_i - m} v_i, and o_t = w / u.
Two states combine associatively (the paper's eq. for ⊕):

  (m_A, u_A, w_A) ⊕ (m_B, u_B, w_B) = (m, u_A a + u_B b, w_A a + w_B b),
  m = max(m_A, m_B), a = e^{m_A - m}, b = e^{m_B - m},

so every prefix comes out of one parallel prefix scan (`lax.associative_scan`). Per channel this
is RWKV-4's WKV (ops/wkv4) with decay and bonus 0, but with one (m, u) per head.

State layout (decoding, chunking), float32 [B,H,D+2]: (w[0..D-1], u, m); the empty state is
(0, 0, -1e38). `segment_ids` [B,T] restart the prefix at segment starts; `initial_state` feeds
the first segment only. Forms: `reference` (the quadratic masked softmax, [B,H,T,T]), `recurrent`
(lax.scan of `step`), "xla" = `scan` (the associative scan, O(T log T) depth-parallel work).
`segmented_scan` is the segment-resetting associative scan other prefix ops reuse.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32
EMPTY_LOG = -1e38

dispatcher = Dispatcher("prefix_attention", auto_order={"default": ("xla",)})


def segmented_scan(combine: Callable, elems, starts: jax.Array | None, axis: int = 1):
  """Inclusive associative scan of `combine` over `axis` of the pytree `elems` that restarts
  where starts [B,T] is True (the segmented-scan operator: a restarting right operand wins)."""
  if starts is None:
    return lax.associative_scan(combine, elems, axis=axis)

  def with_reset(a, b):
    (ra, xa), (rb, xb) = a, b
    joined = combine(xa, xb)
    pick = lambda j, y: jnp.where(rb.reshape(rb.shape + (1,) * (y.ndim - rb.ndim)), y, j)
    return ra | rb, jax.tree.map(pick, joined, xb)

  return lax.associative_scan(with_reset, (starts, elems), axis=axis)[1]


def combine(a: jax.Array, b: jax.Array) -> jax.Array:
  """⊕ of two packed states [..., D+2] = (w, u, m): (w, u) of both rescaled to the larger m."""
  m = jnp.maximum(a[..., -1:], b[..., -1:])
  return jnp.concatenate(
    [a[..., :-1] * jnp.exp(a[..., -1:] - m) + b[..., :-1] * jnp.exp(b[..., -1:] - m), m], -1
  )


def token_state(s: jax.Array, v: jax.Array) -> jax.Array:
  """The state of one token, (v, 1, s): s [...], v [..., D] -> [..., D+2] float32."""
  s = s.astype(F32)[..., None]
  return jnp.concatenate([v.astype(F32), jnp.ones_like(s), s], -1)


def output(state: jax.Array, dtype) -> jax.Array:
  """o = w / u of packed states."""
  return (state[..., :-2] / state[..., -2:-1]).astype(dtype)


def init_state(batch: int, heads: int, dim: int) -> jax.Array:
  """The empty state (w, u, m) = (0, 0, -1e38): [B,H,D+2] float32."""
  zeros = jnp.zeros((batch, heads, dim + 1), F32)
  return jnp.concatenate([zeros, jnp.full((batch, heads, 1), EMPTY_LOG, F32)], axis=-1)


def _unpack(state):
  return state[..., -1], state[..., -2], state[..., :-2]


def _pack(m, u, w):
  return jnp.concatenate([w, u[..., None], m[..., None]], axis=-1)


def _canonical(s, v, initial_state, segment_ids):
  if s.ndim != 3 or v.ndim != 4 or v.shape[:3] != s.shape:
    raise ValueError(f"prefix_attention wants s [B,T,H], v [B,T,H,D]; got {s.shape}, {v.shape}")
  b, t, h, d = v.shape
  if initial_state is not None and initial_state.shape != (b, h, d + 2):
    raise ValueError(
      f"prefix_attention: initial_state must be [B,H,D+2]={(b, h, d + 2)}; "
      f"got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(
      f"prefix_attention: segment_ids must be [B,T]={(b, t)}; got {segment_ids.shape}"
    )


def reference(
  s: jax.Array,
  v: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The quadratic form: a masked softmax over i <= t (same segment) of s_i, the initial state
  as one more key (logit m + log u, value w / u) seen by the first segment."""
  _canonical(s, v, initial_state, segment_ids)
  b, t, h, d = v.shape
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
  state = init_state(b, h, d) if initial_state is None else initial_state.astype(F32)
  m0, u0, w0 = _unpack(state)
  idx = jnp.arange(t)
  visible = (idx[None, :, None] >= idx[None, None, :]) & (seg[:, :, None] == seg[:, None, :])
  sf = jnp.transpose(s.astype(F32), (0, 2, 1))  # [B,H,T]
  logits = jnp.where(visible[:, None], sf[:, :, None, :], -jnp.inf)  # [B,H,T(t),T(i)]
  first = seg == seg[:, :1]  # [B,T]
  safe_u0 = jnp.where(u0 > 0, u0, 1.0)
  init_logit = jnp.where(u0 > 0, m0 + jnp.log(safe_u0), -jnp.inf)  # [B,H]
  init_logit = jnp.where(first[:, None, :], init_logit[:, :, None], -jnp.inf)[..., None]
  logits = jnp.concatenate([logits, init_logit], axis=-1)
  probs = jax.nn.softmax(logits, axis=-1)
  values = jnp.concatenate(
    [
      jnp.broadcast_to(jnp.transpose(v.astype(F32), (0, 2, 1, 3))[:, :, None], (b, h, t, t, d)),
      jnp.broadcast_to((w0 / safe_u0[..., None])[:, :, None, None], (b, h, t, 1, d)),
    ],
    axis=3,
  )
  o = jnp.einsum("bhti,bhtid->bthd", probs, values).astype(v.dtype)
  if not return_final_state:
    return o
  # the last segment's (m, u, w) in closed form
  last = (seg == seg[:, -1:])[:, None, :]  # [B,1,T]
  masked = jnp.where(last, sf, -jnp.inf)
  carry = jnp.where(seg[:, :1] == seg[:, -1:], m0, EMPTY_LOG)  # [B,H]
  m = jnp.maximum(jnp.max(masked, axis=-1), carry)
  e = jnp.exp(masked - m[..., None])
  ec = jnp.exp(carry - m)
  u = e.sum(-1) + ec * u0
  w = jnp.einsum("bht,bthd->bhd", e, v.astype(F32)) + ec[..., None] * w0
  return o, _pack(m, u, w)


def step(
  state: jax.Array, s: jax.Array, v: jax.Array, *, reset: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """One token: state [B,H,D+2], s [B,H], v [B,H,D]; reset [B] empties the state first.
  Returns (state float32, o [B,H,D] in v's dtype)."""
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None], init_state(*v.shape), state)
  state = combine(state, token_state(s, v))
  return state, output(state, v.dtype)


def recurrent(
  s: jax.Array,
  v: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time."""
  _canonical(s, v, initial_state, segment_ids)
  b, t, h, d = v.shape
  s0 = init_state(b, h, d) if initial_state is None else initial_state.astype(F32)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)

  def body(state, inp):
    return step(state, inp[0], inp[1], reset=inp[2])

  final, o = lax.scan(body, s0, (s.swapaxes(0, 1), v.swapaxes(0, 1), reset.swapaxes(0, 1)))
  o = o.swapaxes(0, 1)
  return (o, final) if return_final_state else o


def scan(
  s: jax.Array,
  v: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The parallel prefix scan of ⊕ over time (the initial state folded into token 0)."""
  _canonical(s, v, initial_state, segment_ids)
  b, t, h, d = v.shape
  states = token_state(s, v)  # [B,T,H,D+2]
  if initial_state is not None:
    states = states.at[:, 0].set(combine(initial_state.astype(F32), states[:, 0]))
  starts = None if segment_ids is None else segment_starts(segment_ids)
  states = segmented_scan(combine, states, starts)
  o = output(states, v.dtype)
  return (o, states[:, -1]) if return_final_state else o


@dispatcher.register("xla")
def _xla(**kwargs):
  return scan(**kwargs)


@dispatcher.register("reference")
def _reference(**kwargs):
  return reference(**kwargs)


@dispatcher.register("recurrent")
def _recurrent(**kwargs):
  return recurrent(**kwargs)


def prefix_attention(
  s: jax.Array,
  v: jax.Array,
  *,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """o [B,T,H,D] (or (o, final_state [B,H,D+2])). implementation: "auto" | "xla" (the
  associative scan) | "reference" | "recurrent"."""
  _canonical(s, v, initial_state, segment_ids)
  return dispatcher(
    implementation,
    s=s,
    v=v,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
  )
