"""Dual encoder for document matching (LRA Retrieval, Tay et al. 2021): the two documents of a
pair go through the same encoder (shared weights, no cross-attention), each is pooled, and the
NLI-style interaction [u, v, u * v, u - v] (Conneau et al. 2017, as LRA's
`common_layers.classifier_head_dual`) feeds Dense(mlp) -> ReLU -> Dense(mlp / 2) -> ReLU ->
Dense(classes). Tokens are [B, 2 T]: the first document, then the second, each padded to T.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.registry import dense_init
from attnzoo.models.encoder import EncoderClassifier


class DualEncoderClassifier(EncoderClassifier):
  """tokens [B, 2T] (two documents) -> class logits [B, num_classes]; bidirectional mixers."""

  def setup(self):
    super().setup()
    hidden = max(2, int(self.mlp_ratio * self.d_model))
    self.head = [
      nn.Dense(hidden, kernel_init=dense_init),
      nn.Dense(hidden // 2, kernel_init=dense_init),
      nn.Dense(self.num_classes, kernel_init=dense_init),
    ]

  def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
    batch, length = tokens.shape
    if length % 2:
      raise ValueError(f"a dual encoder takes two documents of equal length, got {length} tokens")
    docs = tokens.reshape(batch * 2, length // 2)
    mask = None if mask is None else mask.reshape(batch * 2, length // 2)
    u, v = jnp.moveaxis(self.features(docs, mask=mask).reshape(batch, 2, -1), 1, 0)
    h = jnp.concatenate([u, v, u * v, u - v], axis=-1)
    h = nn.relu(self.head[0](h))
    h = nn.relu(self.head[1](h))
    return self.head[2](h)
