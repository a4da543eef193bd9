"""Chunked Pallas kernels for decayed linear attention (pure JAX + Pallas; no Flax, no attnzoo).

  S_t = diag(a_t) S_{t-1} + k_t v_t^T,   o_t = scale * S_t^T q_t        (log a_t = log_decay <= 0)

See `kernel.linear_attention` for the arguments; `reason(...)` says why a call cannot be served.
"""
from pallas_kernels.linear_attention.kernel import (
    KernelConfig, default_config, default_splits, linear_attention, reason)

__all__ = ["KernelConfig", "default_config", "default_splits", "linear_attention", "reason"]
