"""NSA's selection branch (Yuan et al. 2025, Native Sparse Attention) as Pallas kernels with a
custom VJP (Triton on GPU, interpret mode on CPU).

Pure JAX + Pallas: no Flax, no attnzoo imports. The op-level contract (the selection rule, the
float32 reference) lives in attnzoo.ops.nsa, which dispatches here. `selected_attention(...)`
is the differentiable op (op.py), `selection_scores(...)` the block importance from the
compressed branch (a forward-only kernel: the selection takes no gradient), `reason(...)` says
why a call cannot be served, `Tuning` / `default_tuning()` the launch knobs (tuning.py), and
`chunked` the pure-jnp twin of the forward kernel's algorithm (chunked_jnp.py). The kernel
bodies and their pallas_calls are in kernels.py.
"""

from .chunked_jnp import chunked
from .op import dkv_schedule, reason, selected_attention, selection_scores
from .tuning import Tuning, default_tuning

__all__ = [
  "Tuning",
  "chunked",
  "default_tuning",
  "dkv_schedule",
  "reason",
  "selected_attention",
  "selection_scores",
]
