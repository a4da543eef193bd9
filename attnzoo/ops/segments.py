"""Packed-sequence helpers every op and mixer shares, defined once in pallas_kernels.common
(the layer below): the segment starts where recurrent state resets, a canonical segment index,
and the position of an empty KV-cache slot; plus each token's position inside its segment."""

import jax
import jax.numpy as jnp

from pallas_kernels.common import EMPTY, canonical_segments, segment_starts

__all__ = ["EMPTY", "canonical_segments", "position_in_segment", "segment_starts"]


def position_in_segment(segment_ids: jax.Array) -> jax.Array:
  """int32 [B,T]: t minus the index of the first token of t's segment (0 at every start)."""
  t = jnp.arange(segment_ids.shape[1], dtype=jnp.int32)
  starts = jnp.where(segment_starts(segment_ids), t, 0)
  return t - jax.lax.cummax(starts, axis=1)
