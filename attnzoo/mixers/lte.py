"""Sliding-window attention with sinks and learnable token eviction (LTE; "Alleviating
Forgetfulness of Linear Attention by Hybrid Sparse Attention and Contextualized Learnable Token
Eviction", seed #12): each query sees the `sink_tokens` first tokens, the last `window` tokens
(itself included), and per head at most `retained` earlier tokens chosen by a learned score.

  r_{j,h}  = CNN(k)_{j,h}: three 1-D convolutions over time (kernel `score_kernel`, SiLU
             between, width `score_width`, then one output per head) on the un-rotated keys of
             all heads; centred, so r_j sees R = 3 (score_kernel // 2) tokens on each side of j
  retained = per head, the `retained` highest-scoring tokens among those that have left the
             window (s <= j <= t - window; ties to the earlier token): a constant-size cache,
             since a token evicted once never beats the tokens that evicted it again
  o_t      = softmax over the visible keys of q_t·k_j / sqrt(d) (+ log sigmoid(r_{j,h}) for a
             retained j)

Causality: r_j depends on tokens up to j + R and is used only by queries t >= j + window, so the
window must exceed R (checked). Training signal: the top-`retained` selection has no gradient;
here the score also enters the retained tokens' logits as log sigmoid(r) (their attention weight
times sigmoid(r)), which trains the CNN through the attention. This gate, the score network's
width and activation, and the defaults (window 64, 4 sinks, 64 retained) are this
implementation's choices, not taken from the paper. The forward builds the dense [B, H, T, T]
visibility mask (reference and only path; O(T^2) memory, for CPU-scale and MQAR-scale runs).

Decoding keeps, per example, the sinks' keys and values, a ring of the last window + R tokens
(un-rotated keys, for the score of the token leaving the window), and per head the retained
tokens' keys, values, scores and positions: a cache of constant size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import default_positions, gather_by_position, ring_write, state_bytes
from attnzoo.mixers.registry import dense_init, head_output, per_head, register
from attnzoo.ops import softmax_attention
from attnzoo.ops.rotary import apply_rope
from attnzoo.ops.segments import EMPTY

F32 = jnp.float32


class RetentionScorer(nn.Module):
  """Three VALID 1-D convolutions over time; inputs at positions < 0 (and every layer's
  activations there) are zero, as with zero padding at the sequence start. keys [N, L, C] at
  positions [N, L] -> scores [N, L - 2R, heads] of the central positions (float32)."""

  heads: int
  width: int
  kernel: int

  @nn.compact
  def __call__(self, keys: jax.Array, positions: jax.Array) -> jax.Array:
    half = self.kernel // 2
    h = keys.astype(F32)
    for i, features in enumerate((self.width, self.width, self.heads)):
      h = jnp.where(positions[..., None] >= 0, h, 0.0)
      h = nn.Conv(
        features, (self.kernel,), padding="VALID", kernel_init=dense_init, name=f"conv{i}"
      )(h)
      positions = positions[:, half : positions.shape[1] - half]
      if i < 2:
        h = nn.silu(h)
    return h


def _beats(scores_i, positions_i, scores_j, positions_j):
  """i ranks above j: a higher score, ties to the earlier position."""
  return (scores_i > scores_j) | ((scores_i == scores_j) & (positions_i < positions_j))


@register("lte")
class LTE(nn.Module):
  """Sliding window + sinks + learnably retained tokens (module docstring)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  window: int = 64
  sink_tokens: int = 4
  retained: int = 64
  score_kernel: int = 3
  score_width: int = 16
  rope: bool = True
  rope_base: float = 10000.0
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _reach(self) -> int:
    """R: how far the score of a token looks to each side; validates the options."""
    if self.score_kernel < 1 or self.score_kernel % 2 == 0:
      raise ValueError(f"score_kernel must be odd and >= 1, got {self.score_kernel}")
    reach = 3 * (self.score_kernel // 2)
    if self.window <= reach:
      raise ValueError(
        f"window ({self.window}) must exceed the score's reach 3 * (score_kernel // 2) = "
        f"{reach}, so a token's score is complete before it leaves the window"
      )
    if self.sink_tokens < 0 or self.retained < 0:
      raise ValueError(
        f"sink_tokens and retained must be >= 0, got {self.sink_tokens}, {self.retained}"
      )
    return reach

  def _cache_sizes(self, seq_len: int) -> tuple[int, int, int]:
    """(ring, sinks, retained slots) kept for a context of seq_len tokens."""
    ring = min(seq_len, self.window + self._reach())
    return ring, min(seq_len, self.sink_tokens), min(seq_len, self.retained)

  def state_size(self, seq_len: int) -> int:
    """Decoding bytes at float32: keys and values of the ring, the sinks and the retained
    slots, and the retained tokens' scores."""
    ring, sinks, kept = self._cache_sizes(seq_len)
    return state_bytes((2 * (ring + sinks + kept), self.d_model), (kept, self.num_heads))

  def setup(self):
    heads, head_dim = self.num_heads, per_head(self.d_model, self.num_heads)
    self._reach()
    dense = lambda: nn.DenseGeneral((heads, head_dim), dtype=self.dtype, kernel_init=dense_init)
    self.q, self.k, self.v = dense(), dense(), dense()
    self.scorer = RetentionScorer(heads, self.score_width, self.score_kernel)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)

  def _rotate(self, x, positions):
    return apply_rope(x, positions, base=self.rope_base) if self.rope else x

  def _attend(self, q, k, v, bias):
    return softmax_attention(
      q, k, v, scale=q.shape[-1] ** -0.5, bias=bias, implementation=self.implementation
    )

  def visibility(self, scores: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Masks [B, H, T, T] of the whole sequence from scores [B, T, H]: (seen through the window
    or as a sink, seen as a retained token)."""
    steps = scores.shape[1]
    t, j = np.arange(steps)[:, None], np.arange(steps)[None, :]
    local = (j <= t) & ((j > t - self.window) | (j < self.sink_tokens))
    r = jnp.swapaxes(scores, 1, 2)  # [B, H, T]
    beats = _beats(r[..., :, None], np.arange(steps)[:, None], r[..., None, :], j)
    beats &= (np.arange(steps) >= self.sink_tokens)[:, None]
    # rank of j among the candidates i <= m: count[..., m, j]; query t takes m = t - window
    count = jnp.cumsum(beats, axis=-2)
    rank = jnp.take(count, np.clip(np.arange(steps) - self.window, 0, None), axis=-2)
    retained = (j >= self.sink_tokens) & (j <= t - self.window) & (rank < self.retained)
    return jnp.broadcast_to(local, retained.shape), retained

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    if segment_ids is not None:
      raise ValueError("lte does not take segment_ids (packed documents)")
    positions = default_positions(x, positions)
    q, k, v = self.q(x), self.k(x), self.v(x)
    if decode:
      o = self._decode(q, k, v, positions)
    else:
      o = self._forward(q, k, v, positions)
    return self.out(o)

  def _scores(self, k):
    """Scores [B, T, H] of every token of a whole sequence (zero-padded at both ends)."""
    batch, steps = k.shape[:2]
    reach = self._reach()
    keys = jnp.pad(k.reshape(batch, steps, -1), ((0, 0), (reach, reach), (0, 0)))
    at = jnp.broadcast_to(np.arange(-reach, steps + reach), keys.shape[:2])
    return self.scorer(keys, at)

  def _forward(self, q, k, v, positions):
    scores = self._scores(k)
    local, retained = self.visibility(scores)
    gate = jax.nn.log_sigmoid(jnp.swapaxes(scores, 1, 2))[..., None, :]
    bias = jnp.where(local, 0.0, jnp.where(retained, gate, -jnp.inf))
    return self._attend(self._rotate(q, positions), self._rotate(k, positions), v, bias)

  @nn.compact
  def _decode(self, q, k, v, positions):
    batch, steps, heads, head_dim = q.shape
    reach, w, s = self._reach(), self.window, self.sink_tokens
    initialized = self.has_variable("cache", "ring_keys")
    # The cache is sized by `model.init(..., decode=True)` on an input of the longest context.
    n_ring, n_sink, n_kept = self._cache_sizes(steps)
    var = lambda name, shape, fill=0.0, dtype=F32: self.variable(
      "cache", name, jnp.full, shape, fill, dtype
    )
    kv = lambda name, n: var(name, (batch, n, heads, head_dim))
    ring = [kv("ring_keys", n_ring), kv("ring_values", n_ring)]
    ring.append(var("ring_positions", (batch, n_ring), EMPTY, jnp.int32))
    sink_k, sink_v = kv("sink_keys", n_sink), kv("sink_values", n_sink)
    sink_pos = var("sink_positions", (batch, n_sink), EMPTY, jnp.int32)
    kept_k, kept_v = kv("kept_keys", n_kept), kv("kept_values", n_kept)
    kept_score = var("kept_scores", (batch, n_kept, heads))
    kept_pos = var("kept_positions", (batch, n_kept, heads), -1, jnp.int32)
    if not initialized:
      return self._forward(q, k, v, positions)
    n_sink, n_kept = sink_k.value.shape[1], kept_k.value.shape[1]
    rows = jnp.arange(batch)[:, None]
    qr, kr = self._rotate(q, positions), self._rotate(k, positions)
    # sinks arriving now (slot = position)
    slot = jnp.where(positions < n_sink, positions, n_sink)
    sink_k.value = sink_k.value.at[rows, slot].set(kr.astype(F32), mode="drop")
    sink_v.value = sink_v.value.at[rows, slot].set(v.astype(F32), mode="drop")
    sink_pos.value = sink_pos.value.at[rows, slot].set(positions, mode="drop")
    # the ring and the new tokens; the tokens leaving the window now, with their scores
    pool_pos = jnp.concatenate([ring[2].value, positions], axis=1)
    pool_k = jnp.concatenate([ring[0].value, k.astype(F32)], axis=1)
    pool_v = jnp.concatenate([ring[1].value, v.astype(F32)], axis=1)
    pool_kr = self._rotate(pool_k, pool_pos)
    leaving = positions - w
    around = leaving[..., None] + np.arange(-reach, reach + 1)  # [B, S, 2R + 1]
    (keys,), found = gather_by_position([pool_k], pool_pos, around)
    keys = jnp.where(found[..., None, None], keys, 0.0).reshape(batch * steps, 2 * reach + 1, -1)
    at = jnp.where(around < 0, -1, around).reshape(batch * steps, -1)
    score = self.scorer(keys, at).reshape(batch, steps, heads)
    (leave_k, leave_v), found = gather_by_position([pool_kr, pool_v], pool_pos, leaving)
    leave_pos = jnp.where(found & (leaving >= s), leaving, -1)
    # candidates: the retained tokens and those leaving now; query t ranks those <= t - w
    cand_k = jnp.concatenate([kept_k.value, leave_k], axis=1)
    cand_v = jnp.concatenate([kept_v.value, leave_v], axis=1)
    cand_score = jnp.concatenate([kept_score.value, score], axis=1)  # [B, C, H]
    cand_pos = jnp.concatenate(
      [kept_pos.value, jnp.broadcast_to(leave_pos[..., None], score.shape)], axis=1
    )
    sc, ps = jnp.swapaxes(cand_score, 1, 2), jnp.swapaxes(cand_pos, 1, 2)  # [B, H, C]
    beats = _beats(sc[..., :, None], ps[..., :, None], sc[..., None, :], ps[..., None, :])
    seen = (ps >= 0)[..., None, :] & (ps[..., None, :] <= positions[:, None, :, None] - w)
    # seen [B, H, S, C]: candidate c is a past token for query t; rank among those
    rank = jnp.einsum("bhtc,bhcd->bhtd", seen.astype(F32), beats.astype(F32))
    retained = seen & (rank < self.retained)
    gate = jax.nn.log_sigmoid(sc)[..., None, :]
    t = positions[:, None, :, None]
    sink_seen = sink_pos.value[:, None, None, :] <= t - w
    window_seen = (pool_pos[:, None, None, :] <= t) & (pool_pos[:, None, None, :] > t - w)
    bias = jnp.concatenate(
      [
        jnp.where(sink_seen, 0.0, -jnp.inf) + jnp.zeros((1, heads, 1, 1)),
        jnp.where(retained, gate, -jnp.inf),
        jnp.where(window_seen, 0.0, -jnp.inf) + jnp.zeros((1, heads, 1, 1)),
      ],
      axis=-1,
    )
    o = self._attend(
      qr,
      jnp.concatenate([sink_k.value, cand_k, pool_kr], axis=1).astype(kr.dtype),
      jnp.concatenate([sink_v.value, cand_v, pool_v], axis=1).astype(v.dtype),
      bias,
    )
    # the retained set after these tokens: the top `retained` candidates, slot = rank
    final_rank = jnp.sum(beats & (ps >= 0)[..., :, None], axis=-2)  # [B, H, C]
    target = jnp.swapaxes(jnp.where((ps >= 0) & (final_rank < n_kept), final_rank, n_kept), 1, 2)
    b_idx, h_idx = jnp.arange(batch)[:, None, None], jnp.arange(heads)[None, None, :]
    put = lambda empty, new: empty.at[b_idx, target, h_idx].set(new, mode="drop")
    kept_k.value = put(jnp.zeros_like(kept_k.value), cand_k)
    kept_v.value = put(jnp.zeros_like(kept_v.value), cand_v)
    kept_score.value = put(jnp.zeros_like(kept_score.value), cand_score)
    kept_pos.value = put(jnp.full_like(kept_pos.value, -1), cand_pos)
    ring_write(ring, (k, v), positions)
    return o
