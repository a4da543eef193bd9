"""Native Sparse Attention (Yuan et al. 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention"), layout BTHD, grouped-query heads.

Each query t (position p_t) attends through three branches, combined by per-head gates
g in (0, 1) (sigmoid outputs the mixer computes): o_t = g_cmp o_cmp + g_slc o_slc + g_win o_win.
- compression: keys/values of blocks of `block_cmp` (l) tokens every `stride` (d) tokens,
  each compressed by an MLP phi with intra-block position embeddings (`Compression`, the
  mixer's parameters; the paper's phi; fla's code uses mean pooling instead). Block i covers
  positions [i d, i d + l) and is visible once complete (its last position <= p_t).
- selection: blocks of `block_slc` (l') raw tokens, ranked by the compression branch's
  attention probabilities mapped onto them (paper eq. 9: each compressed block counts for the
  selection blocks it overlaps, weighted by the stride units they share: 1,2,2,2,1 for
  l=32, d=16, l'=64), summed over the query heads of a GQA group (one block set per group,
  eq. 10), and the top-n taken per (token, group), always including the `num_initial` first
  blocks and the `num_local` blocks ending at the query's own (the paper's 1 initial + 2
  local); causal inside the blocks. When fewer than n blocks start at or before p_t, all of
  them are taken. Indices are [B,T,Hkv,n] int32 ascending, -1 for unused slots.
- sliding window: the last `window` tokens (w), itself included.
The paper gives each branch its own keys and values; k and v may be one array (shared) or a
tuple (cmp, slc, win). The selection takes no gradient (top-k), as in the paper.

`reference` is the float32 ground truth (every branch materialised); `nsa(...,
implementation)` runs the compressed and window branches through `softmax_attention` (the
flash kernel takes the compressed keys at their block-end positions), the block importance
through `selection_scores` (reusing the compressed branch's lse; "xla": query chunks, "pallas"
/ "interpret": a forward-only kernel) and the selection branch through `selected_attention`,
whose "pallas" / "interpret" implementation is the Pallas kernel of pallas_kernels.nsa and
"xla" its pure-jnp twin (one gathered block per (token, group) at a time); the reference
gathers all n blocks at once ([B,T,Hkv,n l',D] memory).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.softmax_attention import reference as attention_reference
from attnzoo.ops.softmax_attention import softmax_attention

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Config:
  """NSA's block sizes; defaults are the paper's (l=32, d=16, l'=64, n=16, w=512)."""

  block_cmp: int = 32
  stride: int = 16
  block_slc: int = 64
  num_selected: int = 16
  window: int = 512
  num_initial: int = 1
  num_local: int = 2

  def __post_init__(self):
    for name in ("block_cmp", "stride", "block_slc", "num_selected", "window"):
      if getattr(self, name) < 1:
        raise ValueError(f"nsa: {name} must be >= 1, got {getattr(self, name)}")
    if self.block_cmp % self.stride or self.block_slc % self.stride:
      raise ValueError(
        f"nsa: stride ({self.stride}) must divide block_cmp ({self.block_cmp}) and "
        f"block_slc ({self.block_slc})"
      )
    if self.num_initial < 0 or self.num_local < 0:
      raise ValueError("nsa: num_initial and num_local must be >= 0")


class Compression(NamedTuple):
  """phi of one branch (keys or values): x_block [l, D] -> w2 silu((x_block + pos) . w1 + b1)
  + b2; shared by the kv heads."""

  pos: jax.Array  # [l, D] intra-block position embedding
  w1: jax.Array  # [l, D, hidden]
  b1: jax.Array  # [hidden]
  w2: jax.Array  # [hidden, D_out]
  b2: jax.Array  # [D_out]


# ----------------------------------------------------------------------------- compression


def num_compressed(t: int, config: Config) -> int:
  """Complete compressed blocks in t tokens."""
  return 0 if t < config.block_cmp else (t - config.block_cmp) // config.stride + 1


def compressed_ends(nc: int, config: Config) -> np.ndarray:
  """int32 [nc]: the position of each compressed block's last token (when it turns visible)."""
  return (np.arange(nc) * config.stride + config.block_cmp - 1).astype(np.int32)


def compress_windows(windows: jax.Array, params: Compression) -> jax.Array:
  """phi of token windows [B, M, l, Hkv, D] -> [B, M, Hkv, D_out] (float32 accumulation)."""
  dtype = windows.dtype
  x = windows + params.pos[:, None, :].astype(dtype)
  h = jnp.einsum("bmlgd,ldh->bmgh", x, params.w1.astype(dtype), preferred_element_type=F32)
  h = jax.nn.silu(h + params.b1.astype(F32)).astype(dtype)
  out = jnp.einsum("bmgh,he->bmge", h, params.w2.astype(dtype), preferred_element_type=F32)
  return (out + params.b2.astype(F32)).astype(dtype)


def compress(x: jax.Array, params: Compression, config: Config) -> jax.Array:
  """x [B,T,Hkv,D] -> the compressed blocks [B, num_compressed(T), Hkv, D_out]."""
  nc = num_compressed(x.shape[1], config)
  starts = np.arange(nc) * config.stride
  windows = x[:, starts[:, None] + np.arange(config.block_cmp)]  # [B, nc, l, Hkv, D]
  return compress_windows(windows, params)


# ----------------------------------------------------------------------------- selection


def overlap(nc: int, ns: int, config: Config) -> np.ndarray:
  """float32 [nc, ns]: stride units compressed block i shares with selection block j."""
  units_c = np.arange(nc)[:, None] + np.arange(config.block_cmp // config.stride)  # [nc, l/d]
  per = config.block_slc // config.stride
  j = units_c // per  # the selection block of each unit
  out = np.zeros((nc, ns), np.float32)
  for c in range(j.shape[1]):
    keep = j[:, c] < ns
    np.add.at(out, (np.arange(nc)[keep], j[keep, c]), 1.0)
  return out


def block_importance(probs: jax.Array, kv_heads: int, ns: int, config: Config) -> jax.Array:
  """Compressed attention probabilities [B,T,H,nc] -> selection scores [B,T,Hkv,ns] (mapped
  onto selection blocks, summed over each group's query heads)."""
  batch, t, heads, nc = probs.shape
  grouped = probs.reshape(batch, t, kv_heads, heads // kv_heads, nc).sum(3)
  return jnp.einsum("btgc,cs->btgs", grouped, jnp.asarray(overlap(nc, ns, config)))


# "auto" takes the jnp form on GPU too: the scores kernel did not lower with Triton on the H200
# (jax 0.11.2, 2026-12-03: "Operand 0 of operation scf.yield must be a Value"); "pallas" stays
# selectable and its interpret-mode test runs.
scores_dispatcher = Dispatcher("nsa_selection_scores", auto_order={"default": ("xla",)})


def selection_scores(
  q: jax.Array,
  k_cmp: jax.Array,
  lse_cmp: jax.Array,
  q_positions: jax.Array,
  cmp_positions: jax.Array,
  *,
  scale,
  ns: int,
  config: Config,
  implementation: str = "auto",
) -> jax.Array:
  """Selection scores [B,T,Hkv,ns] float32 from the compressed branch: its keys k_cmp
  [B,nc,Hkv,D] (block i at slot i, visible from cmp_positions [B,nc], its last position) and
  its lse [B,T,H] (p = exp(s - lse): no second normalisation pass). No gradient flows through
  it. implementation: "auto" | "xla" (chunks of queries, no [T, nc] buffer beyond one chunk)
  | "pallas" | "interpret" (the kernel of pallas_kernels.nsa)."""
  args = dict(
    q=lax.stop_gradient(q),
    k_cmp=lax.stop_gradient(k_cmp),
    lse_cmp=lax.stop_gradient(lse_cmp),
    q_positions=q_positions,
    cmp_positions=cmp_positions,
    scale=scale,
    ns=ns,
    config=config,
  )
  if k_cmp.shape[1] == 0:
    return jnp.zeros((q.shape[0], q.shape[1], k_cmp.shape[2], ns), F32)
  return scores_dispatcher(implementation, **args)


@scores_dispatcher.register("xla")
def _scores_xla(*, q, k_cmp, lse_cmp, q_positions, cmp_positions, scale, ns, config, chunk=512):
  batch, t, heads, d = q.shape
  kv_heads = k_cmp.shape[2]
  c = min(chunk, t)
  n = -(-t // c)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, n * c - t)) + ((0, 0),) * (a.ndim - 2))
  split = lambda a: jnp.moveaxis(pad(a).reshape(batch, n, c, *a.shape[2:]), 1, 0)
  kg = jnp.repeat(k_cmp, heads // kv_heads, axis=2)

  def one(xs):
    qc, lse, pos = xs
    s = jnp.einsum("bqhd,bkhd->bqhk", qc, kg, preferred_element_type=F32) * scale
    vis = (cmp_positions[:, None, None, :] <= pos[:, :, None, None]) & jnp.isfinite(lse)[..., None]
    p = jnp.where(vis, jnp.exp(s - jnp.where(vis, lse[..., None], 0.0)), 0.0)
    return block_importance(p, kv_heads, ns, config)

  out = lax.map(one, (split(q), split(lse_cmp), split(q_positions)))
  return jnp.moveaxis(out, 0, 1).reshape(batch, n * c, kv_heads, ns)[:, :t]


def _scores_kernel_supports(*, config, on_device, **_):
  backend = jax.default_backend()
  if on_device and backend != "gpu":
    return f"the NSA kernels lower for GPU only (backend {backend!r}); use 'interpret' on CPU"
  per = config.block_slc // config.stride
  if per & (per - 1):
    return f"the scores kernel needs block_slc / stride a power of two, got {per}"
  return None


def _scores_kernel(*, q, k_cmp, lse_cmp, q_positions, cmp_positions, scale, ns, config, interpret):
  from pallas_kernels.nsa import selection_scores as kernel

  del cmp_positions  # the kernel computes them from the block sizes (block i at slot i)
  return kernel(
    q,
    k_cmp.astype(q.dtype),
    lse_cmp,
    q_positions,
    scale=scale,
    block_cmp=config.block_cmp,
    stride=config.stride,
    block_slc=config.block_slc,
    ns=ns,
    interpret=interpret,
  )


scores_dispatcher.register_kernel(
  _scores_kernel,
  lambda interpret, **a: _scores_kernel_supports(**a, on_device=not interpret),
  "the NSA scores kernel",
)


def select_blocks(scores: jax.Array, q_positions: jax.Array, config: Config) -> jax.Array:
  """Top-n selection blocks per (token, group): scores [B,T,Hkv,ns], q_positions [B,T] ->
  int32 [B,T,Hkv,n] ascending, -1 for unused slots (fewer than n blocks available)."""
  ns = scores.shape[-1]
  n = config.num_selected
  j = jnp.arange(ns)
  current = (q_positions // config.block_slc)[:, :, None, None]
  available = j <= current
  forced = (j < config.num_initial) | (j > current - config.num_local)
  s = jnp.where(forced, jnp.inf, lax.stop_gradient(scores).astype(F32))
  s = jnp.where(available, s, -jnp.inf)
  values, idx = lax.top_k(s, min(n, ns))
  big = jnp.iinfo(jnp.int32).max
  idx = jnp.sort(jnp.where(values == -jnp.inf, big, idx.astype(jnp.int32)), axis=-1)
  idx = jnp.where(idx == big, -1, idx)
  if ns < n:
    idx = jnp.pad(idx, ((0, 0),) * 3 + ((0, n - ns),), constant_values=-1)
  return idx


# ----------------------------------------------------------------------------- selected attention

dispatcher = Dispatcher(
  "nsa_selected_attention",
  auto_order={"gpu": ("pallas", "xla"), "default": ("xla",)},
)


def _selected_jnp(q, k, v, indices, q_positions, *, scale, block, compute_dtype):
  """Attention of each (token, group) over the tokens of its selected blocks (a gather)."""
  batch, t, heads, d = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  nb = -(-tk // block)
  pad = lambda a: jnp.pad(a, ((0, 0), (0, nb * block - tk), (0, 0), (0, 0)))
  kb = pad(k).reshape(batch, nb, block, kv_heads, d)
  vb = pad(v).reshape(batch, nb, block, kv_heads, v.shape[-1])
  safe = jnp.maximum(indices, 0)
  rows = jnp.arange(batch)[:, None, None, None]
  heads_ = jnp.arange(kv_heads)[None, None, :, None]
  ks = kb[rows, safe, :, heads_].astype(compute_dtype)  # [B,T,Hkv,n,block,D]
  vs = vb[rows, safe, :, heads_].astype(compute_dtype)
  kpos = safe[..., None] * block + jnp.arange(block)
  vis = (indices >= 0)[..., None] & (kpos <= q_positions[:, :, None, None, None]) & (kpos < tk)
  qg = q.astype(compute_dtype).reshape(batch, t, kv_heads, groups, d)
  s = jnp.einsum("btgzd,btgnkd->btgznk", qg, ks, preferred_element_type=F32) * scale
  s = jnp.where(vis[:, :, :, None], s, -jnp.inf)
  m = jnp.max(s, axis=(-2, -1), keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  w = jnp.exp(s - m)
  den = jnp.sum(w, axis=(-2, -1), keepdims=True)
  p = (w / jnp.where(den > 0, den, 1.0)).astype(compute_dtype)
  o = jnp.einsum("btgznk,btgnke->btgze", p, vs, preferred_element_type=F32)
  lse = (jnp.log(den) + m)[..., 0, 0]  # -inf where nothing is visible
  return o.reshape(batch, t, heads, -1).astype(v.dtype), lse.reshape(batch, t, heads)


@dispatcher.register("xla")
def _xla(*, q, k, v, indices, q_positions, scale, block):
  """The kernel's algorithm in pure jnp (one selected block per step, online softmax)."""
  from pallas_kernels.nsa import chunked

  return chunked(q, k, v, indices, q_positions=q_positions, scale=scale, block=block)


def _kernel_supports(*, q, k, v, indices, q_positions, scale, block, on_device):
  from pallas_kernels.nsa import reason

  return reason(q, k, v, indices, block=block, on_device=on_device)


def _kernel(*, q, k, v, indices, q_positions, scale, block, interpret):
  from pallas_kernels.nsa import selected_attention as kernel

  return kernel(
    q, k, v, indices, q_positions=q_positions, scale=scale, block=block, interpret=interpret
  )


dispatcher.register_kernel(
  _kernel,
  lambda interpret, **a: _kernel_supports(**a, on_device=not interpret),
  "the NSA selection kernels",
)


def selected_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  indices: jax.Array,
  *,
  scale: float,
  block: int,
  q_positions: jax.Array | None = None,
  implementation: str = "auto",
) -> tuple[jax.Array, jax.Array]:
  """NSA's selection branch: q[B,T,H,D] attends, per GQA group, to the keys of its selected
  blocks (indices [B,T,Hkv,n], -1 unused; block j = kv slots [j block, (j+1) block)) at
  positions <= q_positions (default arange(T); the kv slot index is the key's position).
  Returns o[B,T,H,Dv] and lse[B,T,H] float32 (-inf where nothing is visible, o = 0 there).
  implementation: "auto" | "xla" | "pallas" | "interpret"."""
  batch, t, heads, _ = q.shape
  if heads % k.shape[2] or indices.shape[:3] != (batch, t, k.shape[2]):
    raise ValueError(
      f"selected_attention: q{q.shape} k{k.shape} indices{indices.shape} do not fit "
      "(indices are [B, T, kv heads, n])"
    )
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  args = dict(
    q=q,
    k=k,
    v=v,
    indices=indices.astype(jnp.int32),
    q_positions=q_positions,
    scale=scale,
    block=block,
  )
  return dispatcher(implementation, **args)


def selected_reference(q, k, v, indices, *, scale, block, q_positions=None):
  """The float32 ground truth of `selected_attention` (the gather form)."""
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(q.shape[1], dtype=jnp.int32), q.shape[:2])
  f32 = lambda a: a.astype(F32)
  return _selected_jnp(
    f32(q), f32(k), f32(v), indices, q_positions, scale=scale, block=block, compute_dtype=F32
  )


# ----------------------------------------------------------------------------- the three branches


def _branches(x):
  if isinstance(x, (tuple, list)):
    if len(x) != 3:
      raise ValueError("nsa: give one array or a (cmp, slc, win) tuple of three")
    return tuple(x)
  return (x, x, x)


def _attention_implementation(implementation):
  return {"interpret": "interpret", "pallas": "pallas", "xla": "xla"}.get(implementation, "auto")


def nsa(
  q: jax.Array,
  k: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
  v: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
  gates: jax.Array,
  *,
  compress_k: Compression,
  compress_v: Compression,
  scale: float,
  config: Config = Config(),
  implementation: str = "auto",
  return_indices: bool = False,
  dense_selection: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """NSA (module docstring) of q[B,T,H,D], k/v [B,T,Hkv,D] (or (cmp, slc, win) tuples) with
  gates [B,T,H,3] in (0,1) (order cmp, slc, win) -> o[B,T,H,Dv] (and the selected block
  indices [B,T,Hkv,n] when return_indices). implementation: "auto" | "xla" | "pallas" |
  "interpret" for the selection branch; the other branches use softmax_attention with the
  same name ("auto" otherwise). dense_selection: the selection branch attends causally to
  every token instead of the selected blocks (the full-attention stream of SSA)."""
  (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win) = _branches(k), _branches(v)
  batch, t, heads, _ = q.shape
  attn = _attention_implementation(implementation)
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  kc, vc = compress(k_cmp, compress_k, config), compress(v_cmp, compress_v, config)
  nc = kc.shape[1]
  ns = -(-t // config.block_slc)
  if nc:
    ends = jnp.broadcast_to(jnp.asarray(compressed_ends(nc, config)), (batch, nc))
    o_cmp, lse_cmp = softmax_attention(
      q,
      kc,
      vc,
      scale=scale,
      causal=True,
      q_positions=positions,
      kv_positions=ends,
      return_lse=True,
      implementation=attn,
    )
    scores = selection_scores(
      q, kc, lse_cmp, positions, ends, scale=scale, ns=ns, config=config, implementation=attn
    )
  else:
    o_cmp = jnp.zeros(q.shape[:3] + (v_cmp.shape[-1],), v_cmp.dtype)
    scores = jnp.zeros((batch, t, k_slc.shape[2], ns), F32)
  indices = select_blocks(scores, positions, config)
  if dense_selection:
    o_slc = softmax_attention(q, k_slc, v_slc, scale=scale, causal=True, implementation=attn)
  else:
    o_slc, _ = selected_attention(
      q, k_slc, v_slc, indices, scale=scale, block=config.block_slc, implementation=implementation
    )
  o_win = softmax_attention(
    q, k_win, v_win, scale=scale, causal=True, window=(config.window - 1, 0), implementation=attn
  )
  o = combine(gates, o_cmp, o_slc, o_win)
  return (o, indices) if return_indices else o


def combine(gates: jax.Array, o_cmp: jax.Array, o_slc: jax.Array, o_win: jax.Array) -> jax.Array:
  """sum_c g_c o_c with gates [B,T,H,3] (cmp, slc, win), in float32."""
  g = gates.astype(F32)[..., None]
  o = g[..., 0, :] * o_cmp.astype(F32) + g[..., 1, :] * o_slc.astype(F32)
  return (o + g[..., 2, :] * o_win.astype(F32)).astype(o_win.dtype)


def reference(
  q: jax.Array,
  k: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
  v: jax.Array | tuple[jax.Array, jax.Array, jax.Array],
  gates: jax.Array,
  *,
  compress_k: Compression,
  compress_v: Compression,
  scale: float,
  config: Config = Config(),
  return_indices: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The float32 ground truth of `nsa`: compressed probabilities normalised directly (no lse
  reuse), every branch materialised."""
  f32 = lambda x: tuple(a.astype(F32) for a in _branches(x))
  (k_cmp, k_slc, k_win), (v_cmp, v_slc, v_win) = f32(k), f32(v)
  q = q.astype(F32)
  batch, t, heads, _ = q.shape
  kv_heads = k_slc.shape[2]
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  kc, vc = compress(k_cmp, compress_k, config), compress(v_cmp, compress_v, config)
  nc = kc.shape[1]
  ns = -(-t // config.block_slc)
  ends = jnp.broadcast_to(jnp.asarray(compressed_ends(nc, config)), (batch, nc))
  # compressed attention probabilities [B,T,H,nc] (0 on rows that see no compressed block)
  logits = jnp.einsum("bqhd,bkhd->bqhk", q, jnp.repeat(kc, heads // kv_heads, axis=2)) * scale
  vis = ends[:, None, None, :] <= positions[:, :, None, None]
  probs = jnp.where(vis, jax.nn.softmax(jnp.where(vis, logits, -1e30), axis=-1), 0.0)
  o_cmp = jnp.einsum("bqhk,bkhe->bqhe", probs, jnp.repeat(vc, heads // kv_heads, axis=2))
  indices = select_blocks(block_importance(probs, kv_heads, ns, config), positions, config)
  o_slc, _ = selected_reference(q, k_slc, v_slc, indices, scale=scale, block=config.block_slc)
  o_win = attention_reference(
    q, k_win, v_win, scale=scale, causal=True, window=(config.window - 1, 0)
  )
  o = combine(gates, o_cmp, o_slc, o_win)
  return (o, indices) if return_indices else o
