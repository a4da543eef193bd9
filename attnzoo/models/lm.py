"""Decoder language model: embeddings -> N pre-norm blocks (backbone.py) -> final norm -> tied
head. Causal; decodes token by token through each mixer's "cache" collection."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.registry import dense_init
from attnzoo.models.backbone import Backbone


class DecoderLM(Backbone):
  """Causal LM over token ids [B, T] -> logits [B, T, V] (or at `logits_at` [B, K])."""

  vocab_size: int = dataclasses.field(kw_only=True)

  def setup(self):
    self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=dense_init)
    self.setup_stack()

  def __call__(
    self,
    tokens: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
    decode: bool = False,
    logits_at: jax.Array | None = None,
  ) -> jax.Array:
    positions = self.positions(tokens.shape, positions, decode)
    x = self.stack(
      self.embed(tokens).astype(self.dtype),
      positions=positions,
      segment_ids=segment_ids,
      block_ids=block_ids,
      decode=decode,
    )
    if logits_at is not None:  # only the positions that carry a loss
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return self.embed.attend(x.astype(jnp.float32))


def init_cache(model: Backbone, batch_size: int, max_len: int):
  """A fresh decoding cache for contexts of up to max_len tokens (positions start at 0)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  return jax.jit(lambda: model.init(jax.random.key(0), tokens, decode=True)["cache"])()
