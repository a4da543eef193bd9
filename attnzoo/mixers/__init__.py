"""Sequence mixers: Flax Linen modules registered by name (see DESIGN.md, Mixers).

Every mixer is built as `build_mixer(name, causal=..., d_model=..., layer_idx=...,
num_layers=..., dtype=..., **kwargs)` and maps x[B,T,D] -> y[B,T,D] via `__call__(x, *,
positions=None, segment_ids=None, decode=False)`; segment_ids [B,T] mark packed documents
(no mixing across them; recurrent states reset). With decode=True it reads and updates its
state in the "cache" collection, so a model can be fed one token (or a prompt) at a time.
`state_size(seq_len)` gives the bytes decoding must keep (float32 elements × 4, as Zoology
counts); `attention_matrix(x, *, positions=None, segment_ids=None)` the [B,H,T,T] (possibly
hidden) attention where meaningful.

Declared capabilities (class attributes, see registry): `bidirectional` — True when the family
has a non-causal form, taken as the field `causal` (the model passes `causal=False` for an
encoder; a causal-only mixer refuses it in one line); `uses_block_ids` — True when `__call__`
and `attention_matrix` also take `block_ids` [B,T] (blocks inside documents, block_attention).
Training randomness (attention dropout) comes only from a "dropout" rng; without one (eval,
decoding) a mixer is deterministic.

A mixer module imports only `registry`, `layers` (the shared plumbing: decode caches of the
ops, hidden attention, state bytes, default positions, feature maps, norms) and `attnzoo.ops`,
never another mixer module (tests/test_imports.py checks it).
"""

# Importing the family modules registers them.
from attnzoo.mixers import (
  aaren,  # noqa: F401,E402
  ahn,  # noqa: F401,E402
  attention,  # noqa: F401,E402
  base_conv,  # noqa: F401,E402
  based,  # noqa: F401,E402
  delta_net,  # noqa: F401,E402
  fourier,  # noqa: F401,E402
  gaussian_adaptive,  # noqa: F401,E402
  gla,  # noqa: F401,E402
  h3,  # noqa: F401,E402
  hgrn2,  # noqa: F401,E402
  hyena,  # noqa: F401,E402
  lawcat,  # noqa: F401,E402
  lightconv,  # noqa: F401,E402
  lightning,  # noqa: F401,E402
  linear_attention,  # noqa: F401,E402
  lte,  # noqa: F401,E402
  mamba,  # noqa: F401,E402
  mamba2,  # noqa: F401,E402
  nsa,  # noqa: F401,E402
  ran,  # noqa: F401,E402
  retnet,  # noqa: F401,E402
  rwkv4,  # noqa: F401,E402
  rwkv6,  # noqa: F401,E402
  rwkv7,  # noqa: F401,E402
  s4d,  # noqa: F401,E402
  smlp,  # noqa: F401,E402
)
from attnzoo.mixers.registry import MIXERS, build_mixer, register

__all__ = ["MIXERS", "build_mixer", "register"]
