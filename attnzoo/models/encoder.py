"""Sequence classifier: token embeddings -> N pre-norm blocks with non-causal mixers -> final
norm -> pooling (mean over the real tokens, or the first token, "cls") -> linear classifier.

As in the Long Range Arena encoders (Tay et al. 2021), every token sees the whole sequence.
A padding `mask` [B, T] (True at real tokens) keeps padding out of the pooled mean and, as a
segment of its own, out of every real token's context.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.registry import dense_init
from attnzoo.models.backbone import Backbone

POOLINGS = ("mean", "cls")


class EncoderClassifier(Backbone):
  """tokens [B, T] -> class logits [B, num_classes]; the mixers run in their bidirectional form."""

  vocab_size: int = dataclasses.field(kw_only=True)
  num_classes: int = dataclasses.field(kw_only=True)
  pooling: str = "mean"

  causal = False

  def setup(self):
    if self.pooling not in POOLINGS:
      raise ValueError(f"unknown pooling {self.pooling!r}; use {' or '.join(POOLINGS)}")
    self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=dense_init)
    self.setup_stack()
    self.classifier = nn.Dense(self.num_classes, kernel_init=dense_init)

  def __call__(
    self,
    tokens: jax.Array,
    *,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
  ) -> jax.Array:
    features = self.features(
      tokens, mask=mask, positions=positions, segment_ids=segment_ids, block_ids=block_ids
    )
    return self.classifier(features)

  def features(
    self,
    tokens: jax.Array,
    *,
    mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
  ) -> jax.Array:
    """The pooled encoding [B, d_model] float32 (before the classifier)."""
    positions = self.positions(tokens.shape, positions, False)
    if mask is not None and segment_ids is None:
      segment_ids = mask.astype(jnp.int32)
    x = self.stack(
      self.embed(tokens).astype(self.dtype),
      positions=positions,
      segment_ids=segment_ids,
      block_ids=block_ids,
    )
    return pool(x, mask, self.pooling).astype(jnp.float32)


def pool(x: jax.Array, mask: jax.Array | None, pooling: str) -> jax.Array:
  """[B, T, D] -> [B, D]: the mean over the tokens where mask is True (all when None), or the
  first token."""
  if pooling == "cls":
    return x[:, 0]
  if mask is None:
    return jnp.mean(x, axis=1)
  weights = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1)
