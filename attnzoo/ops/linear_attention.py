"""Decayed linear attention: plain, scalar-gated and vector-gated linear recurrences.

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,     o_t = scale * S_t^T q_t,     a_t = exp(log_decay_t)

Layout BTHD: q, k [B,T,H,K], v [B,T,H,V]; state [B,H,K,V] float32.
`log_decay` (log space, <= 0) picks the family:
  - None: plain linear attention (Katharopoulos et al.);
  - [H]: a fixed decay per head (RetNet's gamma), broadcast over batch and time;
  - [B,T,H]: one decay per head and step (Lightning, Mamba-2 SSD, simple GLA);
  - [B,T,H,K]: a decay per key channel (GLA, HGRN-2, RWKV-6).
`bonus` u[H,K] switches to the RWKV-6 readout: the output reads the state *before* step t
(before both its decay and k_t v_t^T) plus the bonus,
  o_t = scale * (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t).
`normalize` adds the running key sum z_t = a_t z_{t-1} + k_t and returns
  o_t = (scale S_t^T q_t) / (scale z_t . q_t + eps).
  The state then carries z as one extra value column: [B,H,K,V+1] (initial and final).
`segment_ids` [B,T] (packed sequences): the state is reset to zero wherever the id changes;
`initial_state` feeds the first segment only.

Implementations: `reference` (quadratic, float32), `recurrent` (lax.scan of `step`), "xla"
(`chunked`: the kernels' pure-jnp twin, pallas_kernels.linear_attention.chunked), "pallas"
(pallas_kernels.linear_attention: Triton on GPU, Mosaic on TPU v5 and newer) and "interpret"
(that kernel in Pallas interpret mode, any backend).

Numerics: every form floors the log decay at LOG_DECAY_FLOOR = -9.5 per step (a >= e^-9.5 =
7.5e-5: such a channel forgets its state within one step either way; RWKV-6's -exp(w) and
GLA's logsigmoid are unbounded below, and decays of e^-1e10 were seen in training, where the
float32 cumulative sums lose every digit of their differences). With the floor the chunked
forms ("xla", "pallas") are exact: every exponent is <= 0 except, for per-channel decay,
inside 16-token sub-blocks, where the factors are referenced to the sub-block's middle row and
clamped at e^80, which 8 floored steps (e^76) never reach. The Pallas kernel uses one 64-token block
instead wherever no chunk decays by more than e^-80 (then nothing is clamped). In bf16 the
normalised form's dq is a small difference of two large terms (~3e-2 relative error at T=1000
for "xla" and "pallas" alike).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import canonical_segments, segment_starts
from pallas_kernels import linear_attention as kernels

F32 = jnp.float32

dispatcher = Dispatcher(
  "linear_attention",
  auto_order={
    "gpu": ("pallas", "xla"),
    "tpu": ("pallas", "xla"),
    "default": ("xla",),
  },
)


# ----------------------------------------------------------------------------- arguments


LOG_DECAY_FLOOR = -9.5  # 8 steps: 76 < CLAMP = 80 of the chunked forms (module docstring)


def _canonical(
  q,
  k,
  v,
  *,
  scale,
  log_decay,
  bonus,
  normalize,
  initial_state,
  return_final_state,
  segment_ids,
  eps,
):
  if q.ndim != 4 or k.shape != q.shape or v.ndim != 4 or v.shape[:3] != q.shape[:3]:
    raise ValueError(
      f"linear_attention wants q,k [B,T,H,K] and v [B,T,H,V]; got q{q.shape} k{k.shape} v{v.shape}"
    )
  if scale is None:
    raise ValueError("linear_attention: pass `scale` explicitly (e.g. head_dim ** -0.5)")
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  if log_decay is not None:
    if log_decay.shape == (h,):
      log_decay = jnp.broadcast_to(log_decay, (b, t, h))
    if log_decay.shape not in ((b, t, h), (b, t, h, kd)):
      raise ValueError(
        f"linear_attention: log_decay must be [H], [B,T,H] or [B,T,H,K]; got "
        f"{log_decay.shape} for q{q.shape}"
      )
    log_decay = jnp.maximum(log_decay, LOG_DECAY_FLOOR)
  if bonus is not None and bonus.shape != (h, kd):
    raise ValueError(f"linear_attention: bonus must be [H,K]=({h},{kd}); got {bonus.shape}")
  state_v = vd + 1 if normalize else vd
  if initial_state is not None and initial_state.shape != (b, h, kd, state_v):
    raise ValueError(
      f"linear_attention: initial_state must be [B,H,K,V{'+1' if normalize else ''}]"
      f"=({b},{h},{kd},{state_v}); got {initial_state.shape}"
    )
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(
      f"linear_attention: segment_ids must be [B,T]=({b},{t}); got {segment_ids.shape}"
    )
  return dict(
    q=q,
    k=k,
    v=v,
    scale=scale,
    log_decay=log_decay,
    bonus=bonus,
    normalize=bool(normalize),
    initial_state=initial_state,
    return_final_state=bool(return_final_state),
    segment_ids=segment_ids,
    eps=eps,
  )


def _augment(v, normalize):
  """With the normaliser, a ones column makes the key sum z the state's last value column."""
  if not normalize:
    return v
  return jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)


def _finish(o, final_state, *, v, normalize, eps, return_final_state, den=None):
  """o is [B,T,H,V(+1)] float32 with the normaliser in its last column, or in `den`
  [B,T,H,1] when given; divides by the normaliser and casts to v's dtype."""
  if normalize:
    if den is None:
      o, den = o[..., :-1], o[..., -1:]
    o = o / (den + eps)
  o = o.astype(v.dtype)
  return (o, final_state) if return_final_state else o


def state_summary(
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None,
  *,
  normalize: bool = False,
  segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """The span k, v as an affine map of the state entering it, S_T = decay * S_0 + state:
  (decay [B,H,K] float32, state [B,H,K,V(+1)] float32); log_decay None | [B,T,H] | [B,T,H,K].
  With segment_ids only the last segment adds to the state, and a reset inside the span makes
  the decay 0. O(T K V), no T x T term (what sequence parallelism exchanges)."""
  kf = k.astype(F32)
  if log_decay is None:
    g = jnp.zeros(k.shape, F32)
  else:
    g = log_decay.astype(F32)
    g = jnp.broadcast_to(g[..., None], k.shape) if g.ndim == 3 else g
  G = jnp.cumsum(g, axis=1)
  GT = G[:, -1]
  decay = jnp.exp(GT)
  if segment_ids is not None:
    seg = canonical_segments(segment_ids)
    kf = jnp.where((seg == seg[:, -1:])[..., None, None], kf, 0.0)
    decay = jnp.where((seg[:, -1] == 0)[:, None, None], decay, 0.0)
  state = jnp.einsum(
    "bthk,bthv->bhkv", kf * jnp.exp(GT[:, None] - G), _augment(v.astype(F32), normalize)
  )
  return decay, state


# ----------------------------------------------------------------------------- reference


def reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  bonus: jax.Array | None = None,
  normalize: bool = False,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  eps: float = 1e-6,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The float32 ground truth: materialises the [B,H,T,T] (x K) decayed score matrix."""
  a = _canonical(
    q,
    k,
    v,
    scale=scale,
    log_decay=log_decay,
    bonus=bonus,
    normalize=normalize,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
    eps=eps,
  )
  b, t, h, kd = q.shape
  qf, kf = q.astype(F32), k.astype(F32)
  vf = _augment(v.astype(F32), normalize)
  g = a["log_decay"]
  if g is None:
    g = jnp.zeros(q.shape, F32)
  elif g.ndim == 3:
    g = jnp.broadcast_to(g.astype(F32)[..., None], q.shape)
  g = g.astype(F32)
  G = jnp.cumsum(g, axis=1)  # global cumulative log decay
  Gq = G - g if bonus is not None else G  # the RWKV-6 readout skips step t
  seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else canonical_segments(segment_ids)
  i = jnp.arange(t)[:, None]
  j = jnp.arange(t)[None, :]
  causal = j < i if bonus is not None else j <= i
  mask = causal[None] & (seg[:, :, None] == seg[:, None, :])  # [B,Ti,Tj]
  m = mask[:, :, :, None, None]
  diff = Gq[:, :, None] - G[:, None, :]  # [B,Ti,Tj,H,K]
  w = jnp.where(m, jnp.exp(jnp.where(m, diff, 0.0)), 0.0)
  scores = jnp.einsum("bihk,bjhk,bijhk->bhij", qf, kf, w) * scale
  if bonus is not None:
    diag = jnp.einsum("bihk,hk,bihk->bhi", qf, bonus.astype(F32), kf) * scale
    scores = scores + diag[..., None] * jnp.eye(t, dtype=F32)
  o = jnp.einsum("bhij,bjhv->bihv", scores, vf)
  h0 = a["initial_state"]
  hT = None
  first = (seg == 0)[:, :, None, None]
  if h0 is not None:
    h0 = h0.astype(F32)
    o = o + scale * jnp.where(first, jnp.einsum("bthk,bhkv->bthv", qf * jnp.exp(Gq), h0), 0.0)
  if return_final_state:
    GT = G[:, -1]  # [B,H,K]
    keep = (seg == seg[:, -1:])[:, :, None, None]
    kT = jnp.where(keep, kf * jnp.exp(GT[:, None] - G), 0.0)
    hT = jnp.einsum("bjhk,bjhv->bhkv", kT, vf)
    if h0 is not None:
      hT = hT + jnp.where((seg[:, -1] == 0)[:, None, None, None], jnp.exp(GT)[..., None] * h0, 0.0)
  return _finish(o, hT, v=v, normalize=normalize, eps=eps, return_final_state=return_final_state)


# ----------------------------------------------------------------------------- recurrent form


def init_state(
  batch: int, heads: int, k_dim: int, v_dim: int, *, normalize: bool = False
) -> jax.Array:
  """Zero state [B,H,K,V] float32 ([B,H,K,V+1] with the normaliser)."""
  return jnp.zeros((batch, heads, k_dim, v_dim + (1 if normalize else 0)), F32)


def step(
  state: jax.Array,
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  log_decay: jax.Array | None = None,
  *,
  scale: float,
  bonus: jax.Array | None = None,
  normalize: bool = False,
  eps: float = 1e-6,
  reset: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One decoding step. q,k [B,H,K], v [B,H,V], log_decay None | [H] | [B,H] | [B,H,K];
  reset [B] bool zeroes the state first (a new sequence). Returns (state, o[B,H,V])."""
  qf, kf = q.astype(F32), k.astype(F32)
  vf = _augment(v.astype(F32), normalize)
  state = state.astype(F32)
  if reset is not None:
    state = jnp.where(reset[:, None, None, None], 0.0, state)
  if log_decay is None:
    decay = 1.0
  else:
    g = jnp.maximum(log_decay.astype(F32), LOG_DECAY_FLOOR)
    if g.ndim == 1:
      g = jnp.broadcast_to(g, q.shape[:2])
    decay = jnp.exp(g)[..., None] if g.ndim == 3 else jnp.exp(g)[..., None, None]
  update = kf[..., :, None] * vf[..., None, :]
  if bonus is None:
    state = decay * state + update
    o = scale * jnp.einsum("bhk,bhkv->bhv", qf, state)
  else:
    beta = jnp.einsum("bhk,hk,bhk->bh", qf, bonus.astype(F32), kf)
    o = scale * (jnp.einsum("bhk,bhkv->bhv", qf, state) + beta[..., None] * vf)
    state = decay * state + update
  if normalize:
    o = o[..., :-1] / (o[..., -1:] + eps)
  return state, o.astype(v.dtype)


def recurrent(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  bonus: jax.Array | None = None,
  normalize: bool = False,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  eps: float = 1e-6,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """lax.scan of `step` over time (float32 state)."""
  a = _canonical(
    q,
    k,
    v,
    scale=scale,
    log_decay=log_decay,
    bonus=bonus,
    normalize=normalize,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
    eps=eps,
  )
  b, t, h, kd = q.shape
  vd = v.shape[-1]
  h0 = a["initial_state"]
  if h0 is None:
    h0 = init_state(b, h, kd, vd, normalize=normalize)
  reset = jnp.zeros((b, t), bool) if segment_ids is None else segment_starts(segment_ids)
  g = a["log_decay"]
  xs = (
    q.swapaxes(0, 1),
    k.swapaxes(0, 1),
    v.astype(F32).swapaxes(0, 1),
    reset.swapaxes(0, 1),
    None if g is None else g.swapaxes(0, 1),
  )

  def body(state, x):
    qt, kt, vt, rt, gt = x
    return step(
      state, qt, kt, vt, gt, scale=scale, bonus=bonus, normalize=normalize, eps=eps, reset=rt
    )

  hT, o = lax.scan(body, h0.astype(F32), xs)
  o = o.swapaxes(0, 1).astype(v.dtype)
  return (o, hT) if return_final_state else o


# ----------------------------------------------------------------------------- chunked (xla)


def chunked(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  bonus: jax.Array | None = None,
  normalize: bool = False,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  eps: float = 1e-6,
  chunk_size: int = 64,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Chunkwise-parallel pure-jnp form (matmuls in the input dtype, float32 state)."""
  a = _canonical(
    q,
    k,
    v,
    scale=scale,
    log_decay=log_decay,
    bonus=bonus,
    normalize=normalize,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
    eps=eps,
  )
  return _chunked(**a, chunk_size=chunk_size)


def _chunked(
  *,
  q,
  k,
  v,
  scale,
  log_decay,
  bonus,
  normalize,
  initial_state,
  return_final_state,
  segment_ids,
  eps,
  chunk_size=64,
):
  o, hT = kernels.chunked(
    q,
    k,
    _augment(v, normalize),
    log_decay,
    scale=scale,
    bonus=bonus,
    initial_state=initial_state,
    segment_ids=segment_ids,
    chunk=chunk_size,
  )
  return _finish(o, hT, v=v, normalize=normalize, eps=eps, return_final_state=return_final_state)


dispatcher.register("xla")(_chunked)


# ----------------------------------------------------------------------------- Pallas


def _kernel_reason(*, q, k, v, scale, log_decay, bonus, initial_state, segment_ids, **_):
  # the same limits compiled and in interpret mode
  return kernels.reason(
    q,
    k,
    v,
    log_decay,
    scale=scale,
    bonus=bonus,
    initial_state=initial_state,
    segment_ids=segment_ids,
  )


def _run_kernel(
  *,
  q,
  k,
  v,
  scale,
  log_decay,
  bonus,
  normalize,
  initial_state,
  return_final_state,
  segment_ids,
  eps,
  interpret,
):
  """The kernel on v; with the normaliser, a second call on a ones column gives z_t . q_t
  (one narrow V tile instead of widening every value tile by one column)."""
  vd = v.shape[-1]
  h0 = initial_state

  def run(values, state, out_dtype):
    return kernels.linear_attention(
      q,
      k,
      values,
      log_decay,
      scale=float(scale),
      bonus=bonus,
      initial_state=state,
      segment_ids=segment_ids,
      interpret=interpret,
      out_dtype=out_dtype,
    )

  if not normalize:
    o, hT = run(v, h0, None)
    return (o, hT) if return_final_state else o
  # the numerator in v's dtype, the normaliser in float32
  num, hT = run(v, None if h0 is None else h0[..., :vd], None)
  den, zT = run(jnp.ones(v.shape[:-1] + (1,), v.dtype), None if h0 is None else h0[..., vd:], F32)
  return _finish(
    num.astype(F32),
    jnp.concatenate([hT, zT], axis=-1) if return_final_state else None,
    v=v,
    normalize=True,
    eps=eps,
    return_final_state=return_final_state,
    den=den,
  )


dispatcher.register_kernel(_run_kernel, _kernel_reason, "the linear-attention Pallas kernels")


def linear_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale: float,
  log_decay: jax.Array | None = None,
  bonus: jax.Array | None = None,
  normalize: bool = False,
  initial_state: jax.Array | None = None,
  return_final_state: bool = False,
  segment_ids: jax.Array | None = None,
  eps: float = 1e-6,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Decayed linear attention (see the module docstring).

  Returns o[B,T,H,V] in v's dtype, or (o, final_state float32) when return_final_state.
  implementation: "auto" | "xla" | "pallas" | "interpret".
  """
  args = _canonical(
    q,
    k,
    v,
    scale=scale,
    log_decay=log_decay,
    bonus=bonus,
    normalize=normalize,
    initial_state=initial_state,
    return_final_state=return_final_state,
    segment_ids=segment_ids,
    eps=eps,
  )
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.linear_attention(plan, **args, implementation=implementation)
  name = dispatcher.choose(implementation, **args)
  return dispatcher.implementations[name].fn(**args)
