"""Artificial Hippocampus Network mixer (Fang et al. 2025, "Artificial Hippocampus Networks for
Efficient Long-Context Modeling"), the Gated DeltaNet instance: sliding-window attention over
the last `window` tokens (lossless short-term memory) plus a Gated DeltaNet state into which
every token is written as it leaves the window (compressed long-term memory).

  q, k, v  = projections of x (RoPE on q, k), shared by both memories (AHN reuses the
             attention layer's q, k, v)
  o_win    = softmax attention of q_t over k, v at positions (t - window, t]
  S_t      = a (I - beta k k^T) S_{t-1} + beta k v^T, fed the token s = t - window that has
             just left the window (k L2-normalised; beta_s = sigmoid(W_b x_s) and the Mamba-2
             decay a_s = exp(-exp(A_log) softplus(W_a x_s + dt_bias)) from that token, as AHN
             takes its gates from the evicted tokens)
  o_mem    = S_t^T q_t / sqrt(d) (q L2-normalised)
  y        = W_o [o_win + W_m (RMSNorm(o_mem) * swish(W_g x_t))]

W_m is zero-initialised (zero_memory_out=True), so training starts at exactly sliding-window
attention, as in AHN (whose memory output is added to the attention output before o_proj);
zero_memory_out=False draws it like the other projections. AHN trains by
self-distillation from a frozen full-attention model with a random window and attention sinks;
here the mixer trains end to end like any other, without sinks. Decoding keeps a ring of the
last `window` tokens' k, v, beta and decay, and the [H, K, V] state.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  GatedRMSNorm,
  default_positions,
  dt_bias_init,
  gather_by_position,
  no_decode_segments,
  ring_write,
  rms_normalize,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, head_output, per_head, register
from attnzoo.ops import delta_rule as dr_ops
from attnzoo.ops import softmax_attention
from attnzoo.ops.rotary import apply_rope
from attnzoo.ops.segments import EMPTY

F32 = jnp.float32


def _l2(x):
  """x / |x| over the last axis (float32)."""
  return rms_normalize(x) * x.shape[-1] ** -0.5


def _shift(x, n, fill=0):
  """x[:, t - n] at every t ([B, T, ...]), `fill` before the start."""
  widths = ((0, 0), (n, 0)) + ((0, 0),) * (x.ndim - 2)
  return jnp.pad(x, widths, constant_values=fill)[:, : x.shape[1]]


@register("ahn")
class AHN(nn.Module):
  """Sliding-window attention plus a Gated DeltaNet memory of the tokens that left the
  window (module docstring)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  window: int = 512
  rope: bool = True
  rope_base: float = 10000.0
  zero_memory_out: bool = True
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _head_dim(self) -> int:
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    return per_head(self.d_model, self.num_heads)

  def state_size(self, seq_len: int) -> int:
    """Decoding bytes at float32: the window's k, v, beta and decay, and the memory state."""
    heads, d = self.num_heads, self._head_dim()
    kept = min(seq_len, self.window)
    return state_bytes((kept, heads, 2 * d + 2), (heads, d, d))

  def setup(self):
    heads, d = self.num_heads, self._head_dim()
    dense = lambda shape, **kw: nn.DenseGeneral(
      shape, dtype=self.dtype, kernel_init=dense_init, **kw
    )
    self.q, self.k, self.v = dense((heads, d)), dense((heads, d)), dense((heads, d))
    self.b = dense(heads, use_bias=False)
    self.a = dense(heads, use_bias=False)
    self.g = dense((heads, d), use_bias=False)
    self.A_log = self.param(
      "A_log", lambda key, shape: jnp.log(jax.random.uniform(key, shape, F32, 1e-4, 16.0)), (heads,)
    )
    self.dt_bias = self.param("dt_bias", dt_bias_init(1e-3, 1e-1, 1e-4), (heads,))
    self.norm = GatedRMSNorm(norm_before_gate=True)
    self.memory_out = nn.DenseGeneral(
      (heads, d),
      axis=(-2, -1),
      dtype=self.dtype,
      use_bias=False,
      kernel_init=nn.initializers.zeros if self.zero_memory_out else dense_init,
    )
    self.out = head_output(self.d_model, self.num_layers, self.dtype)

  def _inputs(self, x, positions):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope:
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    beta = jax.nn.sigmoid(self.b(x).astype(F32))
    log_decay = -jnp.exp(self.A_log) * jax.nn.softplus(self.a(x).astype(F32) + self.dt_bias)
    return q, k, v, beta, log_decay

  def _window_attention(self, q, k, v, **kw):
    return softmax_attention(
      q,
      k,
      v,
      scale=q.shape[-1] ** -0.5,
      causal=True,
      window=(self.window - 1, 0),
      implementation=self.implementation,
      **kw,
    )

  def _memory(self, q, evicted, **kw):
    """Gated DeltaNet over the evicted tokens (k, v, beta, log_decay, all [B, T, ...]: the
    token leaving the window at each step, zeros where none does)."""
    k, v, beta, log_decay = evicted
    return dr_ops.delta_rule(
      _l2(q).astype(v.dtype),
      _l2(k).astype(v.dtype),
      v,
      beta,
      scale=q.shape[-1] ** -0.5,
      log_decay=log_decay,
      implementation=self.implementation,
      **kw,
    )

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    positions = default_positions(x, positions)
    q, k, v, beta, log_decay = self._inputs(x, positions)
    if decode:
      no_decode_segments(segment_ids)
      o_win, o_mem = self._decode(q, k, v, beta, log_decay, positions)
    else:
      o_win = self._window_attention(q, k, v, segment_ids=segment_ids)
      evicted = [_shift(a, self.window) for a in (k, v, beta, log_decay)]
      if segment_ids is not None:  # a token enters only its own document's memory
        same = _shift(segment_ids, self.window, -1) == segment_ids
        evicted = [jnp.where(same.reshape(same.shape + (1,) * (a.ndim - 2)), a, 0) for a in evicted]
      o_mem = self._memory(q, evicted, segment_ids=segment_ids)
    memory = self.memory_out(self.norm(o_mem, self.g(x)))
    return self.out(o_win + memory.astype(o_win.dtype))

  @nn.compact
  def _decode(self, q, k, v, beta, log_decay, positions):
    batch, steps, heads, d = q.shape
    initialized = self.has_variable("cache", "keys")
    # The cache is sized by `model.init(..., decode=True)` on an input of the longest context.
    n = min(self.window, steps)
    var = lambda name, shape, fill=0: self.variable("cache", name, jnp.full, shape, fill, F32)
    ring = [
      var("keys", (batch, n, heads, d)),
      var("values", (batch, n, heads, d)),
      var("beta", (batch, n, heads)),
      var("log_decay", (batch, n, heads)),
      self.variable("cache", "positions", jnp.full, (batch, n), EMPTY),
    ]
    state = self.variable("cache", "state", dr_ops.init_state, batch, heads, d, d)
    if not initialized:
      o_win = self._window_attention(q, k, v)
      evicted = [_shift(a, self.window) for a in (k, v, beta, log_decay)]
      return o_win, self._memory(q, evicted)
    new = (k, v, beta, log_decay)
    pool = [jnp.concatenate([r.value, a.astype(F32)], axis=1) for r, a in zip(ring, new)]
    pool_positions = jnp.concatenate([ring[-1].value, positions], axis=1)
    o_win = softmax_attention(
      q,
      pool[0].astype(k.dtype),
      pool[1].astype(v.dtype),
      scale=d**-0.5,
      causal=True,
      window=(self.window - 1, 0),
      q_positions=positions,
      kv_positions=pool_positions,
      implementation=self.implementation,
    )
    # the tokens leaving the window at these steps, from the ring or the new tokens
    evicted, found = gather_by_position(pool, pool_positions, positions - self.window)
    keep = lambda a: jnp.where(found.reshape(found.shape + (1,) * (a.ndim - 2)), a, 0.0)
    evicted = [keep(a) for a in evicted]
    evicted[0], evicted[1] = evicted[0].astype(k.dtype), evicted[1].astype(v.dtype)
    o_mem, state.value = self._memory(
      q, evicted, initial_state=state.value, return_final_state=True
    )
    ring_write(ring, new, positions)
    return o_win, o_mem
