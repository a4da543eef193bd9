"""Softmax attention mixers: multi-head / grouped-query / multi-query attention (Vaswani et
al. 2017; Ainslie et al. 2023 for GQA; Shazeer 2019 for MQA), optional RoPE, sliding-window
(local) attention, gated attention, Block-Attention, and the softmax variants shaped attention
and Sinkhorn attention.

Decoding keeps a KV cache of `cache_len` slots in the "cache" collection, written as a ring
(slot = position mod cache_len): the whole context for full attention, the last `window`
tokens for sliding-window attention. `attention_dropout` drops attention probabilities while
training, i.e. when the module is given a "dropout" rng (`apply(..., rngs={"dropout": key})`).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnzoo.mixers.layers import (
  default_positions,
  hidden_attention,
  no_decode_segments,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, output_init, register
from attnzoo.ops import dam as dam_ops
from attnzoo.ops import namm as namm_ops
from attnzoo.ops import routing as routing_ops
from attnzoo.ops import softmax_attention
from attnzoo.ops.rotary import apply_rope
from attnzoo.ops.segments import EMPTY, canonical_segments, segment_starts
from attnzoo.ops.sinkhorn_attention import sinkhorn_attention
from attnzoo.ops.softmax_attention import decode_splits, merge_attention, split_kv_attention


def documents(q_pos, kv_pos, segment_ids, kv_segment_ids) -> tuple[jax.Array, jax.Array]:
  """The document ids of queries and keys (zeros without packed segments)."""
  q_doc = jnp.zeros(q_pos.shape, jnp.int32) if segment_ids is None else segment_ids
  kv_doc = segment_ids if kv_segment_ids is None else kv_segment_ids
  return q_doc, jnp.zeros(kv_pos.shape, jnp.int32) if kv_doc is None else kv_doc


@register("attention")
class Attention(nn.Module):
  """Multi-head attention; num_kv_heads < num_heads gives GQA (1 gives MQA).

  window: None for full attention, or w for local attention in which each token sees itself
  and the w - 1 tokens before it (and, with causal=False, the w - 1 tokens after it). head_dim
  may be set independently of d_model / num_heads (Bhojanapalli et al. 2020: a head size of the
  sequence length removes the low-rank bottleneck). softcap: logits -> softcap·tanh(logits /
  softcap).

  Attention sinks (Xiao et al. 2024, "Efficient Streaming Language Models with Attention
  Sinks"): sink_tokens = s keeps the first s positions visible to every query beside the
  window (StreamingLLM; needs a window; the KV cache keeps them in s slots of their own), and
  sink_logit adds one learned logit per head (init 0) whose value is zero, so a head can put
  weight on "nothing": o <- o · sigmoid(lse - sink). Both merge through the log-sum-exp of
  softmax_attention.

  Gist tokens (Mu et al. 2023; the segment-wise compression studied by Deng et al. 2024, "A
  Silver Bullet or a Compromise for Full Attention? A Comprehensive Study of Gist Token-based
  Context Compression"): the sequence is read as chunks of gist_segment tokens followed by
  gist_tokens gist positions; a token sees its own chunk (causally) and the gist positions of
  earlier chunks only, so the gists must carry what later chunks need. A mask: which tokens
  are gists is fixed by position (the data puts gist tokens there). The KV cache still keeps
  every token (a gist cache would keep the gists and the current chunk).

  Segments: with segment = S, a token sees only its own segment of S positions (causally unless
  causal=False; HAT's segment-wise encoder). Transformer-XL memory (Dai et al. 2019; the
  memory-length ablation of Rae & Razavi 2020, "Do Transformers Need Deep Long-Range
  Memory?"): with memory = M too, a token also sees the M positions before its segment with
  stop-gradient keys and values, as a cached previous segment. The KV cache keeps M + S
  slots. Deviation: positions are
  the mixer's (RoPE with rope=True), not Transformer-XL's learned relative encoding (u, v,
  W_R R_{i-j}).

  DAM masks (attnzoo.ops.dam; Zhang et al. 2025): when the "dam" collection holds this
  layer's pattern (`apply({"params": p, "dam": patterns}, ...)`, patterns from
  `dam.extract_pattern` of the layer's attention maps), every query sees only the pattern's
  keys, in the forward pass and in decoding.

  NAMM-style eviction (attnzoo.ops.namm; Cetin et al. 2024), a decoding option of plain
  attention: with namm_interval = n > 0, decoding one token at a time keeps each cached
  token's attention history and every n steps evicts the tokens a scorer (its parameters as
  "scorer" in the "namm" collection) rates < 0; new tokens take freed slots. namm_cache
  bounds the cache (when full, the oldest token is overwritten). A prompt read in one chunk
  is attended in full. The forward pass is unchanged.
  """

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  num_kv_heads: int | None = None
  head_dim: int | None = None
  causal: bool = True
  window: int | None = None
  softcap: float | None = None
  rope: bool = False
  rope_base: float = 10000.0
  attention_dropout: float = 0.0
  sink_tokens: int = 0
  sink_logit: bool = False
  gist_tokens: int = 0
  gist_segment: int = 0
  memory: int = 0
  segment: int = 0
  namm_interval: int = 0
  namm_n_fft: int = 32
  namm_hop: int = 16
  namm_ema: float = 0.99
  namm_cache: int | None = None
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True
  decode_keeps_queries: ClassVar[bool] = False  # the cache also keeps the context's queries

  def _dims(self):
    kv_heads = self.num_kv_heads or self.num_heads
    if self.head_dim is None and self.d_model % self.num_heads:
      raise ValueError(
        f"d_model ({self.d_model}) must be divisible by num_heads "
        f"({self.num_heads}), or set head_dim"
      )
    if self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads ({kv_heads}) must divide num_heads ({self.num_heads})")
    if self.window is not None and self.window < 1:
      raise ValueError(f"window must be >= 1, got {self.window}")
    if self.sink_tokens < 0 or (self.sink_tokens and self.window is None):
      raise ValueError(f"sink_tokens ({self.sink_tokens}) must be >= 0 and needs a window")
    if min(self.gist_tokens, self.gist_segment, self.memory, self.segment) < 0:
      raise ValueError("gist_tokens, gist_segment, memory and segment must be >= 0")
    if self.gist_tokens and (self.gist_segment < 1 or self.segment):
      raise ValueError("gist_tokens need gist_segment >= 1 (and no segment or memory)")
    if self.memory and self.segment < 1:
      raise ValueError("memory needs segment >= 1")
    if self.namm_interval < 0 or (self.namm_cache is not None and self.namm_cache < 1):
      raise ValueError("namm_interval must be >= 0 and namm_cache >= 1")
    plain = self.window is None and not (self.sink_tokens or self.sink_logit or self._chunk())
    if self.namm_interval and not (plain and self.softcap is None):
      raise ValueError("namm eviction takes plain attention (no window, sinks, chunks, softcap)")
    if not 0.0 <= self.attention_dropout < 1.0:
      raise ValueError(f"attention_dropout must be in [0, 1), got {self.attention_dropout}")
    return self.num_heads, kv_heads, self.head_dim or self.d_model // self.num_heads

  def _window(self):
    if self.window is None:
      return None
    return (self.window - 1, 0 if self.causal else self.window - 1)

  def state_size(self, seq_len: int) -> int:
    """KV-cache bytes at float32 for a context of seq_len tokens."""
    _, kv_heads, head_dim = self._dims()
    kept = self._kept(seq_len)
    heads = self._dims()[0]
    queries = state_bytes((kept, heads, head_dim)) if self.decode_keeps_queries else 0
    if self.namm_interval:  # attention histories and their spectrogram averages
      n = self.namm_interval + namm_ops.num_features(self.namm_n_fft)
      queries += state_bytes((kept, heads, n))
    return 2 * state_bytes((kept, kv_heads, head_dim)) + queries

  def setup(self):
    heads, kv_heads, head_dim = self._dims()
    dense = lambda n: nn.DenseGeneral((n, head_dim), dtype=self.dtype, kernel_init=dense_init)
    self.q, self.k, self.v = dense(heads), dense(kv_heads), dense(kv_heads)
    self.out = nn.DenseGeneral(
      self.d_model, axis=(-2, -1), dtype=self.dtype, kernel_init=output_init(self.num_layers)
    )
    if self.sink_logit:
      self.sink = self.param("sink_logit", nn.initializers.zeros, (heads,), jnp.float32)

  def _project(self, x, positions):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope:
      q = apply_rope(q, positions, base=self.rope_base)
      k = apply_rope(k, positions, base=self.rope_base)
    return q, k, v

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    return self._mix(x, positions, decode, segment_ids=segment_ids)

  def attention_matrix(
    self, x: jax.Array, *, positions: jax.Array | None = None, segment_ids: jax.Array | None = None
  ) -> jax.Array:
    """Softmax attention weights [B, H, T, T] (no dropout)."""
    return self._matrix(x, positions, segment_ids=segment_ids)

  def _mix(self, x, positions, decode, **masks):
    """The mixer's output; masks: segment_ids (and block_ids where the mixer takes them)."""
    positions = default_positions(x, positions)
    q, k, v = self._project(x, positions)
    if decode:
      if not self.causal:
        raise ValueError("decoding needs causal attention")
      no_decode_segments(**masks)
      o = self._decode(q, k, v, positions)
    else:
      rng = None
      if self.attention_dropout and self.has_rng("dropout"):
        rng = self.make_rng("dropout")
      o = self._attend(q, k, v, dropout_rng=rng, implementation=self.implementation, **masks)
    return self.out(self._gate(x, o))

  def _matrix(self, x, positions, **masks):
    positions = default_positions(x, positions)
    q, k, _ = self._project(x, positions)
    return hidden_attention(self._attend, q, k, **masks)

  def _scale(self) -> float:
    return self._dims()[2] ** -0.5

  def _attend(
    self,
    q,
    k,
    v,
    *,
    implementation,
    segment_ids=None,
    dropout_rng=None,
    q_positions=None,
    kv_positions=None,
    kv_segment_ids=None,
  ):
    """Attention of q over k, v: the whole sequence, or (with positions) a KV cache; the
    options that widen the visible set (sinks, gist tokens, memory) add disjoint key sets,
    merged through their log-sum-exps."""
    attend = lambda q_pos, q_seg, kv_seg, keys=k, values=v, **kw: softmax_attention(
      q,
      keys,
      values,
      scale=self._scale(),
      segment_ids=q_seg,
      kv_segment_ids=kv_seg,
      q_positions=q_pos,
      kv_positions=kv_positions,
      softcap=self.softcap,
      dropout_rate=self.attention_dropout,
      dropout_rng=dropout_rng,
      implementation=implementation,
      **kw,
    )
    main = dict(causal=self.causal, window=self._window())
    main.update(self._dam(q, k, q_positions, kv_positions))
    if not (self.sink_tokens or self.sink_logit or self._chunk()):
      plain = segment_ids is None and "bias" not in main
      if q.shape[1] == 1 and kv_positions is not None and plain:
        # a decoding step over a KV cache: the keys split into chunks merged by log-sum-exp,
        # so the step has B x splits x H pieces of work instead of B x H
        return split_kv_attention(
          q,
          k,
          v,
          scale=self._scale(),
          q_positions=q_positions,
          kv_positions=kv_positions,
          num_splits=decode_splits(k.shape[1]),
          softcap=self.softcap,
          implementation=implementation,
          **main,
        )
      return attend(q_positions, segment_ids, kv_segment_ids, **main)
    q_pos, kv_pos = default_positions(q, q_positions), default_positions(k, kv_positions)
    # documents as ids (packed sequences), combined below with the chunk of each position
    q_doc, kv_doc = documents(q_pos, kv_pos, segment_ids, kv_segment_ids)
    chunk = self._chunk()
    if chunk:  # gist tokens / segments: the main set is the query's own chunk
      q_doc, kv_doc = canonical_segments(q_doc), canonical_segments(kv_doc)
      ids = lambda doc, pos: doc * 2**15 + pos // chunk
      parts = [attend(q_pos, ids(q_doc, q_pos), ids(kv_doc, kv_pos), return_lse=True, **main)]
      before = q_pos // chunk * chunk - 1  # the last position of the previous chunk
      if self.gist_tokens:  # the gist tokens of earlier chunks
        gists = jnp.where(kv_pos % chunk >= self.gist_segment, kv_doc, -1)
        parts.append(attend(before, q_doc, gists, causal=True, return_lse=True))
      if self.memory:  # the `memory` positions before the chunk, without gradient
        sg = jax.lax.stop_gradient
        memory = dict(causal=True, window=(self.memory - 1, 0), return_lse=True)
        parts.append(attend(before, q_doc, kv_doc, keys=sg(k), values=sg(v), **memory))
    else:
      parts = [attend(q_positions, segment_ids, kv_segment_ids, return_lse=True, **main)]
    if self.sink_tokens:  # the first positions, where the window no longer reaches them
      sinks = jnp.where(kv_pos < self.sink_tokens, kv_doc, -1)
      parts.append(attend(q_pos - self.window, q_doc, sinks, causal=True, return_lse=True))
    if self.sink_logit:
      o, lse = parts[0]
      parts.append((jnp.zeros_like(o), jnp.broadcast_to(self.sink, lse.shape)))
    return merge_attention(parts)

  def _dam(self, q, k, q_positions, kv_positions) -> dict:
    """{"bias": the DAM mask} when the "dam" collection holds this layer's pattern, else {}."""
    if not self.has_variable("dam", "offsets"):
      return {}
    pattern = dam_ops.Pattern(*(self.get_variable("dam", n) for n in dam_ops.Pattern._fields))
    q_pos, kv_pos = default_positions(q, q_positions), default_positions(k, kv_positions)
    return {"bias": dam_ops.pattern_bias(pattern, q_pos, kv_pos)}

  def _namm_step(self, q, k, v, positions, cache_k, cache_v, cache_pos, history, ema):
    """One decoding step with NAMM eviction (attnzoo.ops.namm): every namm_interval steps the
    tokens the scorer rates < 0 leave the cache; the new token takes a free slot (else the
    oldest token's); attention over the cache; the weights join each token's history."""
    if not self.has_variable("namm", "scorer"):
      raise ValueError("namm_interval needs the scorer in the 'namm' collection (namm.init_scorer)")
    rows, pos, n = jnp.arange(q.shape[0]), positions[:, 0], self.namm_interval
    ema.value, cache_pos.value = namm_ops.evict(
      self.get_variable("namm", "scorer"),
      history.value,
      ema.value,
      cache_pos.value,
      (pos % n == 0) & (pos > 0),
      n_fft=self.namm_n_fft,
      hop=self.namm_hop,
      gamma=self.namm_ema,
    )
    slot = namm_ops.free_slot(cache_pos.value)
    for cache, value in ((cache_k, k), (cache_v, v), (cache_pos, positions)):
      cache.value = cache.value.at[rows, slot].set(value[:, 0].astype(cache.value.dtype))
    for state in (history, ema):
      state.value = state.value.at[rows, slot].set(0.0)
    o, weights = namm_ops.step_attention(
      q,
      cache_k.value,
      cache_v.value,
      scale=self._scale(),
      q_positions=positions,
      kv_positions=cache_pos.value,
    )
    history.value = history.value.at[rows, :, :, pos % n].set(weights)
    return o

  def _chunk(self) -> int:
    """The chunk length of gist-token masking or of segments (0: neither)."""
    if self.gist_tokens:
      return self.gist_segment + self.gist_tokens
    return self.segment

  def _kept(self, steps: int) -> int:
    """KV-cache slots for a context of `steps` tokens."""
    if self.window is not None:
      return min(steps, self.window + self.sink_tokens)
    if self.segment:
      return min(steps, self.memory + self.segment)
    return min(steps, self.namm_cache or steps)

  def _gate(self, x, o):
    """Hook for output gating (GatedAttention); plain attention returns o."""
    del x
    return o

  @nn.compact
  def _decode(self, q, k, v, positions):
    batch, steps = q.shape[:2]
    initialized = self.has_variable("cache", "keys")
    # The cache is created by `model.init(..., decode=True)` on an input of the longest
    # context to decode; during that call, attention runs over the input as usual.
    sinks = self.sink_tokens
    cache_len = self._kept(steps)
    cache_k = self.variable("cache", "keys", jnp.zeros, (batch, cache_len) + k.shape[2:], k.dtype)
    cache_v = self.variable("cache", "values", jnp.zeros, (batch, cache_len) + v.shape[2:], v.dtype)
    cache_pos = self.variable("cache", "positions", jnp.full, (batch, cache_len), EMPTY)
    cache_q = None
    if self.decode_keeps_queries:  # a normalisation over the queries of the context too
      cache_q = self.variable("cache", "queries", jnp.zeros, (batch, cache_len) + q.shape[2:])
    if self.namm_interval:
      shape = lambda n: (batch, cache_len, q.shape[2], n)
      history = self.variable("cache", "namm_history", jnp.zeros, shape(self.namm_interval))
      n_features = namm_ops.num_features(self.namm_n_fft)
      ema = self.variable("cache", "namm_features", jnp.zeros, shape(n_features))
    if not initialized:
      return self._attend(q, k, v, implementation=self.implementation)
    if self.namm_interval and steps == 1:
      return self._namm_step(q, k, v, positions, cache_k, cache_v, cache_pos, history, ema)
    # Keep the newest tokens in a ring (slot = position mod its length) and the first
    # sink_tokens positions in slots of their own.
    cache_len = cache_k.value.shape[1]
    ring = max(cache_len - sinks, 1)
    kept = min(steps, ring)
    new = positions[:, -kept:]
    writes = [(steps - kept, jnp.where(new < sinks, new, sinks + (new - sinks) % ring))]
    if sinks:
      writes.append((0, jnp.where(positions < sinks, positions, cache_len)))  # others dropped
    rows = jnp.arange(batch)[:, None]
    caches = [(cache_k, k), (cache_v, v), (cache_pos, positions)]
    caches += [] if cache_q is None else [(cache_q, q)]

    def write():
      for start, slots in writes:
        for cache, value in caches:
          cache.value = cache.value.at[rows, slots].set(
            value[:, start:].astype(cache.value.dtype), mode="drop"
          )

    if steps == 1:
      # One new token: written first (the slot it takes held a token it cannot see: the cache
      # is sized to what a query sees), then attention over the cache alone, no copy of it.
      write()
      keys, values, kv_positions = cache_k.value, cache_v.value, cache_pos.value
      extra = {} if cache_q is None else {"kv_queries": cache_q.value}
    else:  # a prompt chunk: over cache + chunk (a ring cache may be shorter than the chunk)
      keys = jnp.concatenate([cache_k.value, k.astype(cache_k.value.dtype)], axis=1)
      values = jnp.concatenate([cache_v.value, v.astype(cache_v.value.dtype)], axis=1)
      kv_positions = jnp.concatenate([cache_pos.value, positions], axis=1)
      extra = {}
      if cache_q is not None:
        extra["kv_queries"] = jnp.concatenate([cache_q.value, q.astype(cache_q.value.dtype)], 1)
    o = self._attend(
      q,
      keys,
      values,
      q_positions=positions,
      kv_positions=kv_positions,
      implementation=self.implementation,
      **extra,
    )
    if steps > 1:
      write()
    return o


@register("sliding_window")
class SlidingWindow(Attention):
  """Local attention (Beltagy et al. 2020): each token sees the last `window` tokens (itself
  included); with causal=False also the window - 1 tokens after it."""

  window: int | None = 64


@register("gated_attention")
class GatedAttention(Attention):
  """Gated attention (Qiu et al. 2025, "Gated Attention for Large Language Models"): the SDPA
  output of each head is multiplied by sigmoid(x W_g), computed from the block input x, before
  the output projection. gate="elementwise" gives one gate per head channel, "headwise" one
  per head."""

  gate: str = "elementwise"

  def setup(self):
    super().setup()
    heads, _, head_dim = self._dims()
    if self.gate not in ("elementwise", "headwise"):
      raise ValueError(f"gate must be elementwise or headwise, got {self.gate!r}")
    width = head_dim if self.gate == "elementwise" else 1
    self.gate_proj = nn.DenseGeneral((heads, width), dtype=self.dtype, kernel_init=dense_init)

  def _gate(self, x, o):
    return o * jax.nn.sigmoid(self.gate_proj(x)).astype(o.dtype)


@register("block_attention")
class BlockAttention(Attention):
  """Block-Attention (Sun et al. 2024, "Block-Attention for Efficient RAG"): `block_ids` mark
  blocks (passages; a block is a run of equal ids); tokens attend causally within their own
  block, and the last block of each sequence attends causally to everything. With
  `segment_ids` (packed documents) too, no token attends across documents and each document's
  last block sees its whole document. Positions use RoPE, so a block's keys encoded at local
  positions 0..n-1 (`encode_block`) are re-encoded to any offset exactly by a rotation
  (`place_block`): a block's KV cache can be computed once and reused across prompts. Decoding
  (the last block, from such a cache) takes no block_ids."""

  rope: bool = True

  bidirectional: ClassVar[bool] = False
  uses_block_ids: ClassVar[bool] = True

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    return self._mix(x, positions, decode, segment_ids=segment_ids, block_ids=block_ids)

  def attention_matrix(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    block_ids: jax.Array | None = None,
  ) -> jax.Array:
    """Block-Attention weights [B, H, T, T] (no dropout)."""
    return self._matrix(x, positions, segment_ids=segment_ids, block_ids=block_ids)

  def _attend(self, q, k, v, *, segment_ids=None, block_ids=None, **kwargs):
    if not self.rope:
      raise ValueError("block_attention re-encodes positions through RoPE: set rope=True")
    if not self.causal:
      raise ValueError("block_attention is causal-only")
    everything = super()._attend(q, k, v, segment_ids=segment_ids, **kwargs)
    if block_ids is None:
      return everything
    # One id per (document, block) run; a token is in its document's last block when its run
    # is the run at the document's end.
    documents = (
      jnp.zeros_like(block_ids, bool) if segment_ids is None else segment_starts(segment_ids)
    )
    runs = jnp.cumsum(segment_starts(block_ids) | documents, axis=1)
    ends = jnp.concatenate([documents[:, 1:], jnp.ones_like(documents[:, :1])], axis=1)
    last_run = jax.lax.cummin(
      jnp.where(ends, runs, jnp.iinfo(runs.dtype).max), axis=1, reverse=True
    )
    local = super()._attend(q, k, v, segment_ids=runs, **kwargs)
    return jnp.where((runs == last_run)[:, :, None, None], everything, local)

  def encode_block(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(k, v) of one block on its own, at local positions 0..n-1."""
    _, k, v = self._project(x, default_positions(x, None))
    return k, v

  def place_block(self, k: jax.Array, offset: int | jax.Array) -> jax.Array:
    """Re-encodes keys from local positions to positions offset..offset+n-1 (RoPE rotation)."""
    return apply_rope(k, jnp.full(k.shape[:2], offset, jnp.int32), base=self.rope_base)


@register("shaped")
class ShapedAttention(Attention):
  """Shaped attention (Noci et al. 2023, "The Shaped Transformer: Attention Models in the
  Infinite Depth-and-Width Limit"): softmax centred at the identity with a width-dependent
  temperature,

    A = I + softmax(q k^T / τ) - C,   τ = tau0 · sqrt(n · n_k),   o = A v,

  n the width (d_model), n_k the key dimension (head_dim), C the uniform average over the keys
  a query sees: the paper's (1/m) 1 1^T; with causal=True 1/(t+1) over the prefix (our causal
  reading; likewise inside a window or a segment). At initialisation the logits are O(1/sqrt n),
  so A ≈ I. C v is attention with zero queries, so every mask and fast path of softmax_attention
  serves both terms. Deviation: the paper's residual λ x + γ A x W_V / sqrt(n) is the block's
  plain residual here (λ = γ = 1, the 1/sqrt(n) left to W_V's initialisation). Decoding: the
  KV cache of attention."""

  tau0: float = 1.0

  def _scale(self) -> float:
    return 1.0 / (self.tau0 * math.sqrt(self.d_model * self._dims()[2]))

  def _attend(self, q, k, v, *, implementation, dropout_rng=None, **masks):
    attend = super()._attend
    o = attend(q, k, v, implementation=implementation, dropout_rng=dropout_rng, **masks)
    uniform = attend(jnp.zeros_like(q), k, v, implementation=implementation, **masks)
    own = v[:, -q.shape[1] :]  # v of the query: the last ones, or found by position in a cache
    if masks.get("kv_positions") is not None:
      match = masks["kv_positions"][:, None, :] == masks["q_positions"][:, :, None]
      own = jnp.einsum("bqk,bkhd->bqhd", match.astype(v.dtype), v)
    own = jnp.repeat(own, q.shape[2] // v.shape[2], axis=2)
    return o + own.astype(o.dtype) - uniform


@register("sinkhorn")
class SinkhornAttention(Attention):
  """Sinkformer attention (Sander et al. 2022, "Sinkformers: Transformers with Doubly Stochastic
  Attention"): exp(q k^T / sqrt(d)) scaled by `n_iter` Sinkhorn iterations (1 = softmax; the
  paper's NLP runs use 3) towards a doubly stochastic matrix (attnzoo.ops.sinkhorn_attention).
  causal=False: one Sinkhorn over the sequence (the paper's encoder). causal=True: the query at
  position t takes row t of Sinkhorn over the block of queries and keys at positions <= t, so
  nothing of the future reaches it (our causal treatment; O(T^3) work in training). Decoding
  keeps the queries in the KV cache too (the prefix block needs them). No window, softcap or
  attention dropout."""

  n_iter: int = 3

  decode_keeps_queries: ClassVar[bool] = True

  def _attend(
    self,
    q,
    k,
    v,
    *,
    implementation,
    segment_ids=None,
    dropout_rng=None,
    q_positions=None,
    kv_positions=None,
    kv_queries=None,
  ):
    del dropout_rng
    if self.window is not None or self.softcap is not None or self.attention_dropout:
      raise ValueError("sinkhorn takes no window, softcap or attention_dropout")
    return sinkhorn_attention(
      q,
      k,
      v,
      kv_queries,
      scale=self._scale(),
      n_iter=self.n_iter,
      causal=self.causal,
      segment_ids=segment_ids,
      q_positions=q_positions,
      kv_positions=kv_positions,
      implementation=implementation,
    )


@register("moh")
class MixtureOfHeads(Attention):
  """MoH, mixture-of-head attention (Jin et al. 2024, "MoH: Multi-Head Attention as
  Mixture-of-Head Attention"): heads are experts; each token weights its heads' outputs before
  the output projection. The first `shared_heads` heads are always on, gated by
  h_s · softmax(W_s x); a router picks the top `routed_heads` of the others by softmax(W_r x),
  renormalised over the chosen ones, times routed_heads; the two groups are mixed by
  2 · softmax(W_h x) (routers bias-free, as the official MoHAttention). Defaults: 4 heads,
  1 shared and 2 routed (75% of heads active per token, the MoH-LLaMA3 ratio).
  `balance_loss(x)` is the paper's load-balance term E · Σ_i P_i f_i (coefficient 0.01 in the
  paper); deviation: it is not sown into the "losses" the trainer adds, so training here runs
  without it. All heads are computed and masked (no ragged head sets). Decoding: attention's
  KV cache of all heads."""

  num_heads: int = 4
  shared_heads: int = 1
  routed_heads: int = 2

  def setup(self):
    super().setup()
    heads = self._dims()[0]
    routed = heads - self.shared_heads
    if self.shared_heads < 0 or self.routed_heads < 0 or self.routed_heads > routed:
      raise ValueError(
        f"moh needs 0 <= shared_heads and 0 <= routed_heads <= num_heads - shared_heads; got "
        f"{self.shared_heads}, {self.routed_heads} of {heads} heads"
      )
    if self.shared_heads + self.routed_heads == 0:
      raise ValueError("moh needs shared_heads + routed_heads >= 1")
    router = lambda n: nn.Dense(n, use_bias=False, dtype=self.dtype, kernel_init=dense_init)
    if self.routed_heads:
      self.routed_router = router(routed)
    if self.shared_heads:
      self.shared_router = router(self.shared_heads)
    if self.shared_heads and self.routed_heads:
      self.mix_router = router(2)

  def _routing(self, x):
    """(router probabilities [B,T,R], top-k mask [B,T,R]) of the routed heads."""
    probs = jax.nn.softmax(self.routed_router(x).astype(jnp.float32), axis=-1)
    _, chosen = jax.lax.top_k(probs, self.routed_heads)
    mask = jax.nn.one_hot(chosen, probs.shape[-1], dtype=jnp.float32).sum(-2)
    return probs, mask

  def head_gates(self, x: jax.Array) -> jax.Array:
    """g [B,T,H]: each token's weight of each head (0 for heads it does not route to)."""
    gates = []
    if self.shared_heads:
      shared = jax.nn.softmax(self.shared_router(x).astype(jnp.float32), -1) * self.shared_heads
      gates.append(shared)
    if self.routed_heads:
      probs, mask = self._routing(x)
      chosen = probs * mask
      denom = jnp.maximum(chosen.sum(-1, keepdims=True), jnp.finfo(jnp.float32).eps)
      gates.append(chosen / denom * self.routed_heads)
    if len(gates) == 2:
      alpha = 2 * jax.nn.softmax(self.mix_router(x).astype(jnp.float32), -1)
      gates = [gates[0] * alpha[..., :1], gates[1] * alpha[..., 1:]]
    return jnp.concatenate(gates, -1)

  def balance_loss(self, x: jax.Array) -> jax.Array:
    """E · Σ_i P_i f_i over the E routed heads: P_i the mean router probability of head i, f_i
    the fraction of tokens choosing it (routed_heads when perfectly balanced)."""
    if not self.routed_heads:
      return jnp.zeros((), jnp.float32)
    probs, mask = self._routing(x)
    experts = probs.shape[-1]
    return experts * jnp.sum(probs.reshape(-1, experts).mean(0) * mask.reshape(-1, experts).mean(0))

  def _gate(self, x, o):
    return o * self.head_gates(x)[..., None].astype(o.dtype)


@register("routing")
class RoutingAttention(Attention):
  """Routing attention (Roy et al. 2021, "Efficient Content-Based Sparse Attention with
  Routing Transformers"): per head, queries and keys on the unit sphere are assigned to the
  nearest of `num_clusters` shared centroids (online spherical k-means), and a query attends
  only to the keys of its own cluster (causally, within packed documents): softmax_attention
  with the cluster ids as segment ids, heads folded into the batch, so every fast path serves
  it (dense masked compute: the pattern of the paper, not its O(T^1.5) gather). A query with
  no key in its cluster returns 0. The centroids [H,C,d] are a parameter that only the k-means
  update moves: routing uses them under stop_gradient, and attnzoo.ops.routing.kmeans_tap gives
  them the gradient μ - m̂ (m̂ the batch mean of the unit queries and keys assigned to each
  centroid), so SGD at learning rate 1 - λ is the paper's EMA with decay λ; under the zoo's
  AdamW the step is Adam's (deviation). Not in the paper's model here: its local-attention
  heads and the commitment loss (not sown into the trainer's "losses"). Decoding: the KV
  cache of attention; key clusters are recomputed from the cached keys."""

  num_clusters: int = 8

  def setup(self):
    super().setup()
    heads, _, head_dim = self._dims()
    shape = (heads, self.num_clusters, head_dim)
    self.centroids = self.param("centroids", nn.initializers.normal(1.0), shape, jnp.float32)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    y = super().__call__(x, positions=positions, segment_ids=segment_ids, decode=decode)
    if decode:
      return y
    q, k, _ = self._project(x, default_positions(x, positions))
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    return routing_ops.kmeans_tap(
      y, self.centroids, routing_ops.centroid_targets([q, k], self.centroids)
    )

  def clusters(self, x: jax.Array, positions: jax.Array | None = None) -> tuple:
    """(query clusters, key clusters), each [B,T,H]."""
    q, k, _ = self._project(x, default_positions(x, positions))
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    mu = jax.lax.stop_gradient(self.centroids)
    return routing_ops.assign(q, mu), routing_ops.assign(k, mu)

  def _attend(
    self,
    q,
    k,
    v,
    *,
    implementation,
    segment_ids=None,
    dropout_rng=None,
    q_positions=None,
    kv_positions=None,
  ):
    batch, tq, heads, _ = q.shape
    groups = heads // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    mu = jax.lax.stop_gradient(self.centroids)
    ids_q, ids_k = routing_ops.assign(q, mu), routing_ops.assign(k, mu)  # [B,T,H]
    if segment_ids is not None:  # clusters inside packed documents
      docs = canonical_segments(segment_ids)[..., None] * self.num_clusters
      ids_q, ids_k = ids_q + docs, ids_k + docs
    fold = lambda a: jnp.swapaxes(a, 1, 2).reshape((-1, a.shape[1], 1) + a.shape[3:])
    ids = lambda a: jnp.swapaxes(a, 1, 2).reshape(-1, a.shape[1])
    rep = lambda p: None if p is None else jnp.repeat(p, heads, axis=0)
    o = super()._attend(
      fold(q),
      fold(k),
      fold(v),
      implementation=implementation,
      segment_ids=ids(ids_q),
      kv_segment_ids=ids(ids_k),
      dropout_rng=dropout_rng,
      q_positions=rep(q_positions),
      kv_positions=rep(kv_positions),
    )
    return jnp.swapaxes(o.reshape(batch, heads, tq, -1), 1, 2)


class CrossSegmentAttention(Attention):
  """HAT's cross-segment attention: a query reads only the summaries of segments of `segment`
  positions, a summary being the token at the end of its segment; causal: the segments before
  the query's own (complete ones), else every segment (the sequence's last token closes the
  last). Not registered: the second half of `hat`."""

  def _attend(self, q, k, v, *, segment_ids=None, q_positions=None, kv_positions=None, **kwargs):
    q_pos, kv_pos = default_positions(q, q_positions), default_positions(k, kv_positions)
    doc, kv_doc = documents(q_pos, kv_pos, segment_ids, kwargs.pop("kv_segment_ids", None))
    ends = kv_pos % self.segment == self.segment - 1
    if not self.causal:  # the last token of each document closes its last segment
      ends |= jnp.arange(kv_pos.shape[1]) == kv_pos.shape[1] - 1
      if segment_ids is not None:
        ends |= jnp.concatenate([segment_starts(segment_ids)[:, 1:], ends[:, -1:]], axis=1)
    summaries = jnp.where(ends, kv_doc, -1)
    before = q_pos // self.segment * self.segment - 1  # the end of the previous segment
    return super()._attend(
      q,
      k,
      v,
      segment_ids=doc,
      kv_segment_ids=summaries,
      q_positions=before if self.causal else q_positions,
      kv_positions=kv_positions,
      **kwargs,
    )

  def _chunk(self) -> int:
    return 0  # `segment` defines the summaries here, not a local mask

  def _kept(self, steps: int) -> int:
    return steps


@register("hat")
class HierarchicalAttention(nn.Module):
  """HAT, hierarchical attention (Chalkidis et al. 2022, "An Exploration of Hierarchical
  Attention Transformers for Efficient Long Document Classification"), one interleaved layer:
  a segment-wise encoder (attention within segments of `segment` positions) then a
  cross-segment encoder (each token reads the summaries of the segments, the summary of a
  segment being the segment-wise output at its last token; causal: only complete segments
  before the token's own):

    h = x + SWE(x),   y = SWE(x) + CSE(h)

  Deviations: HAT's segment tokens are prepended [CLS]-like tokens whose contextualised states
  are written back for the next layer; here the last token of each segment is the summary
  (so the causal form is exact) and every token reads the summaries in the same layer. Both
  halves are attention modules with their own projections (RoPE when rope=True); decoding
  keeps the segment-wise cache (segment slots) and the cross-segment keys of the context."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 1
  segment: int = 16
  causal: bool = True
  rope: bool = False
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = True

  def _halves(self, **names):
    common = dict(
      d_model=self.d_model,
      layer_idx=self.layer_idx,
      num_layers=self.num_layers,
      num_heads=self.num_heads,
      causal=self.causal,
      rope=self.rope,
      segment=self.segment,
      implementation=self.implementation,
      dtype=self.dtype,
    )
    return Attention(**common, **names.get("swe", {})), CrossSegmentAttention(
      **common, **names.get("cse", {})
    )

  def setup(self):
    if self.segment < 1:
      raise ValueError(f"hat needs segment >= 1, got {self.segment}")
    self.swe, self.cse = self._halves(swe={"name": "swe"}, cse={"name": "cse"})

  def state_size(self, seq_len: int) -> int:
    """Bytes at float32: the segment-wise KV cache and the cross-segment KV cache."""
    swe, cse = self._halves(swe={"parent": None}, cse={"parent": None})  # unbound copies
    return swe.state_size(seq_len) + cse.state_size(seq_len)

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    local = self.swe(x, positions=positions, segment_ids=segment_ids, decode=decode)
    h = x + local.astype(x.dtype)
    return local + self.cse(h, positions=positions, segment_ids=segment_ids, decode=decode)
