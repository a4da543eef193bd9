"""DAM, dynamic attention masks (Zhang et al. 2025, "DAM: Dynamic Attention Mask for
Long-Context Large Language Model Inference Acceleration"): training-free, per-(layer, head)
boolean sparse masks read off a frozen model's attention maps, then applied at inference.

Stage 1 (pattern extraction and transformation), `extract_pattern`: on a calibration prompt,
the positions of a head's causal attention map whose weight exceeds `threshold` form its true
mask; the mask is transformed into its structure so that it holds at any length: the
diagonals (relative offsets i - j) and the columns (absolute key positions j, e.g. sinks)
that the true mask covers in at least a share `coverage` of its T rows. Stage 2,
`pattern_mask`: the mask of any (query, key) positions is the union of the kept diagonals and
columns, the query's own position always kept (no row is empty); the mixer ANDs it with its
causal mask (softmax_attention's `bias`).

Simplification (named): the paper thresholds Box-Cox-normalised maps and extends each true
mask to longer contexts by its recognised pattern; here the threshold is on the attention
weights themselves and the structures are exactly diagonals and columns.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Pattern(NamedTuple):
  """The mask structure of each head: offsets [H, T] (offset o = i - j kept) and columns
  [H, T] (key position j kept), T the calibration length; bool."""

  offsets: jax.Array
  columns: jax.Array


def extract_pattern(
  attention: jax.Array, *, threshold: float = 0.05, coverage: float = 0.5
) -> Pattern:
  """attention [B, H, T, T] (causal softmax maps of one layer, rows are queries) -> Pattern.

  A position is in the true mask when its weight exceeds `threshold` in any example; a
  diagonal (column) is kept when the true mask has at least coverage x T positions on it: a
  structure must run through that share of the calibration map's rows (short diagonals and
  late columns, crossed by few rows, are where other structures meet). The main diagonal is
  always kept."""
  if not 0.0 < coverage <= 1.0:
    raise ValueError(f"dam: coverage must be in (0, 1], got {coverage}")
  if attention.ndim != 4 or attention.shape[-1] != attention.shape[-2]:
    raise ValueError(f"dam: attention must be [B, H, T, T], got {attention.shape}")
  t = attention.shape[-1]
  i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
  true_mask = jnp.any(attention > threshold, axis=0) & (j <= i)  # [H, T, T]
  offset = jnp.clip(i - j, 0, t - 1)
  kept = true_mask.astype(jnp.float32)
  per_offset = jnp.zeros(true_mask.shape[:1] + (t,)).at[:, offset].add(kept)
  offsets = per_offset >= coverage * t
  columns = true_mask.sum(1) >= coverage * t
  return Pattern(offsets.at[:, 0].set(True), columns)


def pattern_mask(pattern: Pattern, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """Boolean [B, H, Tq, Tk] of the pattern at positions q [B, Tq], kv [B, Tk] (any length;
  causality and empty cache slots are the attention's own masks)."""
  offsets, columns = (jnp.asarray(p, bool) for p in pattern)
  n_off, n_col = offsets.shape[1], columns.shape[1]
  rel = q_positions[:, :, None] - kv_positions[:, None, :]  # [B, Tq, Tk]
  on_diagonal = (rel >= 0) & (rel < n_off) & offsets[:, jnp.clip(rel, 0, n_off - 1)]
  col = jnp.clip(kv_positions, 0, n_col - 1)
  in_column = (kv_positions >= 0) & (kv_positions < n_col) & columns[:, col]  # [H, B, Tk]
  return jnp.transpose(on_diagonal, (1, 0, 2, 3)) | jnp.transpose(in_column, (1, 0, 2))[:, :, None]


def pattern_bias(pattern: Pattern, q_positions: jax.Array, kv_positions: jax.Array) -> jax.Array:
  """The pattern as an additive float32 bias [B, H, Tq, Tk]: 0 kept, -inf masked."""
  return jnp.where(pattern_mask(pattern, q_positions, kv_positions), 0.0, -jnp.inf)
