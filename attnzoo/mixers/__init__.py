"""Sequence mixers: Flax Linen modules registered by name (see DESIGN.md, Mixers).

Every mixer is built as `cls(d_model=..., layer_idx=..., num_layers=..., dtype=..., **kwargs)`
and maps x[B,T,D] -> y[B,T,D] via `__call__(x, *, positions=None, segment_ids=None,
decode=False)`. With decode=True it reads and updates its state in the "cache" collection,
so a model can be fed one token (or a prompt) at a time. `state_size(seq_len)` gives the bytes
decoding must keep (float32 elements × 4, as Zoology counts).
"""
from attnzoo.mixers.registry import MIXERS, build_mixer, register

# Importing the family modules registers them.
from attnzoo.mixers import attention  # noqa: F401,E402
