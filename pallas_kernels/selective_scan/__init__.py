"""Chunked selective scan (Mamba, Gu & Dao 2023) as Pallas kernels with a custom VJP.

  dt_t = softplus(delta_t + delta_bias),  h_t = exp(dt_t A) h_{t-1} + (dt_t x_t) B_t,
  y_t = C_t . h_t + D x_t                 (per channel; state [D, N] float32)

Pure JAX + Pallas; no Flax, no attnzoo. `selective_scan(...)` is the differentiable op
(op.py), `reason(...)` says why a call cannot be served, `Tuning` / `default_tuning(...)` its
knobs (tuning.py), and `chunked` the pure-jnp twin of the kernels' algorithm (chunked_jnp.py,
with the shared `discretize` and `block_scan`). The kernel bodies are in kernels.py, their
pallas_calls in calls.py.
"""

from .chunked_jnp import block_scan, chunked, discretize, keep_mask
from .op import reason, selective_scan
from .tuning import Tuning, default_tuning

__all__ = [
  "Tuning",
  "block_scan",
  "chunked",
  "default_tuning",
  "discretize",
  "keep_mask",
  "reason",
  "selective_scan",
]
