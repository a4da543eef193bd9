"""Packed-sequence helpers every op and mixer shares, defined once in pallas_kernels.common
(the layer below): the segment starts where recurrent state resets, a canonical segment index,
and the position of an empty KV-cache slot."""

from pallas_kernels.common import EMPTY, canonical_segments, segment_starts

__all__ = ["EMPTY", "canonical_segments", "segment_starts"]
