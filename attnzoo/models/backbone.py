"""The one Block every model is built from, and the stack of blocks the models share.

Block: x + mixer(norm(x)), then x + state_mixer(norm(x)) with state_mixer in {identity, mlp,
swiglu}; optional dropout on each residual branch. "identity_norm" is Zoology's
`torch.nn.Identity` state mixer as its block runs it: the identity of the normed stream is still
added back, so each layer computes x <- y + norm2(y) with y = x + mixer(norm1(x)). Hybrids
cycle a list of mixer names over layers (Zoology's `Hybrid`). Initialisation follows Zoology:
N(0, 0.02) everywhere, projections into the residual N(0, 0.02/sqrt(2L)).

`Backbone` holds the options every model shares (mixers, width, depth, norms, positions,
dropout) and runs the stack; the models (`DecoderLM`, `EncoderClassifier`, `Regressor`) add
their read-in and head. A backbone is causal or not as a class property of its model; a mixer
asked for a form it lacks (a causal-only mixer in an encoder) refuses in one line.

Dropout (embedding, residual; attention probabilities are a mixer option) is active only when
the model is applied with a "dropout" rng, as the train step does; evaluation and decoding are
deterministic.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers import MIXERS, build_mixer
from attnzoo.mixers.registry import dense_init, output_init

NORMS = {"layernorm": nn.LayerNorm, "rmsnorm": nn.RMSNorm}


def layer_mixers(
  mixers: Sequence[str], mixer_kwargs: dict, num_layers: int
) -> list[tuple[str, dict]]:
  """(name, kwargs) for each layer. With several mixer names, mixer_kwargs is keyed by name."""
  hybrid = len(mixers) > 1
  if hybrid and set(mixer_kwargs) - set(mixers):
    raise ValueError(
      f"a hybrid's mixer_kwargs must be keyed by mixer name ({', '.join(mixers)});"
      f" got keys {', '.join(sorted(mixer_kwargs))}"
    )
  out = []
  for i in range(num_layers):
    name = mixers[i % len(mixers)]
    out.append((name, dict(mixer_kwargs.get(name, {}) if hybrid else mixer_kwargs)))
  return out


def dropout(module: nn.Module, x: jax.Array, rate: float) -> jax.Array:
  """Dropout at `rate` when `module` is applied with a "dropout" rng, else x unchanged."""
  if rate == 0.0 or not module.has_rng("dropout"):
    return x
  keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class StateMixer(nn.Module):
  """Per-token channel mixing: 'mlp' (GELU) or 'swiglu' (Shazeer 2020)."""

  kind: str
  d_model: int
  hidden: int
  num_layers: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    dense = lambda n, init: nn.Dense(n, dtype=self.dtype, kernel_init=init)
    if self.kind == "mlp":
      h = nn.gelu(dense(self.hidden, dense_init)(x))
    elif self.kind == "swiglu":
      h = nn.silu(dense(self.hidden, dense_init)(x)) * dense(self.hidden, dense_init)(x)
    else:
      raise ValueError(f"unknown state_mixer {self.kind!r}; use mlp or swiglu")
    return dense(self.d_model, output_init(self.num_layers))(h)


class Block(nn.Module):
  """norm -> mixer -> residual -> norm -> state mixer (or identity) -> residual."""

  mixer: str
  mixer_kwargs: dict
  d_model: int
  layer_idx: int
  num_layers: int
  state_mixer: str
  mlp_hidden: int
  norm: str
  dtype: Any
  causal: bool = True
  residual_dropout: float = 0.0

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    block_ids: jax.Array | None,
    decode: bool,
  ) -> jax.Array:
    norm = NORMS[self.norm]
    mixer = build_mixer(
      self.mixer,
      causal=self.causal,
      d_model=self.d_model,
      layer_idx=self.layer_idx,
      num_layers=self.num_layers,
      dtype=self.dtype,
      name="mixer",
      **self.mixer_kwargs,
    )
    extra = {"block_ids": block_ids} if MIXERS[self.mixer].uses_block_ids else {}
    y = mixer(
      norm(dtype=self.dtype)(x),
      positions=positions,
      segment_ids=segment_ids,
      decode=decode,
      **extra,
    )
    x = x + dropout(self, y, self.residual_dropout)
    if self.state_mixer == "identity_norm":
      x = x + dropout(self, norm(dtype=self.dtype)(x), self.residual_dropout)
    elif self.state_mixer != "identity":
      y = StateMixer(self.state_mixer, self.d_model, self.mlp_hidden, self.num_layers, self.dtype)(
        norm(dtype=self.dtype)(x)
      )
      x = x + dropout(self, y, self.residual_dropout)
    return x


class Backbone(nn.Module):
  """Options and stack shared by every model: position embedding, blocks, final norm.

  A model subclasses it, calls `setup_stack()` in its `setup` after creating its read-in, and
  runs `stack(x, ...)` on the read-in's output.
  """

  d_model: int
  num_layers: int
  mixers: Sequence[str]
  mixer_kwargs: dict | None = None
  state_mixer: str = "identity"
  mlp_ratio: float = 4.0
  norm: str = "layernorm"
  position_embedding: str = "none"  # "learned" or "none"
  max_positions: int = 4096
  embedding_dropout: float = 0.0
  residual_dropout: float = 0.0
  dtype: Any = jnp.float32

  causal: ClassVar[bool] = True

  def _layers(self) -> list[tuple[str, dict]]:
    return layer_mixers(self.mixers, dict(self.mixer_kwargs or {}), self.num_layers)

  def check(self) -> None:
    """One ValueError naming the first impossible option."""

    def need(ok, what):
      if not ok:
        raise ValueError(what)

    for key in ("d_model", "num_layers", "max_positions"):
      value = getattr(self, key)
      need(
        isinstance(value, int) and value >= 1, f"{key} must be a positive integer, got {value!r}"
      )
    need(self.mixers, "the model needs at least one mixer")
    need(self.norm in NORMS, f"unknown norm {self.norm!r}; use {' or '.join(NORMS)}")
    need(
      self.position_embedding in ("learned", "none"),
      f"unknown position_embedding {self.position_embedding!r}; use learned or none",
    )
    need(
      self.state_mixer in ("identity", "identity_norm", "mlp", "swiglu"),
      f"unknown state_mixer {self.state_mixer!r}; use identity, identity_norm, mlp or swiglu",
    )
    need(
      self.state_mixer in ("identity", "identity_norm") or int(self.mlp_ratio * self.d_model) >= 1,
      f"mlp_ratio must give the state mixer a hidden width >= 1, got {self.mlp_ratio!r}",
    )
    for key in ("embedding_dropout", "residual_dropout"):
      value = getattr(self, key)
      need(0 <= value < 1, f"{key} must be in [0, 1), got {value!r}")

  def setup_stack(self):
    self.check()
    if self.position_embedding == "learned":
      self.positions_embed = nn.Embed(self.max_positions, self.d_model, embedding_init=dense_init)
    self.blocks = [
      Block(
        name_,
        kwargs,
        self.d_model,
        i,
        self.num_layers,
        self.state_mixer,
        int(self.mlp_ratio * self.d_model),
        self.norm,
        self.dtype,
        self.causal,
        self.residual_dropout,
      )
      for i, (name_, kwargs) in enumerate(self._layers())
    ]
    self.final_norm = NORMS[self.norm](dtype=self.dtype)

  def mixer_modules(self) -> list[nn.Module]:
    """The (unbound) mixer of each layer, for state_size and analysis."""
    return [
      build_mixer(
        name,
        causal=self.causal,
        d_model=self.d_model,
        layer_idx=i,
        num_layers=self.num_layers,
        dtype=self.dtype,
        parent=None,
        **kwargs,
      )
      for i, (name, kwargs) in enumerate(self._layers())
    ]

  def state_size(self, seq_len: int) -> int:
    """Bytes of decoding state over all layers (float32), as Zoology's x-axis."""
    return sum(m.state_size(seq_len) for m in self.mixer_modules())

  @nn.compact
  def positions(self, shape: tuple[int, int], positions, decode: bool) -> jax.Array:
    """The given positions, else 0..T-1 per row; while decoding, continuing from the tokens
    already seen (kept as "index" in the "cache" collection)."""
    if positions is not None:
      return positions
    start = 0
    if decode:
      index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
      start = index.value
      if self.is_mutable_collection("cache") and not self.is_initializing():
        index.value = start + shape[1]
    return jnp.broadcast_to(start + jnp.arange(shape[1], dtype=jnp.int32), shape)

  def stack(
    self,
    x: jax.Array,
    *,
    positions: jax.Array,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    """Positions added (if learned), embedding dropout, the blocks, the final norm."""
    if self.position_embedding == "learned":
      if x.shape[1] > self.max_positions:
        raise ValueError(
          f"a sequence of {x.shape[1]} tokens is longer than the "
          f"{self.max_positions} positions the model learns (max_positions)"
        )
      x = x + self.positions_embed(positions).astype(self.dtype)
    x = dropout(self, x, self.embedding_dropout)
    for block in self.blocks:
      x = block(x, positions=positions, segment_ids=segment_ids, block_ids=block_ids, decode=decode)
    return self.final_norm(x)
