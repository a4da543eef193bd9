"""Native Sparse Attention mixer (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention"): grouped-query attention through three branches
(compressed blocks, top-n selected blocks shared by each GQA group, a sliding window) combined
by per-head sigmoid gates; the math is attnzoo.ops.nsa.

As in the paper each branch has its own keys and values (k, v project to [3, Hkv, head_dim]:
cmp, slc, win), and the compression phi is an MLP over a block's tokens plus a learned
intra-block position embedding (fla's implementation mean-pools and shares one K/V set). The
gates are a bias-free projection to [H, 3] through a sigmoid (fla's g_proj). RoPE (on by
default) rotates q and every branch's keys at their token positions before compression.
Defaults are the paper's block sizes: l=32, d=16, l'=64, n=16, w=512 (1 initial + 2 local
blocks always selected). The width of phi's hidden layer is not given in the paper: 4 x
head_dim here.

Decoding keeps, per example, in the "cache" collection: the selection branch's keys and values
for the whole context (any block may be selected; slot = position), a ring of the last
`window` window-branch keys/values, a ring of the last l raw compression-branch keys/values
(to compress each block as it completes) and the compressed keys/values of every complete
block; `state_size` counts exactly these.

SSA training (attnzoo.ops.ssa; Shen et al. 2025): with ssa_alpha > 0 (the official code's
10), each training forward (a "dropout" rng given) also runs the full-attention stream (the
selection branch attending to every earlier token), sows alpha / num_layers x the
bidirectional alignment of the two outputs into the "losses" collection (the trainer adds it:
the mean over layers, as the official code), and returns the full or the sparse output with
probability 1/2. Deviations: the mode is drawn per layer (the official code draws one per
step for all layers), and the compression and window branches, shared by both streams, stay
in (the official SSA model runs the selection branch alone); their terms cancel in the
alignment's gradient. Evaluation and decoding are sparse.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers.layers import (
  default_positions,
  gather_by_position,
  no_decode_segments,
  ring_write,
  state_bytes,
)
from attnzoo.mixers.registry import dense_init, head_output, per_head, register
from attnzoo.ops import nsa as nsa_ops
from attnzoo.ops import softmax_attention
from attnzoo.ops import ssa as ssa_ops
from attnzoo.ops.rotary import apply_rope
from attnzoo.ops.segments import EMPTY

F32 = jnp.float32


class _Affine(nn.Module):
  """The (kernel [*in_shape, out], bias [out]) of one layer of phi."""

  in_shape: tuple[int, ...]
  out: int

  @nn.compact
  def __call__(self) -> tuple[jax.Array, jax.Array]:
    kernel = self.param("kernel", dense_init, self.in_shape + (self.out,), F32)
    return kernel, self.param("bias", nn.initializers.zeros, (self.out,), F32)


class _Compressor(nn.Module):
  """The parameters of phi for one branch (keys or values), as an ops.nsa.Compression."""

  block: int
  hidden: int

  @nn.compact
  def __call__(self, dim: int) -> nsa_ops.Compression:
    pos = self.param("pos_embedding", dense_init, (self.block, dim), F32)
    w1, b1 = _Affine((self.block, dim), self.hidden, name="fc1")()
    w2, b2 = _Affine((self.hidden,), dim, name="fc2")()
    return nsa_ops.Compression(pos, w1, b1, w2, b2)


@register("nsa")
class NSA(nn.Module):
  """Native Sparse Attention; num_kv_heads < num_heads gives GQA (the selection is shared by
  the query heads of a kv head)."""

  d_model: int
  layer_idx: int = 0
  num_layers: int = 1
  num_heads: int = 4
  num_kv_heads: int | None = None
  block_cmp: int = 32
  stride: int = 16
  block_slc: int = 64
  num_selected: int = 16
  window: int = 512
  num_initial: int = 1
  num_local: int = 2
  compress_hidden: int | None = None
  ssa_alpha: float = 0.0
  rope: bool = True
  rope_base: float = 10000.0
  implementation: str = "auto"
  dtype: Any = jnp.float32

  bidirectional: ClassVar[bool] = False

  def _dims(self):
    head_dim = per_head(self.d_model, self.num_heads)
    kv_heads = self.num_kv_heads or self.num_heads
    if self.num_heads % kv_heads:
      raise ValueError(f"num_kv_heads ({kv_heads}) must divide num_heads ({self.num_heads})")
    return self.num_heads, kv_heads, head_dim

  def _config(self) -> nsa_ops.Config:
    """The op's block sizes, from the fields of the same names."""
    names = [f.name for f in dataclasses.fields(nsa_ops.Config)]
    return nsa_ops.Config(**{name: getattr(self, name) for name in names})

  def state_size(self, seq_len: int) -> int:
    """Decoding bytes at float32 for a context of seq_len tokens (module docstring)."""
    _, kv_heads, head_dim = self._dims()
    cfg = self._config()
    tokens = seq_len + min(seq_len, cfg.window) + min(seq_len, cfg.block_cmp)
    tokens += nsa_ops.num_compressed(seq_len, cfg)
    return 2 * state_bytes((tokens, kv_heads, head_dim))

  def setup(self):
    heads, kv_heads, head_dim = self._dims()
    self._config()  # validates the block sizes
    if self.ssa_alpha < 0:
      raise ValueError(f"nsa: ssa_alpha must be >= 0, got {self.ssa_alpha}")
    dense = lambda shape: nn.DenseGeneral(
      shape, dtype=self.dtype, use_bias=False, kernel_init=dense_init
    )
    self.q = dense((heads, head_dim))
    self.k, self.v = dense((3, kv_heads, head_dim)), dense((3, kv_heads, head_dim))
    self.gate = dense((heads, 3))
    hidden = self.compress_hidden or 4 * head_dim
    self.compress_k = _Compressor(self.block_cmp, hidden)
    self.compress_v = _Compressor(self.block_cmp, hidden)
    self.out = head_output(self.d_model, self.num_layers, self.dtype)

  def _project(self, x, positions):
    q, k, v = self.q(x), self.k(x), self.v(x)
    if self.rope:
      q = apply_rope(q, positions, base=self.rope_base)
      rotate = lambda k: apply_rope(k, positions, base=self.rope_base)
      k = jnp.stack([rotate(k[:, :, i]) for i in range(3)], axis=2)
    gates = jax.nn.sigmoid(self.gate(x).astype(F32))
    branches = lambda a: tuple(a[:, :, i] for i in range(3))
    return q, branches(k), branches(v), gates

  def __call__(
    self,
    x: jax.Array,
    *,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    decode: bool = False,
  ) -> jax.Array:
    if segment_ids is not None:
      raise ValueError("nsa does not take segment_ids (packed documents)")
    positions = default_positions(x, positions)
    q, k, v, gates = self._project(x, positions)
    head_dim = q.shape[-1]
    ck, cv = self.compress_k(head_dim), self.compress_v(head_dim)
    if decode:
      no_decode_segments(segment_ids)
      return self.out(self._decode(q, k, v, gates, positions, ck, cv))
    run = functools.partial(
      nsa_ops.nsa,
      q,
      k,
      v,
      gates,
      compress_k=ck,
      compress_v=cv,
      scale=head_dim**-0.5,
      config=self._config(),
      implementation=self.implementation,
    )
    o = run()
    if self.ssa_alpha and self.has_rng("dropout"):  # training with SSA
      o_full = run(dense_selection=True)
      loss = ssa_ops.alignment_loss(o, o_full) * (self.ssa_alpha / self.num_layers)
      self.sow("losses", "ssa_alignment", loss)
      o = jnp.where(jax.random.bernoulli(self.make_rng("dropout")), o_full, o)
    return self.out(o)

  @nn.compact
  def _decode(self, q, k, v, gates, positions, ck, cv):
    (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win) = k, v
    batch, steps, _, head_dim = q.shape
    kv_heads = k_slc.shape[2]
    cfg = self._config()
    initialized = self.has_variable("cache", "slc_keys")
    # The cache is sized by `model.init(..., decode=True)` on an input of the longest context.
    kv = lambda name, n: self.variable(
      "cache", name, jnp.zeros, (batch, n, kv_heads, head_dim), k_slc.dtype
    )
    slots = lambda name, n: self.variable("cache", name, jnp.full, (batch, n), EMPTY)
    n_cmp, n_win = min(cfg.block_cmp, steps), min(cfg.window, steps)
    nc = nsa_ops.num_compressed(steps, cfg)
    caches = dict(
      slc=(kv("slc_keys", steps), kv("slc_values", steps)),
      win=(kv("win_keys", n_win), kv("win_values", n_win), slots("win_positions", n_win)),
      raw=(kv("raw_keys", n_cmp), kv("raw_values", n_cmp), slots("raw_positions", n_cmp)),
      cmp=(kv("cmp_keys", nc), kv("cmp_values", nc)),
    )
    if not initialized:
      return nsa_ops.nsa(
        q,
        k,
        v,
        gates,
        compress_k=ck,
        compress_v=cv,
        scale=head_dim**-0.5,
        config=cfg,
        implementation=self.implementation,
      )
    scale = head_dim**-0.5
    rows = jnp.arange(batch)[:, None]
    # selection branch: the whole context at slot = position
    slc_k, slc_v = caches["slc"]
    slc_k.value = slc_k.value.at[rows, positions].set(k_slc.astype(slc_k.value.dtype))
    slc_v.value = slc_v.value.at[rows, positions].set(v_slc.astype(slc_v.value.dtype))
    # window branch: a ring of the last `window` tokens
    win = caches["win"]
    o_win = self._ring_attention(win, k_win, v_win, q, positions, scale, (cfg.window - 1, 0))
    # compression branch: complete the blocks that end among the new tokens, then attend
    o_cmp, scores = self._compressed(caches, q, k_cmp, v_cmp, positions, ck, cv, scale, cfg)
    ns = -(-slc_k.value.shape[1] // cfg.block_slc)
    if scores is None:
      scores = jnp.zeros((batch, steps, kv_heads, ns), F32)
    indices = nsa_ops.select_blocks(scores, positions, cfg)
    o_slc, _ = nsa_ops.selected_attention(
      q,
      slc_k.value,
      slc_v.value,
      indices,
      scale=scale,
      block=cfg.block_slc,
      q_positions=positions,
      implementation=self.implementation,
    )
    return nsa_ops.combine(gates, o_cmp, o_slc, o_win)

  def _ring_attention(self, ring, k, v, q, positions, scale, window):
    ring_k, ring_v, ring_pos = ring
    cat = lambda a, b: jnp.concatenate([a.value, b.astype(a.value.dtype)], axis=1)
    o = softmax_attention(
      q,
      cat(ring_k, k),
      cat(ring_v, v),
      scale=scale,
      causal=True,
      window=window,
      q_positions=positions,
      kv_positions=jnp.concatenate([ring_pos.value, positions], axis=1),
      implementation=self.implementation,
    )
    ring_write(ring, (k, v), positions)
    return o

  def _compressed(self, caches, q, k_cmp, v_cmp, positions, ck, cv, scale, cfg):
    """(o_cmp, selection scores or None) of new tokens; completes and stores new blocks."""
    cmp_k, cmp_v = caches["cmp"]
    raw = caches["raw"]
    batch, steps = positions.shape
    nc = cmp_k.value.shape[1]
    if nc == 0:
      ring_write(raw, (k_cmp, v_cmp), positions)
      return jnp.zeros(q.shape[:3] + (v_cmp.shape[-1],), v_cmp.dtype), None
    l, d = cfg.block_cmp, cfg.stride
    # candidate blocks: those whose last position falls among the new tokens
    first = jnp.maximum(0, -(-(positions[:, 0] - l + 1) // d))  # [B]
    cand = first[:, None] + np.arange(-(-steps // d))  # [B, M]
    valid = (cand * d + l - 1 <= positions[:, -1:]) & (cand < nc)
    # each candidate's l tokens from the raw ring and the new tokens, matched by position
    raw_k, raw_v, raw_pos = raw
    pool = lambda ring, new: jnp.concatenate([ring.value, new.astype(ring.value.dtype)], axis=1)
    want = cand[..., None] * d + np.arange(l)  # [B, M, l]
    (win_k, win_v), _ = gather_by_position(
      [pool(raw_k, k_cmp), pool(raw_v, v_cmp)], pool(raw_pos, positions), want
    )
    new_k = nsa_ops.compress_windows(win_k, ck)  # [B, M, Hkv, D]
    new_v = nsa_ops.compress_windows(win_v, cv)
    rows = jnp.arange(batch)[:, None]
    target = jnp.where(valid, cand, nc)  # invalid candidates are dropped
    cmp_k.value = cmp_k.value.at[rows, target].set(new_k.astype(cmp_k.value.dtype), mode="drop")
    cmp_v.value = cmp_v.value.at[rows, target].set(new_v.astype(cmp_v.value.dtype), mode="drop")
    ring_write(raw, (k_cmp, v_cmp), positions)
    ends = jnp.broadcast_to(jnp.asarray(nsa_ops.compressed_ends(nc, cfg)), (batch, nc))
    o, lse = softmax_attention(
      q,
      cmp_k.value,
      cmp_v.value,
      scale=scale,
      causal=True,
      q_positions=positions,
      kv_positions=ends,
      return_lse=True,
      implementation=self.implementation,
    )
    ns = -(-caches["slc"][0].value.shape[1] // cfg.block_slc)
    scores = nsa_ops.selection_scores(
      q,
      cmp_k.value,
      lse,
      positions,
      ends,
      scale=scale,
      ns=ns,
      config=cfg,
      implementation=self.implementation,
    )
    return o, scores
