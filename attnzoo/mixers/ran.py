"""Recurrent Attention Network mixer (Li et al. 2023, "Recurrent Attention Networks for
Long-text Modeling"; official code 4AI/RAN, rannet/ran.py), in a causal form.

The sequence is cut into windows of `window` tokens (the last one may be shorter). Window i is
encoded by multi-head self-attention over [cell_i ; window i], where cell_i is the Global
Perception Cell (GPC) carried recurrently across windows:

  z        = LN([cell_i ; x_window])                 (per-token LayerNorm)
  q, k, v  = swish(W z + b) per head, RoPE at offsets 0 (cell), 1..W (tokens) in the window
  e        = LN(swish(W_o attn(q, k, v) + b_o) + GLU(z)),   GLU(u) = (W u + b) * sigmoid(W' u + b')
  c_i, h   = std(e[cell]), std(e[tokens])            (std: parameter-free standardisation)
  cell_1   = c_0;   cell_{i+1} = LN(c_i + GLU(c_{i-1}))   (the paper's GPC residual update)

and every token output h_t then reviews the memory (the paper's memory review): one-head
attention of h_t over the cells' outputs c_j, y_t = LN(swish(W_o attn + b_o) + GLU(q_t)) with
q = swish(W_q h + b), k, v = swish(W c + b), written into the residual stream by a bias-free
projection (Zoology's scaled init).

Causal form (the official causal "LM mask" masks the cell row too, so its cell never sees the
tokens and carries nothing): a token sees the cell of its window and the earlier tokens of its
window; the cell row sees its whole window, and its output c_i is used only by later windows;
in the memory review a token of window i attends to c_j for j < i only (the first window
reviews nothing: a zero attention output). The cell chain is a `lax.scan` across windows (one
query per window, since LayerNorm and the projections act per token the tokens' q, k, v are
computed outside it); the tokens' attention runs for all windows at once.

Deviations from the official code: windows are fixed (the code merges a final window shorter
than `min_window_size` into the previous one, which would make a token's window depend on the
sequence length, so decoding could not match); the initial cell is a learned vector (the
code's cell initialiser maps its zero cell through a bias-free Dense and a LayerNorm, i.e. to
that LayerNorm's offset: the same thing); the zoo's N(0, 0.02) initialisation and heads of
d_model / num_heads channels (the code: glorot-normal, head_size 256); no dropout; the output
projection (RanNet stacks RAN layers without residuals or MLPs).

Decoding keeps the current window's keys and values (slot = position mod window), the cell
and the previous cell output, and the memory review's keys and values of every completed
window; a window's cell is updated when its last token arrives. One code path serves the
forward pass and decoding.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import default_positions, state_bytes
from attnzoo.mixers.registry import dense_init, output_init, per_head, register
from attnzoo.ops import softmax_attention
from attnzoo.ops.rotary import apply_rope

F32 = jnp.float32


def standardize(x: jax.Array, eps: float = 1e-7) -> jax.Array:
  """(x - mean) / sqrt(mean(x^2) + eps) over the last axis (RAN's standard_normalize)."""
  x32 = x.astype(F32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(jnp.mean(x32**2, axis=-1, keepdims=True) + eps)).astype(
    x.dtype
  )


class GLU(nn.Module):
  """(W u + b) * sigmoid(W' u + b'), both of width `width`."""

  width: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, u: jax.Array) -> jax.Array:
    dense = lambda name: nn.Dense(self.width, dtype=self.dtype, kernel_init=dense_init, name=name)
    return dense("linear")(u) * jax.nn.sigmoid(dense("gate")(u))


@register("ran")
class RAN(nn.Module):
  """Recurrent Attention Network, causal (module docstring)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 8
  window: int = 128
  rope: bool = True
  rope_base: float = 10000.0
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _head_dim(self) -> int:
    if self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    return per_head(self.d_model, self.num_heads)

  def state_size(self, seq_len: int) -> int:
    """Decoding bytes at float32: the window's keys and values, the cell and the previous cell
    output, the memory review's keys and values of every window."""
    windows = -(-seq_len // self.window)
    kept = min(seq_len, self.window)
    return state_bytes((2, kept, self.d_model), (2, self.d_model), (2, windows, self.d_model))

  def setup(self):
    heads, head_dim = self.num_heads, self._head_dim()
    width = self.d_model
    norm = lambda: nn.LayerNorm(dtype=self.dtype)
    dense = lambda shape, **kw: nn.DenseGeneral(
      shape, dtype=self.dtype, kernel_init=dense_init, **kw
    )
    self.initial_cell = self.param("initial_cell", nn.initializers.zeros, (width,), F32)
    self.input_norm = norm()
    self.q, self.k, self.v = (dense((heads, head_dim)) for _ in range(3))
    self.o = dense(width, axis=(-2, -1))
    self.encode_glu, self.encode_norm = GLU(width, self.dtype), norm()
    self.cell_glu, self.cell_norm = GLU(width, self.dtype), norm()
    self.review_q, self.review_k, self.review_v, self.review_o = (dense(width) for _ in range(4))
    self.review_glu, self.review_norm = GLU(width, self.dtype), norm()
    self.out = nn.Dense(
      width, dtype=self.dtype, use_bias=False, kernel_init=output_init(self.num_layers)
    )

  def _qkv(self, x, offsets):
    """z = LN(x) and the swish q, k, v per head of tokens (or cells) at window offsets."""
    z = self.input_norm(x)
    q, k, v = (nn.swish(proj(z)) for proj in (self.q, self.k, self.v))
    if self.rope:
      q = apply_rope(q, offsets, base=self.rope_base)
      k = apply_rope(k, offsets, base=self.rope_base)
    return z, q, k, v

  def _encoded(self, attended, z):
    """std(LN(swish(W_o attn + b_o) + GLU(z)))."""
    return standardize(self.encode_norm(nn.swish(self.o(attended)) + self.encode_glu(z)))

  def _cell_step(self, carry, inputs):
    """One window of the GPC chain: (cell, previous cell output), (the window's keys and values
    [B, W, H, d], its index [B], complete [B]) -> next carry, (cell, cell output)."""
    cell, previous = carry
    keys, values, index, complete = inputs
    offsets = jnp.zeros(cell.shape[:1] + (1,), jnp.int32)
    z, q, k, v = self._qkv(cell[:, None], offsets)
    attended = softmax_attention(
      q,
      jnp.concatenate([k, keys], axis=1),
      jnp.concatenate([v, values], axis=1),
      scale=q.shape[-1] ** -0.5,
      implementation=self.implementation,
    )
    out = self._encoded(attended, z)[:, 0]
    updated = self.cell_norm(out + self.cell_glu(previous))
    following = jnp.where(index[:, None] == 0, out, updated)
    keep = complete[:, None]
    carry = (jnp.where(keep, following, cell), jnp.where(keep, out, previous))
    return carry, (cell, out)

  def _mix(self, x, positions, cell, previous, ring=None, review=None):
    """The outputs [B, S, D] of tokens at `positions` (consecutive per row) given the state
    before them: the cell and previous cell output [B, D], the current window's keys and values
    `ring` ([B, n, H, d] at slot = position mod window, decoding) and the memory review's keys
    and values of earlier windows (`review`, [B, N, D], decoding). Returns (y, state after)."""
    batch, steps, _ = x.shape
    w = self.window
    start = positions[:, :1] // w * w
    slots = positions - start  # index in the window-aligned layout
    num = (steps + (w - 1 if ring is not None else 0) - 1) // w + 1
    z, q, k, v = self._qkv(x, positions % w + 1)
    rows = jnp.arange(batch)[:, None]

    def aligned(a, first=None):
      """[B, S, ...] -> [B, num, W, ...] at slots; decoding fills the first window's earlier
      slots from `first` (the ring)."""
      if first is None:  # the whole sequence from position 0
        buf = jnp.pad(a, ((0, 0), (0, num * w - steps)) + ((0, 0),) * (a.ndim - 2))
      else:
        buf = jnp.zeros((batch, num * w) + a.shape[2:], a.dtype)
        buf = buf.at[:, : first.shape[1]].set(first.astype(a.dtype)).at[rows, slots].set(a)
      return buf.reshape(batch, num, w, *a.shape[2:])

    q_win = aligned(q, None if ring is None else jnp.zeros_like(ring[0]))
    k_win = aligned(k, None if ring is None else ring[0])
    v_win = aligned(v, None if ring is None else ring[1])
    index = start // w + np.arange(num)  # [B, num] windows of the layout
    complete = (index + 1) * w <= positions[:, -1:] + 1
    scan = nn.scan(
      lambda module, carry, xs: module._cell_step(carry, xs),
      variable_broadcast="params",
      split_rngs={"params": False},
    )
    time_major = lambda a: jnp.swapaxes(a, 0, 1)
    (cell, previous), (cells, outs) = scan(
      self, (cell, previous), tuple(map(time_major, (k_win, v_win, index, complete)))
    )
    cells, outs = time_major(cells), time_major(outs)  # [B, num, D]
    # every window's tokens attend to [its cell ; its earlier tokens] (the cell's query row,
    # at offset 0, is computed in the scan and dropped here)
    _, qc, kc, vc = self._qkv(cells, jnp.zeros(cells.shape[:2], jnp.int32))
    window_major = lambda c, t: jnp.concatenate([c[:, :, None], t], axis=2).reshape(
      batch * num, w + 1, *t.shape[3:]
    )
    attended = softmax_attention(
      window_major(qc, q_win),
      window_major(kc, k_win),
      window_major(vc, v_win),
      scale=q.shape[-1] ** -0.5,
      causal=True,
      implementation=self.implementation,
    )[:, 1:]
    attended = attended.reshape(batch, num * w, *attended.shape[2:])
    attended = attended[:, :steps] if ring is None else attended[rows, slots]
    h = self._encoded(attended, z)
    # memory review: tokens of window i attend to the cell outputs of windows j < i
    new_review = jnp.stack([nn.swish(self.review_k(outs)), nn.swish(self.review_v(outs))])
    if review is None:
      review, review_windows = new_review, index
    else:
      target = jnp.where(complete, index, review.shape[2])  # incomplete windows are dropped
      review = review.at[:, rows, target].set(new_review.astype(review.dtype), mode="drop")
      review_windows = jnp.broadcast_to(np.arange(review.shape[2]), (batch, review.shape[2]))
    rq = nn.swish(self.review_q(h))
    reviewed = softmax_attention(
      rq[:, :, None],
      review[0][:, :, None].astype(rq.dtype),
      review[1][:, :, None].astype(rq.dtype),
      scale=self.d_model**-0.5,
      causal=True,
      q_positions=positions // w - 1,
      kv_positions=review_windows,
      implementation=self.implementation,
    )[:, :, 0]
    y = self.review_norm(nn.swish(self.review_o(reviewed)) + self.review_glu(rq))
    return self.out(y), (cell, previous, (k, v), review)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    if segment_ids is not None:
      raise ValueError("ran does not take segment_ids (packed documents)")
    self._head_dim()
    if decode:
      return self._decode(x, default_positions(x, positions))
    return self._forward(x)

  def _forward(self, x):
    """The whole sequence from the initial cell; windows follow the time index (RoPE acts
    within a window, so positions are not needed)."""
    cell = jnp.broadcast_to(self.initial_cell, (x.shape[0], x.shape[2]))
    y, _ = self._mix(x, default_positions(x, None), cell, jnp.zeros_like(cell))
    return y

  @nn.compact
  def _decode(self, x, positions):
    batch, steps, width = x.shape
    heads, head_dim = self.num_heads, self._head_dim()
    initialized = self.has_variable("cache", "keys")
    # The cache is sized by `model.init(..., decode=True)` on an input of the longest context.
    var = lambda name, shape: self.variable("cache", name, jnp.zeros, shape, F32)
    kept = min(steps, self.window)
    keys, values = (var(n, (batch, kept, heads, head_dim)) for n in ("keys", "values"))
    cell, previous = var("cell", (batch, width)), var("previous", (batch, width))
    review = var("review", (2, batch, -(-steps // self.window), width))
    if not initialized:
      return self._forward(x)
    first = positions[:, :1] == 0
    start_cell = jnp.where(first, self.initial_cell, cell.value)
    y, (c, p, (k, v), r) = self._mix(
      x, positions, start_cell, previous.value, (keys.value, values.value), review.value
    )
    cell.value, previous.value, review.value = c, p, r
    kept = min(steps, keys.value.shape[1])
    slots = positions[:, -kept:] % self.window
    rows = jnp.arange(batch)[:, None]
    keys.value = keys.value.at[rows, slots].set(k[:, -kept:].astype(F32))
    values.value = values.value.at[rows, slots].set(v[:, -kept:].astype(F32))
    return y
