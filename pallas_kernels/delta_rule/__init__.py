"""Chunked delta rule (DeltaNet / Gated DeltaNet) as Pallas kernels with a custom VJP.

Pure JAX + Pallas; no Flax, no attnzoo. `delta_rule(...)` is the differentiable entry point
(`Tuning` holds its Triton launch knobs); `chunked_jnp.chunked` is the pure-JAX twin of the
kernels' forward (the XLA form).
"""
from pallas_kernels.delta_rule.chunked_jnp import chunk_size_for, chunked, prepare_gates
from pallas_kernels.delta_rule.kernels import Tuning, delta_rule, forward
