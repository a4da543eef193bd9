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
from attnzoo.mixers import gla  # noqa: F401,E402
from attnzoo.mixers import hgrn2  # noqa: F401,E402
from attnzoo.mixers import rwkv6  # noqa: F401,E402
from attnzoo.mixers import delta_net  # noqa: F401,E402
from attnzoo.mixers import lawcat  # noqa: F401,E402
from attnzoo.mixers import base_conv  # noqa: F401,E402
from attnzoo.mixers import linear_attention  # noqa: F401,E402
from attnzoo.mixers import based  # noqa: F401,E402
from attnzoo.mixers import retnet  # noqa: F401,E402
from attnzoo.mixers import lightning  # noqa: F401,E402
from attnzoo.mixers import mamba2  # noqa: F401,E402
