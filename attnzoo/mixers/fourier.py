"""Fourier token mixing, bidirectional only: every output depends on every token of its
sequence, so neither mixer has a causal form or decodes. On attnzoo.ops.spectral.

`fnet` (Lee-Thorp et al. 2022, "FNet: Mixing Tokens with Fourier Transforms"):
y = Re(DFT_seq(DFT_hidden(x))), no parameters (FFT; per packed segment through the DFT-matrix
form).

`fftnet` (Fein-Ashley et al. 2025, "The FFT Strikes Back: An Efficient Alternative to
Self-Attention"; defaults from the official code jacobfa/fft, `MultiHeadSpectralAttention` of
its first version, the one of the seed abstract), adaptive spectral filtering per head:
  X = rfft(x) over time (orthonormal, F = l_max // 2 + 1 bins)
  c = mean_t x_t,   W = W_base + MLP(c)   (Linear(d, d) -> GELU -> Linear(d, H F); W_base = 1)
  y = irfft(modReLU(X * W))                (modReLU bias per head and bin, 0 at init)
then dropout (0.1, only with a "dropout" rng). Differences from the official module: its own
residual and LayerNorm are the block's here; sequences shorter than l_max are zero-padded to
l_max (the filter has l_max's bins); Linear layers start N(0, 0.02) like every projection here.
The modReLU acts on global Fourier coefficients, so zero-padding does not make it causal; packed
segment_ids are refused (the filter spans the whole sequence).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.registry import dense_init, per_head, register
from attnzoo.ops import spectral


class _Bidirectional(nn.Module):
  """What both share: bidirectional-only, no decoding state."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  causal: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True
  has_causal_form: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    raise ValueError(f"{self.mixer_name} does not decode (bidirectional-only): it keeps no state")

  def _no_decode(self, decode: bool) -> None:
    if decode:
      raise ValueError(f"{self.mixer_name} does not decode (bidirectional-only)")


@register("fnet")
class FNet(_Bidirectional):
  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    self._no_decode(decode)
    y = spectral.fourier_mix(x, segment_ids=segment_ids, implementation=self.implementation)
    return y.astype(self.dtype)


@register("fftnet")
class FFTNet(_Bidirectional):
  l_max: int = 1024
  num_heads: int = 4
  adaptive: bool = True
  dropout: float = 0.1

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    self._no_decode(decode)
    if segment_ids is not None:
      raise ValueError("fftnet filters the whole sequence's spectrum: no packed segment_ids")
    heads = self.num_heads
    head_dim = per_head(self.d_model, heads)
    bins = self.l_max // 2 + 1
    batch, steps, _ = x.shape
    base = self.param("base_filter", nn.initializers.ones, (heads, bins), jnp.float32)
    bias = self.param("modrelu_bias", nn.initializers.zeros, (heads, bins), jnp.float32)
    weight = jnp.broadcast_to(base, (batch, heads, bins))
    if self.adaptive:
      context = jnp.mean(x.astype(jnp.float32), axis=1)
      hidden = nn.gelu(nn.Dense(self.d_model, kernel_init=dense_init, name="mlp_in")(context))
      mod = nn.Dense(heads * bins, kernel_init=dense_init, name="mlp_out")(hidden)
      weight = weight + mod.reshape(batch, heads, bins)
    xh = x.reshape(batch, steps, heads, head_dim)
    y = spectral.spectral_filter(
      xh, weight, bias, length=self.l_max, implementation=self.implementation
    )
    y = nn.Dropout(self.dropout)(y, deterministic=not self.has_rng("dropout"))
    return y.reshape(batch, steps, self.d_model).astype(self.dtype)
