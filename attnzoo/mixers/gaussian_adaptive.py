"""GAAM, multi-head Gaussian adaptive attention (Ioannides et al. 2024, "Gaussian Adaptive
Attention is All You Need: Robust Contextual Representations Across Multiple Modalities"), over
time (attnzoo.ops.gaussian_attention): the features of x are split into `num_heads` heads, each
with `num_gaussians` learned mean offsets δ (init 0) and scaled variances c (init N(0, 1), as
the official code's torch.randn); y_t = x_t ⊙ w_t, w the normalised product of Gaussians of
x_t around the (prefix, when causal) statistics. No projections: the official GaussianBlock is
x <- GAAM(x) + x, which is this mixer inside the zoo's residual block (README defaults: 4 heads,
5 Gaussians). Deviations: the official multi-head module splits the normalisation axis itself
into heads; here heads are groups of features (parameter sets) and the axis is time;
causal=True uses prefix statistics (see the op). Decoding keeps (n, Σx, Σx², log Σ m) per
feature. GAAM is not a pairwise attention: there is no attention matrix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import GaussianAttentionOp, state_bytes
from attnzoo.mixers.registry import per_head, register


@register("gaussian_adaptive")
class GaussianAdaptive(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  num_gaussians: int = 5
  causal: bool = True
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: (n, Σx, Σx², log Σ m) per feature, whatever the context length."""
    return state_bytes((self.d_model, 4))

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    batch, steps, _ = x.shape
    heads, g = self.num_heads, self.num_gaussians
    head_dim = per_head(self.d_model, heads)
    offsets = self.param("mean_offsets", nn.initializers.zeros, (heads, g), jnp.float32)
    c = self.param("c", nn.initializers.normal(1.0), (heads, g), jnp.float32)
    y = GaussianAttentionOp(self.causal, self.implementation, name="gaam")(
      x.reshape(batch, steps, heads, head_dim), offsets, c, segment_ids=segment_ids, decode=decode
    )
    return y.reshape(x.shape).astype(self.dtype)
