"""Online spherical k-means routing (Roy et al. 2021, "Efficient Content-Based Sparse Attention
with Routing Transformers"): queries and keys, normalised to the unit sphere, are assigned to
the nearest of C shared centroids per head, and attention stays within a cluster (the mixer
runs softmax_attention with the cluster ids as segment ids).

The paper updates the centroids by an exponential moving average with decay λ of the assigned
queries and keys, μ_c <- λ μ_c + (1 - λ) mean(x_i : c(x_i) = c). Here that update is kept
functional as a gradient: `kmeans_tap(y, centroids, targets)` is the identity on y, and gives
`centroids` the gradient μ - sg(m̂) whatever y's cotangent (the gradient of ½‖μ - sg(m̂)‖²,
VQ-VAE's codebook loss), so one SGD step at learning rate 1 - λ is exactly the EMA step; under
another optimiser it is the same k-means pull with that optimiser's step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

F32 = jnp.float32


def unit(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  """x / |x| over the last axis, float32."""
  x = x.astype(F32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True) + eps)


def assign(x: jax.Array, centroids: jax.Array) -> jax.Array:
  """Cluster ids [B,T,H] of x [B,T,H,d]: the nearest centroid [H,C,d] in cosine similarity."""
  return jnp.argmax(jnp.einsum("bthd,hcd->bthc", unit(x), unit(centroids)), -1).astype(jnp.int32)


def centroid_targets(xs: list[jax.Array], centroids: jax.Array) -> jax.Array:
  """m̂ [H,C,d]: the mean of the unit vectors of xs (each [B,T,H,d], e.g. queries and keys)
  assigned to each centroid; a centroid nothing was assigned to keeps its value."""
  heads, clusters, _ = centroids.shape
  total = jnp.zeros(centroids.shape, F32)
  count = jnp.zeros((heads, clusters), F32)
  for x in xs:
    onehot = jax.nn.one_hot(assign(x, centroids), clusters, dtype=F32)  # [B,T,H,C]
    total = total + jnp.einsum("bthc,bthd->hcd", onehot, unit(x))
    count = count + onehot.sum((0, 1))
  mean = total / jnp.maximum(count, 1.0)[..., None]
  return jax.lax.stop_gradient(jnp.where(count[..., None] > 0, mean, centroids.astype(F32)))


@jax.custom_vjp
def kmeans_tap(y: jax.Array, centroids: jax.Array, targets: jax.Array) -> jax.Array:
  """y unchanged; centroids receive the gradient centroids - targets (see the module doc)."""
  del centroids, targets
  return y


def _tap_fwd(y, centroids, targets):
  return y, (centroids, targets)


def _tap_bwd(residual, g):
  centroids, targets = residual
  return g, (centroids.astype(F32) - targets).astype(centroids.dtype), jnp.zeros_like(targets)


kmeans_tap.defvjp(_tap_fwd, _tap_bwd)
