"""Chunked delta rule (DeltaNet / Gated DeltaNet) as Pallas kernels with a custom VJP.

Pure JAX + Pallas; no Flax, no attnzoo. `delta_rule(...)` is the differentiable entry point;
`chunked_jnp.chunked` holds the pure-JAX twin of the kernels (the XLA form and the current backward).
"""
from pallas_kernels.delta_rule.chunked_jnp import chunk_size_for, chunked, prepare_gates
from pallas_kernels.delta_rule.kernels import delta_rule, forward
