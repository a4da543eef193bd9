"""Rotary position embedding, RoPE (Su et al. 2021, "RoFormer"), half-split layout."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_rope(x: jax.Array, positions: jax.Array, *, base: float = 10000.0) -> jax.Array:
  """Rotates x[B,T,H,D] (D even) by angles positions[B,T] · base^(-2i/D)."""
  dim = x.shape[-1]
  if dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {dim}")
  inv_freq = base ** (-jnp.arange(0, dim // 2, dtype=jnp.float32) * 2.0 / dim)
  angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [B,T,1,D/2]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
