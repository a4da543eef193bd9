"""NAMM-style learned KV-cache eviction (Cetin et al. 2024, "An Evolved Universal Transformer
Memory"): a small network scores each cached token from the attention it has received, and
tokens scoring below 0 are evicted.

- Features (`spectrogram_features`): each cached token keeps, per query head, the attention
  weights it received over the last `interval` decoding steps; an STFT of that history
  (frames of n_fft with hop, periodic Hann window, magnitudes: n_fft // 2 + 1 bins) is reduced
  over its frames by an exponential moving average (coefficient gamma, the newest frame
  weighted 1) that continues the token's previous average. Paper: n_fft 32, hop 16, gamma
  0.99, every 512 steps.
- Scorer (`scores`), the paper's BAM: per head, features -> hidden (32) embedding; one
  attention head over the cached tokens with the backward mask (a token attends to itself and
  to the tokens after it: whether later tokens took over its role); score = linear readout of
  the embedding plus the attention output. One parameter set shared by layers and heads.
- `step_attention`: one decoding query over the cache, returning the weights too.

Deviations (named): the paper evolves the scorer with CMA-ES (population 32, sigma0 0.065,
elite ratio 0.5); training it is left out here: `init_scorer` gives random parameters and
evolved ones are passed the same way. The paper evicts per (layer, head); here a token leaves
the layer's cache when its score averaged over the query heads is < 0 (one cache per layer).
The BAM here has no positional embeddings and no normalisation layers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.ops.segments import EMPTY

F32 = jnp.float32


def num_features(n_fft: int) -> int:
  return n_fft // 2 + 1


def init_scorer(key: jax.Array, n_fft: int = 32, hidden: int = 32) -> dict:
  """Random BAM parameters (normal / sqrt(fan_in), zero biases)."""
  ks = jax.random.split(key, 5)
  dense = lambda k, n, m: jax.random.normal(k, (n, m), F32) / jnp.sqrt(n)
  f = num_features(n_fft)
  return {
    "embed": dense(ks[0], f, hidden),
    "embed_bias": jnp.zeros((hidden,), F32),
    "query": dense(ks[1], hidden, hidden),
    "key": dense(ks[2], hidden, hidden),
    "value": dense(ks[3], hidden, hidden),
    "readout": dense(ks[4], hidden, 1)[:, 0],
    "readout_bias": jnp.zeros((), F32),
  }


def spectrogram_features(
  history: jax.Array, previous: jax.Array, *, n_fft: int, hop: int, gamma: float
) -> jax.Array:
  """history [..., S] (attention over the last S steps, oldest first), previous EMA [..., F]
  -> the EMA [..., F] after the STFT frames of the history (module docstring)."""
  steps = history.shape[-1]
  if n_fft > steps or hop < 1:
    raise ValueError(f"namm: need n_fft <= interval ({n_fft} > {steps}) and hop >= 1")
  starts = jnp.arange(0, steps - n_fft + 1, hop)
  frames = history[..., starts[:, None] + jnp.arange(n_fft)]  # [..., n_frames, n_fft]
  window = 0.5 - 0.5 * jnp.cos(2 * jnp.pi * jnp.arange(n_fft) / n_fft)  # periodic Hann
  magnitudes = jnp.abs(jnp.fft.rfft(frames.astype(F32) * window, axis=-1))
  n = len(starts)
  weights = gamma ** jnp.arange(n - 1, -1, -1, dtype=F32)  # newest frame weighted 1
  return gamma**n * previous + jnp.einsum("...nf,n->...f", magnitudes, weights)


def scores(params: dict, features: jax.Array, positions: jax.Array) -> jax.Array:
  """BAM scores [B, L, H] of cached tokens with features [B, L, H, F] at positions [B, L]
  (EMPTY slots take no part)."""
  h = features.astype(F32) @ params["embed"] + params["embed_bias"]  # [B, L, H, E]
  q, k, v = (h @ params[name] for name in ("query", "key", "value"))
  logits = jnp.einsum("bihe,bjhe->bhij", q, k) / jnp.sqrt(h.shape[-1])
  live = positions != EMPTY
  backward = positions[:, None, :] >= positions[:, :, None]  # [B, i, j]: j not before i
  mask = (backward & live[:, None, :] & live[:, :, None])[:, None]
  weights = jax.nn.softmax(jnp.where(mask, logits, -jnp.inf), axis=-1)
  weights = jnp.where(mask, weights, 0.0)  # empty slots' rows
  out = jnp.einsum("bhij,bjhe->bihe", weights, v)
  return (h + out) @ params["readout"] + params["readout_bias"]


def evict(
  scorer: dict,
  history: jax.Array,
  features: jax.Array,
  kv_positions: jax.Array,
  due: jax.Array,
  *,
  n_fft: int,
  hop: int,
  gamma: float,
) -> tuple[jax.Array, jax.Array]:
  """One eviction round on the rows where due [B]: the features [B,L,H,F] continued from the
  histories [B,L,H,S], and kv_positions [B,L] with the slots of the tokens whose score
  averaged over heads is < 0 emptied -> (features, kv_positions)."""
  new = spectrogram_features(history, features, n_fft=n_fft, hop=hop, gamma=gamma)
  features = jnp.where(due[:, None, None, None], new, features)
  evicted = scores(scorer, features, kv_positions).mean(-1) < 0
  return features, jnp.where(due[:, None] & evicted, EMPTY, kv_positions)


def free_slot(kv_positions: jax.Array) -> jax.Array:
  """[B] an empty slot of each row, else the slot of its oldest token."""
  return jnp.argmin(jnp.where(kv_positions == EMPTY, -1, kv_positions), axis=1)


def step_attention(q, k, v, *, scale, q_positions, kv_positions) -> tuple[jax.Array, jax.Array]:
  """One causal query per row, q [B,1,H,D] over a cache k, v [B,L,Hkv,D] at kv_positions
  [B,L] (EMPTY slots masked) -> (o [B,1,H,Dv], weights [B,L,H]), float32 math."""
  batch, _, heads, _ = q.shape
  groups = heads // k.shape[2]
  keys, values = jnp.repeat(k, groups, axis=2).astype(F32), jnp.repeat(v, groups, axis=2)
  logits = jnp.einsum("bhd,blhd->blh", q[:, 0].astype(F32), keys) * scale
  visible = (kv_positions <= q_positions[:, :1])[..., None]
  weights = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=1)
  o = jnp.einsum("blh,blhd->bhd", weights, values.astype(F32))
  return o[:, None].astype(v.dtype), weights
