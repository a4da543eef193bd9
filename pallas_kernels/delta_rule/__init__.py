"""Chunked delta rule (DeltaNet / Gated DeltaNet) as Pallas kernels with a custom VJP.

Pure JAX + Pallas; no Flax, no attnzoo. `delta_rule(...)` is the differentiable op (op.py),
`reason(...)` says why a call cannot be served, `Tuning` / `default_tuning(...)` its launch
knobs (tuning.py), and `chunked` the pure-jnp twin of the kernels' algorithm on prepared
inputs (chunked_jnp.py, with `chunk_size_for` and `prepare_gates`). The kernel bodies are in
kernels.py, their pallas_calls in calls.py.
"""

from .chunked_jnp import chunk_size_for, chunked, prepare_gates
from .op import delta_rule, reason
from .tuning import Tuning, default_tuning

__all__ = [
  "Tuning",
  "chunk_size_for",
  "chunked",
  "default_tuning",
  "delta_rule",
  "prepare_gates",
  "reason",
]
