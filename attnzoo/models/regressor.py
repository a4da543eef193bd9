"""Regressor over vector sequences: a linear read-in of inputs [B, T, input_dim] -> N pre-norm
blocks (causal) -> final norm -> a linear read-out [B, T, output_dim], as the in-context
regression models of Garg et al. (2022). Decodes step by step like the LM."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.registry import dense_init
from attnzoo.models.backbone import Backbone


class Regressor(Backbone):
  """inputs [B, T, input_dim] -> predictions [B, T, output_dim] (or at `outputs_at` [B, K])."""

  input_dim: int = dataclasses.field(kw_only=True)
  output_dim: int = dataclasses.field(kw_only=True)

  def setup(self):
    self.read_in = nn.Dense(self.d_model, dtype=self.dtype, kernel_init=dense_init)
    self.setup_stack()
    self.read_out = nn.Dense(self.output_dim, kernel_init=dense_init)

  def __call__(
    self,
    inputs: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
    decode: bool = False,
    outputs_at: jax.Array | None = None,
  ) -> jax.Array:
    positions = self.positions(inputs.shape[:2], positions, decode)
    x = self.stack(
      self.read_in(inputs),
      positions=positions,
      segment_ids=segment_ids,
      block_ids=block_ids,
      decode=decode,
    )
    if outputs_at is not None:
      x = jnp.take_along_axis(x, outputs_at[..., None], axis=1)
    return self.read_out(x.astype(jnp.float32))
