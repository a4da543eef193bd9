"""sMLP token mixing (Yu et al. 2022, "Efficient Language Modeling with Sparse all-MLP"): the
sMoE module that replaces attention (and gMLP's spatial gating unit), with deterministic
routing: the hidden vector is cut into `num_experts` chunks along the features and chunk i
always goes to expert i (no learned gate, so no information from future tokens through the
router), each expert a causal gMLP spatial projection (Liu et al. 2021) over the sequence:

  u, v = split(GELU(W_in x))                    (Linear(d, 2 expand d))
  v    = LayerNorm(v)
  v'_t = b_e[t] + sum_{s <= t} W_e[t, s] v_s    for the channels of expert e (W_e [L,L])
  out  = W_out (u * v')
on attnzoo.ops.spatial_mix. Init as gMLP: W_e near zero (U(+-1e-3)) and b_e = 1, so the unit
starts close to u * LayerNorm(v). Not here: the paper's tMoE (a token-routed FFN replacing the
MLP: the block's state mixer, not sequence mixing) and its learned "partial prediction" router.
num_experts and expand are choices (the paper scales experts with the model). Decoding keeps
every past v (O(t) per token; state_size grows with L like attention's KV cache).
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import SpatialMixOp, state_bytes
from attnzoo.mixers.registry import dense_init, output_init, register

F32 = jnp.float32


@register("smlp")
class SMLP(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  l_max: int = 1024
  num_experts: int = 4
  expand: int = 2
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _width(self) -> int:
    width = self.expand * self.d_model
    if self.num_experts < 1 or width % self.num_experts:
      raise ValueError(
        f"smlp: num_experts ({self.num_experts}) must divide expand * d_model ({width})"
      )
    return width

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: every past v, [seq_len, expand d]."""
    return state_bytes((seq_len, self._width()))

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    width = self._width()
    z = nn.gelu(nn.Dense(2 * width, dtype=self.dtype, kernel_init=dense_init, name="in_proj")(x))
    u, v = jnp.split(z, 2, axis=-1)
    v = nn.LayerNorm(dtype=self.dtype, name="norm")(v)
    shape = (self.num_experts, self.l_max)
    init = lambda key, shape: jax.random.uniform(key, shape, F32, -1e-3, 1e-3)
    weight = self.param("spatial_weight", init, shape + (self.l_max,))
    bias = self.param("spatial_bias", nn.initializers.ones, shape, F32)
    mixed = SpatialMixOp(name="mix")(v, weight, bias, segment_ids=segment_ids, decode=decode)
    out = nn.Dense(
      self.d_model, dtype=self.dtype, kernel_init=output_init(self.num_layers), name="out_proj"
    )
    return out(u * mixed.astype(u.dtype))
