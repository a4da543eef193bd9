"""RWKV-4 time mixing (Peng et al. 2023, "RWKV: Reinventing RNNs for the Transformer Era"), the
RWKV of Zoology's Figure 2 (`mixers/rwkv.py`, `RWKVTimeMixer`; channel mixing is the block's
state mixer, Identity in that figure):

  xx = x_{t-1} (zeros before the first token and at segment starts)
  x_* = μ_* ⊙ x + (1 - μ_*) ⊙ xx                 (* in k, v, r)
  k, v, r = W_k x_k, W_v x_v, W_r x_r             (d x d, no bias)
  out = W_o (σ(r) ⊙ wkv(k, v; w = exp(time_decay), u = time_first))

with the WKV operator of attnzoo.ops.wkv4 (per-channel decay and bonus, numerically stable in
log space; chunked for training, the recurrence for decoding). Init as RWKV-LM v4 (r01 =
l / (n - 1), r10 = 1 - l / n): time_decay_c = -5 + 8 (c / (d-1))^(0.7 + 1.3 r01), time_first_c
= ln 0.3 + 0.5 ((c+1) mod 3 - 1), μ_k = (c/d)^r10, μ_v = μ_k + 0.3 r01, μ_r = (c/d)^(r10/2);
projections N(0, 0.02) (Zoology re-initialises every Linear so, its "output" included). The
schedules use `init_num_layers` (None: num_layers; Zoology leaves RWKV's n_layer at 12 even
for its 2-layer models). Deviation: Zoology casts the WKV output to bf16 (RWKV_FLOAT_MODE);
here it stays in the compute dtype. Decoding keeps (p, q, o) [3, d] and the last input [d].
"""

from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import TokenShift, WKV4Op, state_bytes
from attnzoo.mixers.registry import dense_init, register

F32 = jnp.float32


def rwkv4_schedules(layer_idx: int, num_layers: int, dim: int) -> dict[str, np.ndarray]:
  """RWKV-4's layer-dependent initial values: time_decay, time_first, mu_k, mu_v, mu_r [D]."""
  r01 = layer_idx / (num_layers - 1) if num_layers > 1 else 0.0
  r10 = 1.0 - layer_idx / num_layers
  c = np.arange(dim)
  frac = c / dim
  mu_k = np.power(frac, r10)
  return {
    "time_decay": -5 + 8 * np.power(c / max(dim - 1, 1), 0.7 + 1.3 * r01),
    "time_first": np.log(0.3) + 0.5 * ((c + 1) % 3 - 1),
    "mu_k": mu_k,
    "mu_v": mu_k + 0.3 * r01,
    "mu_r": np.power(frac, 0.5 * r10),
  }


@register("rwkv4")
class RWKV4(nn.Module):
  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  init_num_layers: int | None = None
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the WKV state (p, q, o) [3, D] and the token-shift buffer [D]."""
    return state_bytes((3, self.d_model), (self.d_model,))

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    d = self.d_model
    init = rwkv4_schedules(self.layer_idx, self.init_num_layers or self.num_layers, d)
    p = {
      name: self.param(name, lambda *_, v=value: jnp.asarray(v, F32))
      for name, value in init.items()
    }
    xx = TokenShift(name="shift")(x, segment_ids=segment_ids, decode=decode)
    mix = lambda mu: (x * mu + xx * (1 - mu)).astype(self.dtype)
    dense = lambda name: nn.Dense(
      d, use_bias=False, dtype=self.dtype, kernel_init=dense_init, name=name
    )
    k = dense("key")(mix(p["mu_k"]))
    v = dense("value")(mix(p["mu_v"]))
    r = dense("receptance")(mix(p["mu_r"]))
    wkv = WKV4Op(self.implementation, name="wkv")(
      k, v, jnp.exp(p["time_decay"]), p["time_first"], segment_ids=segment_ids, decode=decode
    )
    return dense("output")((nn.sigmoid(r) * wkv).astype(self.dtype))
