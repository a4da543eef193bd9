"""Flash attention in Pallas (portable subset: Triton on GPU, Mosaic on TPU, interpret on CPU;
a Mosaic GPU forward on Hopper).

Pure JAX + Pallas: no Flax, no attnzoo imports. The op-level contract (mask semantics, the
float32 reference) lives in attnzoo.ops.softmax_attention, which dispatches here.
`flash_attention(...)` is the differentiable op (op.py), `reason(...)` says why a call cannot
be served (`hopper_reason(...)`: why the Hopper forward cannot), `Tuning` / `default_tuning(...)`
the tiles and launch knobs of every kernel (tuning.py), and `chunked` the pure-jnp blockwise
twin of the forward's algorithm (chunked_jnp.py). The kernel bodies are in kernels.py, their
pallas_calls in calls.py, the Hopper forward in hopper.py, the mask rule and the tile
schedules in schedule.py.
"""

from .chunked_jnp import chunked
from .op import flash_attention, hopper_reason, reason
from .tuning import TPU_TUNING, Tuning, default_tuning

__all__ = [
  "TPU_TUNING",
  "Tuning",
  "chunked",
  "default_tuning",
  "flash_attention",
  "hopper_reason",
  "reason",
]
