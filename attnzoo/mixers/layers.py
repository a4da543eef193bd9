"""Building blocks shared by several mixers: the short causal convolution layer (with its
decoding buffer), feature maps of linear attention, and the normalisations of their outputs.

ShortConv is used by base_conv, mamba2, deltanet, gated_deltanet and lawcat; feature maps by
linear_attention and based; HeadNorm / GatedRMSNorm by retnet, lightning and mamba2;
LinearAttentionOp (the decayed linear attention op plus its decoding state in the "cache"
collection) and hidden_attention (its [B,H,T,T] matrix) by every linear-attention mixer.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.ops.linear_attention import init_state as la_init_state
from attnzoo.ops.linear_attention import linear_attention as la_op
from attnzoo.ops.linear_attention import step as la_step
from attnzoo.ops.short_conv import init_state as conv_init_state
from attnzoo.ops.short_conv import short_conv as conv_op
from attnzoo.ops.short_conv import step as conv_step

F32 = jnp.float32

ACTIVATIONS = {None: lambda x: x, "identity": lambda x: x, "silu": nn.silu, "swish": nn.silu,
               "relu": nn.relu, "gelu": nn.gelu, "sigmoid": nn.sigmoid}


def get_activation(name):
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; use one of "
                     f"{', '.join(str(k) for k in ACTIVATIONS)}")
  return ACTIVATIONS[name]


def conv_kernel_init(kernel_size: int):
  """PyTorch's default for a depthwise Conv1d (what Zoology, Mamba and fla keep):
  U(-1/sqrt(K), 1/sqrt(K)), K = fan-in = kernel_size."""
  bound = 1.0 / math.sqrt(kernel_size)

  def init(key, shape, dtype=F32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def short_conv_state_size(channels: int, kernel_size: int) -> int:
  """Bytes (float32) of a ShortConv decoding buffer, per example."""
  return (kernel_size - 1) * channels * 4


# One compiled program per call when not already under jit (eager use: tests, notebooks).
_conv_op_jit = jax.jit(conv_op, static_argnames=("return_final_state", "implementation"))


class ShortConv(nn.Module):
  """Causal depthwise convolution over time of x[B,T,C] (channels inferred from x), optional
  bias and activation (applied after the conv).

  Params: "kernel" [K,C], "bias" [C]. With decode=True it keeps the last K-1 inputs in the
  "cache" collection ("conv_state" [B,K-1,C] float32): created (zeros) when absent, i.e.
  during `init(..., decode=True)`, which runs the normal forward; later calls continue from
  it (`step` for one token, the op with initial_state for a longer prompt).
  """
  kernel_size: int = 4
  use_bias: bool = True
  activation: str | None = None
  kernel_init: Callable | None = None
  dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x, *, segment_ids=None, decode=False):
    batch, steps, channels = x.shape
    k = self.kernel_size
    if k < 1:
      raise ValueError(f"kernel_size must be >= 1, got {k}")
    kernel = self.param("kernel", self.kernel_init or conv_kernel_init(k), (k, channels), F32)
    bias = self.param("bias", nn.initializers.zeros, (channels,), F32) if self.use_bias else None
    kernel = kernel.astype(self.dtype)
    bias = None if bias is None else bias.astype(self.dtype)
    x = x.astype(self.dtype)
    act = get_activation(self.activation)
    if not decode:
      return act(_conv_op_jit(x, kernel, bias, segment_ids=segment_ids,
                         implementation=self.implementation))
    if segment_ids is not None:
      raise ValueError("decoding does not take segment_ids")
    initialized = self.has_variable("cache", "conv_state")
    state = self.variable("cache", "conv_state", conv_init_state, batch, k, channels)
    if not initialized:
      return act(_conv_op_jit(x, kernel, bias, implementation=self.implementation))
    if steps == 1:
      new_state, y = conv_step(state.value, x[:, 0], kernel, bias)
      y = y[:, None]
    else:
      y, new_state = _conv_op_jit(x, kernel, bias, initial_state=state.value,
                             return_final_state=True, implementation=self.implementation)
    state.value = new_state.astype(state.value.dtype)
    return act(y)


# ----------------------------------------------------------------------------- feature maps

FEATURE_MAPS = ("identity", "elu", "relu", "performer", "cosformer", "taylor")


def taylor_feature_map(x, *, scale_input: bool = True):
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
    xf = xf * d ** -0.25
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
    blocks.append((q * np.sign(np.diag(r))).T)       # the sign fix makes q Haar-distributed
  w = np.concatenate(blocks, axis=0)[:num_features]                  # [m, d] orthonormal rows
  norms = np.linalg.norm(rng.standard_normal((num_features, head_dim)), axis=-1)
  return (w * norms[:, None]).T.astype(np.float32)


def performer_feature_map(x, projection):
  """Positive random features of the softmax kernel exp(q.k / sqrt(d)):
  phi(x) = exp(w^T x' - |x'|^2 / 2) / sqrt(m), x' = x / d^(1/4), w ~ N(0, I) (orthogonal)."""
  d = x.shape[-1]
  m = projection.shape[-1]
  xf = x.astype(F32) * d ** -0.25
  proj = jnp.einsum("...d,dm->...m", xf, projection.astype(F32))
  sq = 0.5 * jnp.sum(xf * xf, axis=-1, keepdims=True)
  return (jnp.exp(proj - sq) / math.sqrt(m)).astype(x.dtype)


def cosformer_feature_map(x, positions, horizon: int):
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


def feature_map(name: str, x, *, positions=None, projection=None, horizon: int = 1024):
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

def rms_normalize(x, eps: float = 1e-6):
  """x / RMS(x) over the last axis, computed in float32 (no weight)."""
  xf = x.astype(F32)
  return xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


class HeadNorm(nn.Module):
  """Normalisation of each head's output o[B,T,H,d] over d (RetNet's GroupNorm with one group
  per head; SRMSNorm when kind="rmsnorm", affine=False). Returns x's dtype."""
  kind: str = "layernorm"            # "layernorm" | "rmsnorm"
  affine: bool = False
  eps: float = 1e-5

  @nn.compact
  def __call__(self, x):
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
  def __call__(self, x, z):
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


# ----------------------------------------------------------------------------- recurrent state

def linear_attention_state_size(heads: int, k_dim: int, v_dim: int, normalize=False) -> int:
  """Bytes (float32) of a LinearAttentionOp decoding state per example: [H, K, V(+1)]."""
  return heads * k_dim * (v_dim + (1 if normalize else 0)) * 4


# One compiled program per call when not already under jit (eager use: tests, notebooks).
_la_op_jit = jax.jit(la_op, static_argnames=("scale", "normalize", "eps", "implementation",
                                             "return_final_state"))


class LinearAttentionOp(nn.Module):
  """attnzoo.ops.linear_attention with a decoding state: no parameters, only the "cache"
  collection's "state" [B,H,K,V(+1)] float32. decode=False runs the op; decode=True creates
  the state when absent (during `init(..., decode=True)`, running the op as usual), and later
  continues from it: `step` for one token, the op with initial_state for a longer prompt.
  log_decay: None | [H] | [B,T,H] | [B,T,H,K] as in the op."""
  scale: float
  normalize: bool = False
  eps: float = 1e-6
  implementation: str = "auto"

  @nn.compact
  def __call__(self, q, k, v, log_decay=None, *, segment_ids=None, decode=False):
    kw = dict(scale=self.scale, log_decay=log_decay, normalize=self.normalize, eps=self.eps,
              implementation=self.implementation)
    if not decode:
      return _la_op_jit(q, k, v, segment_ids=segment_ids, **kw)
    if segment_ids is not None:
      raise ValueError("decoding does not take segment_ids")
    batch, steps, heads, k_dim = q.shape
    initialized = self.has_variable("cache", "state")
    state = self.variable("cache", "state", la_init_state, batch, heads, k_dim,
                          v.shape[-1], normalize=self.normalize)
    if not initialized:
      return _la_op_jit(q, k, v, **kw)
    if steps == 1:
      g = log_decay if log_decay is None or log_decay.ndim == 1 else log_decay[:, 0]
      new_state, o = la_step(state.value, q[:, 0], k[:, 0], v[:, 0], g, scale=self.scale,
                             normalize=self.normalize, eps=self.eps)
      o = o[:, None]
    else:
      o, new_state = _la_op_jit(q, k, v, initial_state=state.value, return_final_state=True, **kw)
    state.value = new_state.astype(state.value.dtype)
    return o


def hidden_attention(q, k, *, scale, log_decay=None, normalize=False, eps=1e-6,
                     segment_ids=None):
  """The [B,H,T,T] matrix A with o = A v of decayed linear attention: the op is linear in v,
  so feeding one-hot values v[b, s, h, :] = e_s returns A's rows (float32, "xla")."""
  batch, steps, heads, _ = q.shape
  one_hot = jnp.broadcast_to(jnp.eye(steps, dtype=F32)[None, :, None, :],
                             (batch, steps, heads, steps))
  o = _la_op_jit(
      q.astype(F32), k.astype(F32), one_hot, scale=scale,
      log_decay=None if log_decay is None else log_decay.astype(F32), normalize=normalize,
      eps=eps, segment_ids=segment_ids, implementation="xla")
  return jnp.transpose(o, (0, 2, 1, 3))


def default_positions(x, positions):
  """arange(T) for each example when positions is None."""
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  return positions
