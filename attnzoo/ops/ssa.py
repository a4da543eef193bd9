"""SSA, Sparse Sparse Attention (Shen et al. 2025, "SSA: Sparse Sparse Attention by Aligning
Full and Sparse Attention Outputs in Feature Space"): training computes a layer's sparse and
full attention outputs and adds their bidirectional alignment to the loss,

  L = E_mode[L_mode] + alpha (L_sparsity + L_commitment),
  L_sparsity = SmoothL1(o_full, sg(o_sparse)),   L_commitment = SmoothL1(sg(o_full), o_sparse),

sg the stop-gradient (VQ-VAE style): the full output moves towards the sparse one (its
attention sparsifies, and the keys the sparse pattern leaves out get a gradient), the sparse
output towards the full one. SmoothL1 is torch's default (beta 1, mean), as the official code.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def smooth_l1(x: jax.Array) -> jax.Array:
  """Mean of 0.5 x^2 where |x| < 1, |x| - 0.5 elsewhere (torch.nn.SmoothL1Loss, beta 1)."""
  a = jnp.abs(x)
  return jnp.mean(jnp.where(a < 1.0, 0.5 * x * x, a - 0.5))


def alignment_loss(o_sparse: jax.Array, o_full: jax.Array) -> jax.Array:
  """L_sparsity + L_commitment (module docstring) of two outputs of one layer, float32."""
  sg = jax.lax.stop_gradient
  o_sparse, o_full = o_sparse.astype(jnp.float32), o_full.astype(jnp.float32)
  return smooth_l1(o_full - sg(o_sparse)) + smooth_l1(sg(o_full) - o_sparse)
