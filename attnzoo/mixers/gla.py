"""Gated Linear Attention (GLA; Yang et al. 2023, "Gated Linear Attention Transformers with
Hardware-Efficient Training"), and the pieces every mixer on the decayed linear-attention op
shares (decoding through the "cache" collection, the hidden attention matrix).

Per head, with a data-dependent decay on each key channel:
  alpha_t = sigmoid(x_t W_a1 W_a2 + b_a) ** (1 / tau)          (low-rank gate, tau = 16)
  S_t = diag(alpha_t) S_{t-1} + k_t v_t^T,   o_t = S_t^T q_t / sqrt(d_k)
  y_t = W_o [RMSNorm(o_t) * swish(W_r x_t)]                     (per-head norm, output gate)
so log alpha_t = logsigmoid(x_t W_a1 W_a2 + b_a) / tau, the gate of fla's GLA layer.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import GatedRMSNorm
from attnzoo.mixers.registry import dense_init, output_init, register
from attnzoo.ops import linear_attention as la_ops

linear_attention = la_ops.linear_attention


# ----------------------------------------------------------------------------- shared helpers

def no_decode_segments(segment_ids):
  if segment_ids is not None:
    raise ValueError("decoding does not take segment_ids (one sequence per batch row)")


def cached_linear_attention(module: nn.Module, q, k, v, *, scale, log_decay=None, bonus=None,
                            normalize=False, implementation="auto", name="state"):
  """Decayed linear attention that continues from, and updates, the recurrent state kept in
  `module`'s "cache" collection. Call it from a compact method of `module`.

  The first call (inside `init(..., decode=True)`) creates a zero state [B,H,K,V(+1)] and runs
  the plain forward without touching it; later calls continue from the state: one token via
  the op's `step`, a prompt via the op with initial_state / return_final_state.
  """
  batch, steps, heads, k_dim = q.shape
  v_dim = v.shape[-1]
  initialized = module.has_variable("cache", name)
  state = module.variable("cache", name, la_ops.init_state, batch, heads, k_dim, v_dim,
                          normalize=normalize)
  if not initialized:
    return linear_attention(q, k, v, scale=scale, log_decay=log_decay, bonus=bonus,
                            normalize=normalize, implementation=implementation)
  if steps == 1:
    new_state, o = la_ops.step(state.value, q[:, 0], k[:, 0], v[:, 0],
                               None if log_decay is None else log_decay[:, 0], scale=scale,
                               bonus=bonus, normalize=normalize)
    o = o[:, None]
  else:
    o, new_state = linear_attention(q, k, v, scale=scale, log_decay=log_decay, bonus=bonus,
                                    normalize=normalize, initial_state=state.value,
                                    return_final_state=True, implementation=implementation)
  state.value = new_state
  return o


def linear_attention_state_bytes(heads, k_dim, v_dim, *, normalize=False):
  """Bytes (float32) of the op's recurrent state for one example."""
  return heads * k_dim * (v_dim + (1 if normalize else 0)) * 4


def hidden_attention(q, k, *, scale, log_decay=None, bonus=None, normalize=False,
                     segment_ids=None):
  """The attention matrix [B,H,T,T] a decayed linear attention applies to its values.

  The op is linear in v, so feeding it one-hot values v[b,s,h,:] = e_s returns row t of the
  (implicit) attention matrix at output position t.
  """
  batch, steps, heads, _ = q.shape
  one_hot = jnp.broadcast_to(jnp.eye(steps, dtype=jnp.float32)[None, :, None, :],
                             (batch, steps, heads, steps))
  rows = linear_attention(q.astype(jnp.float32), k.astype(jnp.float32), one_hot, scale=scale,
                          log_decay=log_decay, bonus=bonus, normalize=normalize,
                          segment_ids=segment_ids, implementation="xla")
  return jnp.transpose(rows, (0, 2, 1, 3))


def split_heads(x, heads):
  return x.reshape(x.shape[:-1] + (heads, x.shape[-1] // heads))


# ----------------------------------------------------------------------------- GLA

@register("gla")
class GLA(nn.Module):
  """Gated Linear Attention with a low-rank data-dependent key-channel gate.

  Key dim d_model * expand_k and value dim d_model * expand_v are split over num_heads.
  """
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  expand_k: float = 0.5
  expand_v: float = 1.0
  gate_low_rank_dim: int = 16
  gate_logit_normalizer: float = 16.0
  output_gate: bool = True
  norm_eps: float = 1e-5
  implementation: str = "auto"
  dtype: Any = jnp.float32

  def _dims(self):
    k_total, v_total = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
    for what, n in (("d_model * expand_k", k_total), ("d_model * expand_v", v_total)):
      if n % self.num_heads or n == 0:
        raise ValueError(f"gla: {what} ({n}) must be a positive multiple of num_heads "
                         f"({self.num_heads})")
    return self.num_heads, k_total // self.num_heads, v_total // self.num_heads

  def state_size(self, seq_len: int) -> int:
    """Recurrent-state bytes at float32 (independent of seq_len)."""
    heads, k_dim, v_dim = self._dims()
    return linear_attention_state_bytes(heads, k_dim, v_dim)

  def setup(self):
    heads, k_dim, v_dim = self._dims()
    dense = lambda shape, **kw: nn.DenseGeneral(shape, dtype=self.dtype, use_bias=False,
                                                kernel_init=dense_init, **kw)
    self.q, self.k = dense((heads, k_dim)), dense((heads, k_dim))
    self.v = dense((heads, v_dim))
    self.gate_down = dense(self.gate_low_rank_dim)
    self.gate_up = nn.DenseGeneral((heads, k_dim), dtype=jnp.float32, kernel_init=dense_init)
    if self.output_gate:
      self.g = dense((heads, v_dim))
      self.norm = GatedRMSNorm(norm_before_gate=True, eps=self.norm_eps)
    else:
      self.norm = nn.RMSNorm(epsilon=self.norm_eps, dtype=self.dtype)
    self.out = nn.DenseGeneral(self.d_model, axis=(-2, -1), dtype=self.dtype, use_bias=False,
                               kernel_init=output_init(self.num_layers))

  def _features(self, x):
    log_decay = jax.nn.log_sigmoid(self.gate_up(self.gate_down(x)).astype(jnp.float32))
    return self.q(x), self.k(x), self.v(x), log_decay / self.gate_logit_normalizer

  def _scale(self):
    return self._dims()[1] ** -0.5

  def __call__(self, x, *, positions=None, segment_ids=None, decode=False):
    q, k, v, log_decay = self._features(x)
    if decode:
      no_decode_segments(segment_ids)
      o = self._decode(q, k, v, log_decay)
    else:
      o = linear_attention(q, k, v, scale=self._scale(), log_decay=log_decay,
                           segment_ids=segment_ids, implementation=self.implementation)
    o = self.norm(o, self.g(x)) if self.output_gate else self.norm(o)
    return self.out(o)

  @nn.compact
  def _decode(self, q, k, v, log_decay):
    return cached_linear_attention(self, q, k, v, scale=self._scale(), log_decay=log_decay,
                                   implementation=self.implementation)

  def attention_matrix(self, x, *, positions=None, segment_ids=None):
    """Hidden attention [B,H,T,T] of the gated recurrence (before norm and output gate)."""
    q, k, _, log_decay = self._features(x)
    return hidden_attention(q, k, scale=self._scale(), log_decay=log_decay,
                            segment_ids=segment_ids)
