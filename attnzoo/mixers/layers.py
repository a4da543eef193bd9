"""The plumbing every mixer shares, in one place (DESIGN.md, Mixers): a mixer module imports only
`registry`, this module and `attnzoo.ops`, never another mixer module.

- conventions: `default_positions` (arange(T) when not given), `no_decode_segments` (decoding
  continues one sequence per batch row), `state_bytes` (what decoding keeps, float32 counted as
  Zoology does), `hidden_attention` (the [B,H,T,T] matrix of any op linear in v);
- decode caches, one per op, each running its op (whole sequence) or continuing from its state
  in the "cache" collection (`decode=True`): `ShortConv`, `DepthwiseConvOp`, `LinearAttentionOp`,
  `DeltaRuleOp`, `DPLRDeltaOp`, `LongConvOp`, `DiagSSMOp` (with `S4DKernel`, S4D's
  parametrisation), `WKV4Op`, `SpatialMixOp`, `PrefixAttentionOp`, `GaussianAttentionOp`,
  `TokenShift`;
- Hyena's implicit long filter (`ImplicitFilter`);
- feature maps of linear attention, and the normalisations of mixer outputs.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.registry import per_head
from attnzoo.ops import delta_rule as dr_ops
from attnzoo.ops import diag_ssm as ssm_ops
from attnzoo.ops import dplr_delta as dplr_ops
from attnzoo.ops import gaussian_attention as ga_ops
from attnzoo.ops import linear_attention as la_ops
from attnzoo.ops import long_conv as lc_ops
from attnzoo.ops import prefix_attention as pa_ops
from attnzoo.ops import selective_scan as ss_ops
from attnzoo.ops import short_conv as conv_ops
from attnzoo.ops import spatial_mix as sm_ops
from attnzoo.ops import wkv4 as wkv4_ops
from attnzoo.ops.segments import segment_starts

F32 = jnp.float32

ACTIVATIONS = {
  None: lambda x: x,
  "identity": lambda x: x,
  "silu": nn.silu,
  "swish": nn.silu,
  "relu": nn.relu,
  "gelu": nn.gelu,
  "sigmoid": nn.sigmoid,
}


def get_activation(name: str | None) -> Callable[[jax.Array], jax.Array]:
  if name not in ACTIVATIONS:
    raise ValueError(
      f"unknown activation {name!r}; use one of {', '.join(str(k) for k in ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


# ----------------------------------------------------------------------------- conventions


def default_positions(x: jax.Array, positions: jax.Array | None) -> jax.Array:
  """positions, or arange(T) for each example when None."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  return positions


def no_decode_segments(segment_ids: jax.Array | None, block_ids: jax.Array | None = None) -> None:
  """Decoding continues one sequence per batch row: packed segments (or blocks) are an error."""
  for name, ids in (("segment_ids", segment_ids), ("block_ids", block_ids)):
    if ids is not None:
      raise ValueError(f"decoding does not take {name} (one sequence per batch row)")


def state_bytes(*shapes: Sequence[int]) -> int:
  """Bytes of the decoding state of one example: float32 arrays of the given shapes (4 bytes
  an element, as Zoology counts)."""
  return 4 * sum(math.prod(shape) for shape in shapes)


def hidden_attention(
  op: Callable[..., jax.Array], q: jax.Array, k: jax.Array, *args: Any, **kwargs: Any
) -> jax.Array:
  """The [B,H,T,T] matrix A with o = A v that a mixing op applies to its values: softmax,
  linear, decayed (Ali et al. 2024, "The Hidden Attention of Mamba Models") or delta-rule
  attention. Each is linear in v, so one-hot values v[b, s, h, :] = e_s give A's rows:
  op(q, k, one_hot, *args, implementation="xla", **kwargs), q and k in float32. The values
  have k's heads (the kv heads of grouped-query attention)."""
  batch, steps, heads = k.shape[:3]
  one_hot = jnp.broadcast_to(
    jnp.eye(steps, dtype=F32)[None, :, None, :], (batch, steps, heads, steps)
  )
  rows = op(q.astype(F32), k.astype(F32), one_hot, *args, implementation="xla", **kwargs)
  return jnp.transpose(rows, (0, 2, 1, 3))


# ----------------------------------------------------------------------------- decode caches


def reversed_pass(
  run: Callable[[jax.Array, jax.Array | None], jax.Array],
  u: jax.Array,
  segment_ids: jax.Array | None,
  *,
  strictly_future: bool = False,
) -> jax.Array:
  """The backward half of a bidirectional layer: `run(u, segment_ids)` (a causal pass) over the
  time-reversed sequence, returned in the original order, so out[t] sees u[s] for s >= t in
  t's segment. strictly_future: out[t] is that at t + 1 (zero where t + 1 starts another
  segment), so it sees s > t only: the backward half of S4's bidirectional kernel (Gu et al.
  2022), which leaves the present token to the forward half."""
  flip = lambda a: None if a is None else jnp.flip(a, axis=1)
  out = flip(run(flip(u), flip(segment_ids)))
  if not strictly_future:
    return out
  pad = ((0, 0), (0, 1)) + ((0, 0),) * (out.ndim - 2)
  out = jnp.pad(out[:, 1:], pad)
  if segment_ids is not None:
    same = jnp.pad(segment_ids[:, 1:] == segment_ids[:, :-1], ((0, 0), (0, 1)))
    out = jnp.where(same.reshape(same.shape + (1,) * (out.ndim - 2)), out, 0)
  return out


def reversed_matrix(
  matrix: Callable[[jax.Array, jax.Array | None], jax.Array],
  u: jax.Array,
  segment_ids: jax.Array | None,
) -> jax.Array:
  """The [..., T, T] hidden-attention matrix of `reversed_pass` (without strictly_future):
  matrix(u, segment_ids) of the time-reversed sequence, rows and columns put back in order."""
  flip = lambda a: None if a is None else jnp.flip(a, axis=1)
  return jnp.flip(matrix(flip(u), flip(segment_ids)), (-2, -1))


def _eager_jit(op: Callable, *static: str) -> Callable:
  """One compiled program per call when not already under jit (eager use: tests, notebooks)."""
  return jax.jit(op, static_argnames=("implementation", "return_final_state") + static)


_conv_op = _eager_jit(conv_ops.short_conv)
_la_op = _eager_jit(la_ops.linear_attention, "scale", "normalize", "eps")
_dr_op = _eager_jit(dr_ops.delta_rule, "scale")
_dplr_op = _eager_jit(dplr_ops.dplr_delta, "scale")
_ss_op = _eager_jit(ss_ops.selective_scan, "delta_softplus")


def _run_or_decode(
  module: nn.Module,
  op: Callable,
  step: Callable,
  init_state: Callable,
  *,
  steps: int,
  segment_ids: jax.Array | None,
  decode: bool,
  name: str = "state",
) -> jax.Array:
  """Without decode: op(segment_ids=...) over the whole sequence. With decode, through the
  state kept in `module`'s "cache" collection under `name`: the first call (inside
  `init(..., decode=True)`) creates it with init_state() and runs op() leaving it at zero;
  later calls continue from it, `step(state) -> (state, y[B,...])` for one token and
  op(initial_state=state, return_final_state=True) for a longer prompt. Call it from a compact
  method of `module`."""
  if not decode:
    return op(segment_ids=segment_ids)
  no_decode_segments(segment_ids)
  initialized = module.has_variable("cache", name)
  state = module.variable("cache", name, init_state)
  if not initialized:
    return op()
  if steps == 1:
    new_state, y = step(state.value)
    y = y[:, None]
  else:
    y, new_state = op(initial_state=state.value, return_final_state=True)
  state.value = new_state.astype(state.value.dtype)
  return y


def conv_kernel_init(kernel_size: int) -> Callable:
  """PyTorch's default for a depthwise Conv1d (what Zoology, Mamba and fla keep):
  U(-1/sqrt(K), 1/sqrt(K)), K = fan-in = kernel_size."""
  bound = 1.0 / math.sqrt(kernel_size)

  def init(key, shape, dtype=F32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float) -> Callable:
  """Mamba's step-size bias (mamba_ssm): softplus^-1(dt), dt log-uniform in [dt_min, dt_max]
  and at least `floor`, so that softplus(bias) starts at dt."""

  def init(key, shape, dtype=F32):
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    dt = jnp.exp(jax.random.uniform(key, shape, dtype) * (log_max - log_min) + log_min)
    dt = jnp.maximum(dt, floor)
    return dt + jnp.log(-jnp.expm1(-dt))  # softplus^-1

  return init


class ShortConv(nn.Module):
  """Causal depthwise convolution over time of x[B,T,C] (channels inferred from x), optional
  bias and activation (applied after the conv), on attnzoo.ops.short_conv.

  Params: "kernel" [K,C], "bias" [C]. Decoding state: the last K-1 inputs, "conv_state"
  [B,K-1,C] float32.
  """

  kernel_size: int = 4
  use_bias: bool = True
  activation: str | None = None
  kernel_init: Callable | None = None
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(
    self, x: jax.Array, *, segment_ids: jax.Array | None = None, decode: bool = False
  ) -> jax.Array:
    batch, steps, channels = x.shape
    k = self.kernel_size
    if k < 1:
      raise ValueError(f"kernel_size must be >= 1, got {k}")
    kernel = self.param("kernel", self.kernel_init or conv_kernel_init(k), (k, channels), F32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), F32) if self.use_bias else None
    kernel = kernel.astype(self.dtype)
    bias = None if bias is None else bias.astype(self.dtype)
    x = x.astype(self.dtype)
    op = functools.partial(_conv_op, x, kernel, bias, implementation=self.implementation)
    step = lambda state: conv_ops.step(state, x[:, 0], kernel, bias)
    init = functools.partial(conv_ops.init_state, batch, k, channels)
    y = _run_or_decode(
      self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode, name="conv_state"
    )
    return get_activation(self.activation)(y)


class DepthwiseConvOp(nn.Module):
  """attnzoo.ops.short_conv with weights given (not owned): static [K,C] or per-position
  [B,T,K,C] (dynamic convolutions), no bias; decoding state: the last K-1 inputs, the "cache"
  collection's "conv_state" [B,K-1,C] float32 (a window cache)."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    weight: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, channels = x.shape
    op = functools.partial(_conv_op, x, weight, None, implementation=self.implementation)
    w0 = weight if weight.ndim == 2 else weight[:, 0]
    step = lambda state: conv_ops.step(state, x[:, 0], w0)
    init = functools.partial(conv_ops.init_state, batch, weight.shape[-2], channels)
    return _run_or_decode(
      self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode, name="conv_state"
    )


class LinearAttentionOp(nn.Module):
  """attnzoo.ops.linear_attention with its decoding state: no parameters; the "cache"
  collection's "state" [B,H,K,V(+1 with normalize)] float32. log_decay: None | [H] | [B,T,H] |
  [B,T,H,K], bonus: None | [H,K], as in the op.

  causal=False: the bidirectional form, a forward scan plus a reverse scan (the op on the
  time-reversed inputs, reversed back) minus the diagonal they both count, so every pair (t, s)
  is weighted once: plain linear attention becomes the non-causal form of Katharopoulos et al.
  (2020, eq. 2), a decay becomes the product of the decays between t and s in either
  direction (the reverse scan of Vision Mamba, Zhu et al. 2024, with the forward scan's
  parameters). With `normalize`, numerator and key sum are both bidirectional. No decoding."""

  scale: float
  normalize: bool = False
  eps: float = 1e-6
  implementation: str = "auto"
  causal: bool = True

  def _kwargs(self) -> dict:
    return dict(scale=self.scale, normalize=self.normalize, eps=self.eps)

  @nn.compact
  def __call__(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array | None = None,
    bonus: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, heads, k_dim = q.shape
    if not self.causal:
      if decode:
        raise ValueError("the bidirectional (non-causal) form does not decode")
      return self._both_directions(q, k, v, log_decay, bonus, segment_ids, self.implementation)
    op = functools.partial(
      _la_op,
      q,
      k,
      v,
      log_decay=log_decay,
      bonus=bonus,
      implementation=self.implementation,
      **self._kwargs(),
    )

    def step(state):
      g = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, 0]
      return la_ops.step(state, q[:, 0], k[:, 0], v[:, 0], g, bonus=bonus, **self._kwargs())

    init = functools.partial(
      la_ops.init_state, batch, heads, k_dim, v.shape[-1], normalize=self.normalize
    )
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)

  def _both_directions(self, q, k, v, log_decay, bonus, segment_ids, implementation) -> jax.Array:
    flip = lambda a: a if a is None or a.ndim < 2 else jnp.flip(a, 1)  # [H] decays: no time
    ones = jnp.ones(v.shape[:-1] + (1,), v.dtype)
    v_aug = jnp.concatenate([v, ones], -1) if self.normalize else v
    scan = lambda q, k, v, g, seg: _la_op(
      q,
      k,
      v,
      scale=self.scale,
      log_decay=g,
      bonus=bonus,
      segment_ids=seg,
      implementation=implementation,
    )
    forward = scan(q, k, v_aug, log_decay, segment_ids).astype(F32)
    reverse = flip(scan(flip(q), flip(k), flip(v_aug), flip(log_decay), flip(segment_ids)))
    qk = q.astype(F32) * k.astype(F32) * (1.0 if bonus is None else bonus.astype(F32))
    diagonal = self.scale * qk.sum(-1, keepdims=True) * v_aug.astype(F32)
    o = forward + reverse.astype(F32) - diagonal
    if self.normalize:
      o = o[..., :-1] / (o[..., -1:] + self.eps)
    return o.astype(v.dtype)

  def attention_matrix(
    self,
    q: jax.Array,
    k: jax.Array,
    log_decay: jax.Array | None = None,
    bonus: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """[B,H,T,T]: the hidden attention of the op as configured (causal=False: of both scans)."""
    if not self.causal:
      both = lambda q, k, v, implementation: self._both_directions(
        q, k, v, log_decay, bonus, segment_ids, implementation
      )
      return hidden_attention(both, q, k)
    return hidden_attention(
      _la_op, q, k, log_decay=log_decay, bonus=bonus, segment_ids=segment_ids, **self._kwargs()
    )


class DeltaRuleOp(nn.Module):
  """attnzoo.ops.delta_rule with its decoding state: no parameters; the "cache" collection's
  "state" [B,H,K,V] float32. beta and log_decay (None: no decay) are [B,T,H] as in the op."""

  scale: float
  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    beta: jax.Array,
    log_decay: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, heads, k_dim = q.shape
    op = functools.partial(
      _dr_op,
      q,
      k,
      v,
      beta,
      scale=self.scale,
      log_decay=log_decay,
      implementation=self.implementation,
    )

    def step(state):
      g = None if log_decay is None else log_decay[:, 0]
      return dr_ops.step(state, q[:, 0], k[:, 0], v[:, 0], beta[:, 0], g, scale=self.scale)

    init = functools.partial(dr_ops.init_state, batch, heads, k_dim, v.shape[-1])
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)

  def attention_matrix(
    self,
    q: jax.Array,
    k: jax.Array,
    beta: jax.Array,
    log_decay: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """[B,H,T,T]: the hidden attention of the delta rule (it is linear in v)."""
    return hidden_attention(
      _dr_op, q, k, beta, scale=self.scale, log_decay=log_decay, segment_ids=segment_ids
    )


class DPLRDeltaOp(nn.Module):
  """attnzoo.ops.dplr_delta (RWKV-7's generalised delta rule) with its decoding state: no
  parameters; the "cache" collection's "state" [B,H,K,V] float32. r, k, log_decay, a, b
  [B,T,H,K] and v [B,T,H,V] as in the op."""

  scale: float
  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    r: jax.Array,
    k: jax.Array,
    v: jax.Array,
    log_decay: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, heads, k_dim = r.shape
    inputs = (r, k, v, log_decay, a, b)
    op = functools.partial(_dplr_op, *inputs, scale=self.scale, implementation=self.implementation)
    step = lambda state: dplr_ops.step(state, *(x[:, 0] for x in inputs), scale=self.scale)
    init = functools.partial(dplr_ops.init_state, batch, heads, k_dim, v.shape[-1])
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)

  def attention_matrix(
    self,
    r: jax.Array,
    k: jax.Array,
    log_decay: jax.Array,
    a: jax.Array,
    b: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """[B,H,T,T]: the hidden attention of the generalised delta rule (it is linear in v)."""
    return hidden_attention(
      _dplr_op, r, k, log_decay, a, b, scale=self.scale, segment_ids=segment_ids
    )


class SelectiveScanOp(nn.Module):
  """attnzoo.ops.selective_scan with its decoding state: no parameters; the "cache"
  collection's "state" [B,D,N] float32. x, delta [B,T,D], A [D,N], B, C [B,T,N], D and
  delta_bias [D] or None, as in the op (dt = softplus(delta + delta_bias))."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    D: jax.Array | None = None,
    delta_bias: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, d_inner = x.shape
    op = functools.partial(
      _ss_op, x, delta, A, B, C, D, delta_bias=delta_bias, implementation=self.implementation
    )

    def step(state):
      return ss_ops.step(state, x[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D, delta_bias=delta_bias)

    init = functools.partial(ss_ops.init_state, batch, d_inner, A.shape[1])
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)

  def attention_matrix(
    self,
    x: jax.Array,
    delta: jax.Array,
    A: jax.Array,
    B: jax.Array,
    C: jax.Array,
    delta_bias: jax.Array | None = None,
    *,
    segment_ids: jax.Array | None = None,
  ) -> jax.Array:
    """[B,D,T,T]: the hidden attention of the scan per channel (Ali et al. 2024, "The Hidden
    Attention of Mamba Models"), y_t[d] = sum_s M[d,t,s] x_s[d] without the D skip. The scan
    is linear in x, so it runs once on one-hot inputs, one channel per (d, s)."""
    batch, steps, d_inner = x.shape
    one_hot = jnp.broadcast_to(jnp.eye(steps, dtype=F32), (batch, d_inner, steps, steps))
    one_hot = jnp.transpose(one_hot, (0, 2, 1, 3)).reshape(batch, steps, d_inner * steps)
    rep = lambda z, axis: None if z is None else jnp.repeat(z.astype(F32), steps, axis=axis)
    rows = _ss_op(
      one_hot,
      rep(delta, -1),
      rep(A, 0),
      B.astype(F32),
      C.astype(F32),
      delta_bias=rep(delta_bias, 0),
      segment_ids=segment_ids,
      implementation="xla",
    )
    return jnp.transpose(rows.reshape(batch, steps, d_inner, steps), (0, 2, 1, 3))


# ----------------------------------------------------------------------------- feature maps

FEATURE_MAPS = ("identity", "elu", "relu", "performer", "cosformer", "taylor")


def taylor_feature_map(x: jax.Array, *, scale_input: bool = True) -> jax.Array:
  """Based's 2nd-order Taylor map of exp over the last axis (d = its size), such that
    phi(q) . phi(k) = 1 + q.k / sqrt(d) + (q.k)^2 / (2 d)
  (scale_input=False drops the 1/sqrt(d) temperature: 1 + q.k + (q.k)^2 / 2).
  Based writes it as [1, x / d^(1/4), vec(x x^T) / sqrt(2 d)] (1 + d + d^2 features); we keep
  only the unique quadratic terms, x_i x_j (i < j) and x_i^2 / sqrt(2), times 1/sqrt(d): the
  same kernel with 1 + d + d(d+1)/2 features (153 at d = 16, what Zoology's state_size counts).
  """
  d = x.shape[-1]
  xf = x.astype(F32)
  if scale_input:
    xf = xf * d**-0.25
  rows, cols = np.triu_indices(d)
  coef = np.where(rows == cols, 1.0 / math.sqrt(2.0), 1.0).astype(np.float32)
  x2 = xf[..., rows] * xf[..., cols] * coef
  ones = jnp.ones(x.shape[:-1] + (1,), F32)
  return jnp.concatenate([ones, xf, x2], axis=-1).astype(x.dtype)


def taylor_feature_size(d: int) -> int:
  return 1 + d + d * (d + 1) // 2


def performer_projection(seed: int, head_dim: int, num_features: int) -> np.ndarray:
  """FAVOR+ orthogonal random features (Choromanski et al. 2021): blocks of orthonormal
  directions, each row rescaled to the norm of an iid Gaussian vector; [head_dim, m] float32.
  A numpy constant drawn from a fixed seed: not a parameter, identical on every call."""
  rng = np.random.default_rng(seed)
  blocks = []
  for _ in range(-(-num_features // head_dim)):
    q, r = np.linalg.qr(rng.standard_normal((head_dim, head_dim)))
    blocks.append((q * np.sign(np.diag(r))).T)  # the sign fix makes q Haar-distributed
  w = np.concatenate(blocks, axis=0)[:num_features]  # [m, d] orthonormal rows
  norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=-1)
  return (w * norms[:, None]).T.astype(np.float32)


def performer_feature_map(x: jax.Array, projection: jax.Array) -> jax.Array:
  """Positive random features of the softmax kernel exp(q.k / sqrt(d)):
  phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), w ~ N(0, I) (orthogonal)."""
  d = x.shape[-1]
  m = projection.shape[-1]
  xf = x.astype(F32) * d**-0.25
  proj = jnp.einsum("...d,dm->...m", xf, projection.astype(F32))
  sq = 0.5 * jnp.sum(xf * xf, axis=-1, keepdims=True)
  return (jnp.exp(proj - sq) / math.sqrt(m)).astype(x.dtype)


def cosformer_feature_map(x: jax.Array, positions: jax.Array, horizon: int) -> jax.Array:
  """cosFormer (Qin et al. 2022): relu features re-weighted by cos(pi i / 2M) through
  cos(a - b) = cos a cos b + sin a sin b: phi(x_i) = [relu(x_i) cos(pi i / 2M),
  relu(x_i) sin(pi i / 2M)], so phi(q_i) . phi(k_j) = relu(q_i).relu(k_j) cos(pi (i-j) / 2M).
  x [B,T,H,d], positions [B,T]; horizon M is fixed so decoding matches the full forward."""
  angle = (jnp.pi / (2.0 * horizon)) * positions.astype(F32)[:, :, None, None]
  r = nn.relu(x.astype(F32))
  return jnp.concatenate([r * jnp.cos(angle), r * jnp.sin(angle)], axis=-1).astype(x.dtype)


def feature_size(name: str, head_dim: int, num_features: int | None = None) -> int:
  """The feature dimension a map produces from head_dim inputs."""
  if name in ("identity", "elu", "relu"):
    return head_dim
  if name == "taylor":
    return taylor_feature_size(head_dim)
  if name == "cosformer":
    return 2 * head_dim
  if name == "performer":
    return num_features or head_dim
  raise ValueError(f"unknown feature map {name!r}; use one of {', '.join(FEATURE_MAPS)}")


def feature_map(
  name: str,
  x: jax.Array,
  *,
  positions: jax.Array | None = None,
  projection: jax.Array | None = None,
  horizon: int = 1024,
) -> jax.Array:
  """Applies a named feature map over the last axis of x[B,T,H,d]."""
  if name == "identity":
    return x
  if name == "elu":
    return nn.elu(x) + 1.0
  if name == "relu":
    return nn.relu(x)
  if name == "taylor":
    return taylor_feature_map(x)
  if name == "performer":
    return performer_feature_map(x, projection)
  if name == "cosformer":
    return cosformer_feature_map(x, positions, horizon)
  raise ValueError(f"unknown feature map {name!r}; use one of {', '.join(FEATURE_MAPS)}")


# ----------------------------------------------------------------------------- norms


def rms_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / RMS(x) over the last axis, computed in float32 (no weight)."""
  xf = x.astype(F32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class HeadNorm(nn.Module):
  """Normalisation of each head's output o[B,T,H,d] over d (RetNet's GroupNorm with one group
  per head; SRMSNorm when kind="rmsnorm", affine=False). Returns x's dtype."""

  kind: str = "layernorm"  # "layernorm" | "rmsnorm"
  affine: bool = False
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    xf = x.astype(F32)
    if self.kind == "layernorm":
      xf = xf - jnp.mean(xf, axis=-1, keepdims=True)
    elif self.kind != "rmsnorm":
      raise ValueError(f"unknown HeadNorm kind {self.kind!r}; use layernorm or rmsnorm")
    y = rms_normalize(xf, self.eps)
    if self.affine:
      shape = x.shape[-2:]
      y = y * self.param("scale", nn.initializers.ones, shape, F32)
      if self.kind == "layernorm":
        y = y + self.param("bias", nn.initializers.zeros, shape, F32)
    return y.astype(x.dtype)


class GatedRMSNorm(nn.Module):
  """Gated RMSNorm of Mamba-2 / GLA outputs over the last axis, in groups of `group_size`
  channels (None: one group):
    norm_before_gate=False (Mamba-2): y = RMSNorm(x * silu(z)) * w
    norm_before_gate=True  (GLA/fla):  y = RMSNorm(x) * w * silu(z)
  """

  group_size: int | None = None
  norm_before_gate: bool = False
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x: jax.Array, z: jax.Array) -> jax.Array:
    dim = x.shape[-1]
    group = self.group_size or dim
    if dim % group:
      raise ValueError(f"GatedRMSNorm: group_size {group} must divide {dim}")
    w = self.param("scale", nn.initializers.ones, (dim,), F32)
    xf, gate = x.astype(F32), nn.silu(z.astype(F32))
    if not self.norm_before_gate:
      xf = xf * gate
    shape = xf.shape
    y = rms_normalize(xf.reshape(*shape[:-1], dim // group, group), self.eps).reshape(shape)
    y = y * w
    if self.norm_before_gate:
      y = y * gate
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- long convolutions
# and diagonal state spaces (H3, Hyena, S4D/DSS, long BaseConv, RWKV-4)

_lc_op = jax.jit(lc_ops.long_conv, static_argnames=("implementation",))
_ssm_op = _eager_jit(ssm_ops.diag_ssm)
_wkv4_op = _eager_jit(wkv4_ops.wkv4)


def _history_decode(
  module: nn.Module,
  u: jax.Array,
  segment_ids: jax.Array | None,
  run: Callable[[], jax.Array],
  window: Callable[[dict], tuple[dict, jax.Array]],
) -> jax.Array:
  """Decoding through the naive cache of every past input in `module`'s "cache" collection
  ("inputs" [B,S,C] float32, S the length `init(..., decode=True)` saw, and "index" int32): the
  first call creates it and returns run(); later ones window(state) -> (state, y)."""
  no_decode_segments(segment_ids)
  initialized = module.has_variable("cache", "inputs")
  init = lc_ops.init_state(*u.shape)
  buf = module.variable("cache", "inputs", lambda: init["inputs"])
  index = module.variable("cache", "index", lambda: init["index"])
  if not initialized:
    return run()
  state, y = window({"inputs": buf.value, "index": index.value})
  buf.value, index.value = state["inputs"], state["index"]
  return y


class LongConvOp(nn.Module):
  """attnzoo.ops.long_conv with the naive decoding cache (`_history_decode`)."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    u: jax.Array,
    kernel: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    run = functools.partial(_lc_op, u, kernel, implementation=self.implementation)
    if not decode:
      return run(segment_ids=segment_ids)
    window = lambda state: lc_ops.decode_window(state, u, kernel)
    return _history_decode(self, u, segment_ids, run, window)


class SpatialMixOp(nn.Module):
  """attnzoo.ops.spatial_mix (causal position-by-position mixing) with the naive decoding cache
  of every past input (`_history_decode`)."""

  @nn.compact
  def __call__(
    self,
    v: jax.Array,
    weight: jax.Array,
    bias: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    run = functools.partial(sm_ops.spatial_mix, v, weight, bias)
    if not decode:
      return run(segment_ids=segment_ids)
    window = lambda state: sm_ops.decode_window(state, v, weight, bias)
    return _history_decode(self, v, segment_ids, run, window)


class DiagSSMOp(nn.Module):
  """attnzoo.ops.diag_ssm with its decoding state: no parameters; the "cache" collection's
  "state" [B,C,N,2] float32 (the complex modes as (re, im))."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    u: jax.Array,
    log_da: jax.Array,
    w: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, channels = u.shape
    op = functools.partial(_ssm_op, u, log_da, w, implementation=self.implementation)
    step = lambda state: ssm_ops.step(state, u[:, 0], log_da, w)
    init = functools.partial(ssm_ops.init_state, batch, channels, log_da.shape[1])
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)


class S4DKernel(nn.Module):
  """A diagonal SSM per group of channels in S4D's parametrisation (Gu et al. 2022, state-spaces
  `s4d.py`/`SSKernelDiag`): A = -exp(log_A_real) + i A_imag [G,N/2] from `a_init`, B = 1,
  C [G,N/2] complex randn (stored as (re, im) pairs), log dt ~ U[ln dt_min, ln dt_max]; ZOH or
  bilinear discretisation. Maps u [B,T,C] (C a multiple of G) to y (no D term): the
  convolution form for training, the recurrence for decoding (DiagSSMOp)."""

  groups: int
  d_state: int = 64
  a_init: str = "lin"
  discretization: str = "zoh"
  dt_min: float = 1e-3
  dt_max: float = 1e-1
  implementation: str = "auto"

  def discretized(self) -> tuple[jax.Array, jax.Array]:
    """(log dA, W = C B̄), [G,N/2] complex."""
    eig = ssm_ops.s4d_eigenvalues(self.d_state, self.a_init)
    shape = (self.groups, self.d_state // 2)
    const = lambda value: lambda *_: jnp.broadcast_to(jnp.asarray(value, F32), shape)
    lo, hi = math.log(self.dt_min), math.log(self.dt_max)
    log_dt = self.param("log_dt", lambda key: jax.random.uniform(key, (self.groups,), F32, lo, hi))
    log_a_real = self.param("log_A_real", const(np.log(-eig.real)))
    a_imag = self.param("A_imag", const(eig.imag))
    c = self.param("C", lambda key: jax.random.normal(key, shape + (2,), F32) * math.sqrt(0.5))
    a = lax_complex(-jnp.exp(log_a_real), a_imag)
    log_da, b_bar = ssm_ops.discretize(jnp.exp(log_dt), a, self.discretization)
    return log_da, lax_complex(c[..., 0], c[..., 1]) * b_bar

  @nn.compact
  def __call__(
    self, u: jax.Array, *, segment_ids: jax.Array | None = None, decode: bool = False
  ) -> jax.Array:
    log_da, w = self.discretized()
    return DiagSSMOp(self.implementation, name="ssm")(
      u, log_da, w, segment_ids=segment_ids, decode=decode
    )


def lax_complex(re: jax.Array, im: jax.Array) -> jax.Array:
  return jax.lax.complex(re.astype(F32), im.astype(F32))


class WKV4Op(nn.Module):
  """attnzoo.ops.wkv4 with its decoding state: no parameters; the "cache" collection's
  "state" (p, q, o) [B,3,C] float32."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    k: jax.Array,
    v: jax.Array,
    w: jax.Array,
    u: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, channels = k.shape
    op = functools.partial(_wkv4_op, k, v, w, u, implementation=self.implementation)
    step = lambda state: wkv4_ops.step(state, k[:, 0], v[:, 0], w, u)
    init = functools.partial(wkv4_ops.init_state, batch, channels)
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)


_pa_op = _eager_jit(pa_ops.prefix_attention)


class PrefixAttentionOp(nn.Module):
  """attnzoo.ops.prefix_attention (Aaren's prefix-scan softmax) with its decoding state: no
  parameters; the "cache" collection's "state" (w, u, m) [B,H,D+2] float32."""

  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    s: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, heads, dim = v.shape
    op = functools.partial(_pa_op, s, v, implementation=self.implementation)
    step = lambda state: pa_ops.step(state, s[:, 0], v[:, 0])
    init = functools.partial(pa_ops.init_state, batch, heads, dim)
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)


_ga_op = _eager_jit(ga_ops.gaussian_attention, "causal")


class GaussianAttentionOp(nn.Module):
  """attnzoo.ops.gaussian_attention (GAAM over time) with its decoding state: no parameters;
  the "cache" collection's "state" (n, Σx, Σx², log Σ m) [B,H,d,4] float32. causal=False: the
  paper's whole-sequence form, which does not decode."""

  causal: bool = True
  implementation: str = "auto"

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    offsets: jax.Array,
    c: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, heads, dim = x.shape
    if not self.causal:
      if decode:
        raise ValueError("the bidirectional (non-causal) form does not decode")
      return _ga_op(x, offsets, c, causal=False, segment_ids=segment_ids)
    op = functools.partial(_ga_op, x, offsets, c, implementation=self.implementation)
    step = lambda state: ga_ops.step(state, x[:, 0], offsets, c)
    init = functools.partial(ga_ops.init_state, batch, heads, dim)
    return _run_or_decode(self, op, step, init, steps=steps, segment_ids=segment_ids, decode=decode)


class ImplicitFilter(nn.Module):
  """Hyena's implicitly parametrised long filter h [l_max, C] (Poli et al. 2023; Zoology's
  `ImplicitLongConvolution` / `HyenaFilter`): positional features z [l_max, emb_dim]
  (attnzoo.ops.long_conv.positional_features; a parameter "z" when train_positions) through
  Linear(emb_dim, order) -> Sin -> [Linear(order, order) -> Sin] x num_inner_mlps ->
  Linear(order, C, no bias), Sin(x) = sin(freq ⊙ x) with one trainable freq [order] (init w)
  shared by every Sin (as the reference code reuses one module), then optionally the
  exponential modulation h_t *= exp(-t̂ |δ_c|), δ = linspace(ln 1e-2 / 1.5, ln 1e-2 / 0.3, C)
  (a constant). Linear layers N(0, 0.02) with zero biases (Zoology re-initialises every
  nn.Linear so)."""

  channels: int
  l_max: int
  emb_dim: int = 3
  order: int = 64
  num_inner_mlps: int = 2
  w: float = 1.0
  modulate: bool = True
  train_positions: bool = True

  @nn.compact
  def __call__(self) -> jax.Array:
    z = lc_ops.positional_features(self.l_max, self.emb_dim)
    if self.train_positions:
      z = self.param("z", lambda *_: z)
    freq = self.param("freq", lambda *_: jnp.full((self.order,), self.w, F32))
    init = nn.initializers.normal(0.02)
    h = z
    for i in range(1 + self.num_inner_mlps):
      h = jnp.sin(freq * nn.Dense(self.order, kernel_init=init, name=f"mlp_{i}")(h))
    h = nn.Dense(self.channels, use_bias=False, kernel_init=init, name="mlp_out")(h)
    if self.modulate:
      t_hat = jnp.linspace(0.0, 1.0, self.l_max, dtype=F32)[:, None]
      deltas = jnp.linspace(math.log(1e-2) / 1.5, math.log(1e-2) / 0.3, self.channels)
      h = h * jnp.exp(-t_hat * jnp.abs(deltas))
    return h


# ----------------------------------------------------------------------------- token shift (RWKV)


class RWKVHeads:
  """What RWKV-6 and RWKV-7 share (a mixin of their modules, which have d_model and num_heads):
  num_heads heads, or heads of size 64 (at least one), and the decoding state, the matrix
  state [H,K,K] plus the token-shift buffer [D]."""

  def _dims(self) -> tuple[int, int]:
    heads = self.num_heads or max(1, self.d_model // 64)
    return heads, per_head(self.d_model, heads)

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the matrix state [H,K,K] plus the token-shift buffer [D]."""
    heads, head_dim = self._dims()
    return state_bytes((heads, head_dim, head_dim), (self.d_model,))


def token_shift(
  x: jax.Array, segment_ids: jax.Array | None = None, first: jax.Array | None = None
) -> jax.Array:
  """x_{t-1} for every t: `first` [B,D] (or zeros) before the first token, and zeros at the
  first token of every packed segment."""
  prev = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
  if first is not None:
    prev = prev.at[:, 0].set(first.astype(x.dtype))
  if segment_ids is not None:
    prev = jnp.where(segment_starts(segment_ids)[..., None], 0, prev)
  return prev


class TokenShift(nn.Module):
  """token_shift with its decoding state: the previous call's last input, the "cache"
  collection's "shift" [B,D] float32."""

  @nn.compact
  def __call__(
    self, x: jax.Array, *, segment_ids: jax.Array | None = None, decode: bool = False
  ) -> jax.Array:
    if not decode:
      return token_shift(x, segment_ids)
    no_decode_segments(segment_ids)
    initialized = self.has_variable("cache", "shift")
    shift = self.variable("cache", "shift", jnp.zeros, (x.shape[0], x.shape[2]), F32)
    x_prev = token_shift(x, first=shift.value)
    if initialized:
      shift.value = x[:, -1].astype(F32)
    return x_prev


# ----------------------------------------------------------------------------- ring caches (NSA,
# AHN): the newest tokens of a stream, looked up by position


def ring_write(ring: Sequence[Any], values: Sequence[jax.Array], positions: jax.Array) -> None:
  """Writes the newest tokens of `values` (arrays [B, T, ...]) into the cache variables `ring`
  (the same order, [B, n, ...]; the last one takes `positions` [B, T]) at slot = position mod
  n, keeping the last n."""
  n = ring[0].value.shape[1]
  kept = min(positions.shape[1], n)
  slots = positions[:, -kept:] % n
  rows = jnp.arange(positions.shape[0])[:, None]
  for var, x in zip(ring, (*values, positions)):
    var.value = var.value.at[rows, slots].set(x[:, -kept:].astype(var.value.dtype))


def gather_by_position(
  pool: Sequence[jax.Array], pool_positions: jax.Array, want: jax.Array
) -> tuple[list[jax.Array], jax.Array]:
  """The tokens of `pool` (arrays [B, P, ...] at positions [B, P]) at positions `want` [B, ...]
  -> (arrays [B, *want.shape[1:], ...], found: bool [B, *want.shape[1:]]); tokens not found
  come back as the pool's first."""
  match = want[..., None] == pool_positions.reshape(
    pool_positions.shape[:1] + (1,) * (want.ndim - 1) + pool_positions.shape[1:]
  )
  take = jnp.argmax(match, axis=-1)
  gather = lambda a: jax.vmap(lambda p, i: p[i])(a, take)
  return [gather(a) for a in pool], match.any(-1)
