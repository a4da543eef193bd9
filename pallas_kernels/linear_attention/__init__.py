"""Chunked Pallas kernels for decayed linear attention (pure JAX + Pallas; no Flax, no attnzoo).

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t        (log a_t = log_decay <= 0)

`linear_attention(...)` is the differentiable op (op.py), `reason(...)` says why a call cannot
be served, `Tuning` / `default_tuning(...)` its block sizes and launch knobs (tuning.py), and
`chunked` the pure-jnp twin of the kernels' algorithm (chunked_jnp.py). The kernel bodies are
in kernels.py, their pallas_calls and the forward and backward passes in calls.py. Modules of
the package import each other relatively, so that a copy of the package loads as itself
(experiments/gpu/profile_linear.py).
"""

from .chunked_jnp import chunked
from .op import linear_attention, reason
from .tuning import Tuning, default_splits, default_tuning

__all__ = ["Tuning", "chunked", "default_splits", "default_tuning", "linear_attention", "reason"]
