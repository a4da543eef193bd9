"""Decoder language model: embeddings -> N pre-norm blocks -> final norm -> tied head.

Block: x + mixer(norm(x)), then x + state_mixer(norm(x)) with state_mixer in {identity, mlp,
swiglu}. Hybrids cycle a list of mixer names over layers (Zoology's `Hybrid`). Initialisation
follows Zoology: N(0, 0.02) everywhere, projections into the residual N(0, 0.02/sqrt(2L)).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers import build_mixer
from attnzoo.mixers.registry import dense_init, output_init

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def layer_mixers(mixers: Sequence[str], mixer_kwargs: dict, num_layers: int):
  """(name, kwargs) for each layer. With several mixer names, mixer_kwargs is keyed by name."""
  hybrid = len(mixers) > 1
  if hybrid and set(mixer_kwargs) - set(mixers):
    raise ValueError(f"a hybrid's mixer_kwargs must be keyed by mixer name ({', '.join(mixers)});"
                     f" got keys {', '.join(sorted(mixer_kwargs))}")
  out = []
  for i in range(num_layers):
    name = mixers[i % len(mixers)]
    out.append((name, dict(mixer_kwargs.get(name, {}) if hybrid else mixer_kwargs)))
  return out


class StateMixer(nn.Module):
  """Per-token channel mixing: 'mlp' (GELU) or 'swiglu' (Shazeer 2020)."""
  kind: str
  d_model: int
  hidden: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda n, init: nn.Dense(n, dtype=self.dtype, kernel_init=init)
    if self.kind == "mlp":
      h = nn.gelu(dense(self.hidden, dense_init)(x))
    elif self.kind == "swiglu":
      h = nn.silu(dense(self.hidden, dense_init)(x)) * dense(self.hidden, dense_init)(x)
    else:
      raise ValueError(f"unknown state_mixer {self.kind!r}; use identity, mlp or swiglu")
    return dense(self.d_model, output_init(self.num_layers))(h)


class Block(nn.Module):
  mixer: str
  mixer_kwargs: dict
  d_model: int
  layer_idx: int
  num_layers: int
  state_mixer: str
  mlp_hidden: int
  norm: str
  dtype: Any

  @nn.compact
  def __call__(self, x, *, positions, segment_ids, decode):
    norm = NORMS[self.norm]
    mixer = build_mixer(self.mixer, d_model=self.d_model, layer_idx=self.layer_idx,
                        num_layers=self.num_layers, dtype=self.dtype, name="mixer",
                        **self.mixer_kwargs)
    x = x + mixer(norm(dtype=self.dtype)(x), positions=positions, segment_ids=segment_ids,
                  decode=decode)
    if self.state_mixer != "identity":
      x = x + StateMixer(self.state_mixer, self.d_model, self.mlp_hidden, self.num_layers,
                         self.dtype)(norm(dtype=self.dtype)(x))
    return x


class DecoderLM(nn.Module):
  """Causal LM over token ids [B, T] -> logits [B, T, V] (or at `logits_at` [B, K])."""
  vocab_size: int
  d_model: int
  num_layers: int
  mixers: Sequence[str]
  mixer_kwargs: dict = None
  state_mixer: str = "identity"
  mlp_ratio: float = 4.0
  norm: str = "layernorm"
  position_embedding: str = "none"  # "learned" or "none"
  max_positions: int = 4096
  dtype: Any = jnp.float32

  def setup(self):
    if self.norm not in NORMS:
      raise ValueError(f"unknown norm {self.norm!r}; use {' or '.join(NORMS)}")
    if self.position_embedding not in ("learned", "none"):
      raise ValueError(f"unknown position_embedding {self.position_embedding!r}")
    self.embed = nn.Embed(self.vocab_size, self.d_model, embedding_init=dense_init)
    if self.position_embedding == "learned":
      self.positions_embed = nn.Embed(self.max_positions, self.d_model, embedding_init=dense_init)
    self.blocks = [
        Block(name_, kwargs, self.d_model, i, self.num_layers, self.state_mixer,
              int(self.mlp_ratio * self.d_model), self.norm, self.dtype)
        for i, (name_, kwargs) in enumerate(
            layer_mixers(self.mixers, dict(self.mixer_kwargs or {}), self.num_layers))]
    self.final_norm = NORMS[self.norm](dtype=self.dtype)

  def mixer_modules(self):
    """The (unbound) mixer of each layer, for state_size and analysis."""
    return [build_mixer(name, d_model=self.d_model, layer_idx=i, num_layers=self.num_layers,
                        dtype=self.dtype, parent=None, **kwargs)
            for i, (name, kwargs) in enumerate(
                layer_mixers(self.mixers, dict(self.mixer_kwargs or {}), self.num_layers))]

  def state_size(self, seq_len: int) -> int:
    """Bytes of decoding state over all layers (float32), as Zoology's x-axis."""
    return sum(m.state_size(seq_len) for m in self.mixer_modules())

  @nn.compact
  def _positions(self, tokens, positions, decode):
    if positions is not None:
      return positions
    steps = tokens.shape[1]
    start = 0
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      if self.is_mutable_collection("cache") and not self.is_initializing():
        index.value = start + steps
    return jnp.broadcast_to(start + jnp.arange(steps, dtype=jnp.int32), tokens.shape)

  def __call__(self, tokens, *, positions=None, segment_ids=None, decode=False, logits_at=None):
    positions = self._positions(tokens, positions, decode)
    x = self.embed(tokens).astype(self.dtype)
    if self.position_embedding == "learned":
      x = x + self.positions_embed(positions).astype(self.dtype)
    for block in self.blocks:
      x = block(x, positions=positions, segment_ids=segment_ids, decode=decode)
    x = self.final_norm(x)
    if logits_at is not None:  # only the positions that carry a loss
      x = jnp.take_along_axis(x, logits_at[..., None], axis=1)
    return self.embed.attend(x.astype(jnp.float32))


def init_cache(model: DecoderLM, batch_size: int, max_len: int):
  """A fresh decoding cache for contexts of up to max_len tokens (positions start at 0)."""
  tokens = jnp.zeros((batch_size, max_len), jnp.int32)
  return jax.jit(lambda: model.init(jax.random.key(0), tokens, decode=True)["cache"])()
