"""Aaren (Feng et al. 2024, "Attention as an RNN"): attention of one learned, input-independent
query per head over the tokens seen so far, computed for every prefix at once by a parallel
prefix scan (attnzoo.ops.prefix_attention):

  s_t = q_h · k_t / sqrt(d_head),  k_t = W_k x_t,  v_t = W_v x_t
  o_t = Σ_{i<=t} softmax_{i<=t}(s)_i v_i,        y_t = W_o o_t

The paper's Aaren module is this many-to-many RNN with the query token learned by
backpropagation; stacking, residuals and MLPs are the block's. Decoding keeps the scan state
(m, u, w) per head: O(1) memory in the context length. Init: the query and the projections
N(0, 0.02) (the zoo's default; the paper gives no initialisation), so every token starts as a
uniform average of its prefix. Causal only (the many-to-one form has no per-token query).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import PrefixAttentionOp, hidden_attention, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, per_head, register
from attnzoo.ops import prefix_attention as pa_ops


@register("aaren")
class Aaren(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: (w, u, m) per head, [H, d_head + 2], whatever the context length."""
    return state_bytes((self.num_heads, per_head(self.d_model, self.num_heads) + 2))

  def setup(self):
    head_dim = per_head(self.d_model, self.num_heads)
    self.query = self.param("query", dense_init, (self.num_heads, head_dim), jnp.float32)
    dense = lambda: nn.DenseGeneral(
      (self.num_heads, head_dim), dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    self.k, self.v = dense(), dense()
    self.op = PrefixAttentionOp(self.implementation)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)

  def _scores(self, k: jax.Array) -> jax.Array:
    scale = k.shape[-1] ** -0.5
    return jnp.einsum("bthd,hd->bth", k.astype(jnp.float32), self.query) * scale

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    k, v = self.k(x), self.v(x)
    o = self.op(self._scores(k), v, segment_ids=segment_ids, decode=decode)
    return self.out(o.astype(self.dtype))

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """[B,H,T,T]: row t is the softmax over i <= t of the learned query's scores."""
    k = self.k(x)

    def op(s, _, v, implementation):
      return pa_ops.prefix_attention(
        s[..., 0], v, segment_ids=segment_ids, implementation=implementation
      )

    s = self._scores(k)[..., None]
    return hidden_attention(op, s, jnp.zeros(k.shape[:3] + (1,)))
