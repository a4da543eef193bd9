"""Softmax attention (Vaswani et al. 2017), layout BTHD, with every mask the zoo needs.

softmax_attention(q[B,Tq,H,D], k[B,Tk,Hkv,D], v[B,Tk,Hkv,Dv], *, scale, ...) -> o[B,Tq,H,Dv]

Masks are defined on token positions (default `arange`): `causal` keeps kv_pos <= q_pos;
`window=(left, right)` keeps q_pos - left <= kv_pos <= q_pos + right (an int w means (w, 0));
`segment_ids` keep pairs in the same segment (packed documents); `block_mask[b, i, j]` with
`block_mask_size=(bq, bk)` keeps queries [i*bq, (i+1)*bq) x keys [j*bk, (j+1)*bk) (a
block-sparse map, batch axis 1 or B, ceil(Tq/bq) x ceil(Tk/bk) blocks, over time indices).
All masks combine with AND. `scale` is a number or a per-head array [H] (a temperature).
`dropout_rate` with a `dropout_rng` drops attention probabilities (kept ones scaled by
1 / (1 - rate)); without an rng, or at rate 0, the op is deterministic. Only "xla" serves it.
Decoding passes explicit
`q_positions` / `kv_positions` for a KV cache; empty cache slots carry position `EMPTY`,
which every causal or windowed query masks out. Rows with no visible key return 0 (lse -inf).
Grouped-query / multi-query: Hkv divides H; query head h reads kv head h // (H // Hkv).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.ops import context_parallel
from attnzoo.ops.dispatch import Dispatcher
from attnzoo.ops.segments import EMPTY

dispatcher = Dispatcher(
  "softmax_attention",
  auto_order={
    "gpu": ("cudnn", "pallas", "xla"),
    "tpu": ("pallas", "xla"),
    "default": ("xla",),
  },
)


def normalize_window(window):
  if window is None:
    return None
  if isinstance(window, int):
    window = (window, 0)
  left, right = window
  if left < 0 or right < 0:
    raise ValueError(f"window widths must be >= 0, got {window}")
  return int(left), int(right)


def attention_mask(
  q_positions,
  kv_positions,
  *,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  block_mask=None,
  block_mask_size=None,
):
  """Boolean mask [B, 1, Tq, Tk]: True where query may attend to key."""
  qp = q_positions[:, None, :, None]
  kp = kv_positions[:, None, None, :]
  mask = kp != EMPTY
  if causal:
    mask &= kp <= qp
  if window is not None:
    left, right = window
    mask &= (kp >= qp - left) & (kp <= qp + right)
  if segment_ids is not None:
    mask &= segment_ids[:, None, :, None] == kv_segment_ids[:, None, None, :]
  if block_mask is not None:
    bq, bk = block_mask_size
    rows = jnp.arange(q_positions.shape[1]) // bq
    cols = jnp.arange(kv_positions.shape[1]) // bk
    mask &= jnp.asarray(block_mask, bool)[:, rows][:, :, cols][:, None]
  return mask


def _attention_jnp(
  q,
  k,
  v,
  *,
  scale,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  softcap,
  bias,
  return_lse,
  compute_dtype,
  block_mask=None,
  block_mask_size=None,
  dropout_rate=0.0,
  dropout_rng=None,
):
  batch, tq, heads, _ = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  q = q.astype(compute_dtype).reshape(batch, tq, kv_heads, groups, q.shape[-1])
  logits = jnp.einsum(
    "bqhgd,bkhd->bhgqk", q, k.astype(compute_dtype), preferred_element_type=jnp.float32
  )
  logits = logits.reshape(batch, heads, tq, tk) * jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = attention_mask(
    q_positions,
    kv_positions,
    causal=causal,
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    block_mask=block_mask,
    block_mask_size=block_mask_size,
  )
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denominator > 0, denominator, 1.0)
  if dropout_rng is not None:
    keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, probs.shape)
    probs = jnp.where(keep, probs / (1.0 - dropout_rate), 0.0)
  probs = probs.reshape(batch, kv_heads, groups, tq, tk).astype(compute_dtype)
  out = jnp.einsum(
    "bhgqk,bkhd->bqhgd", probs, v.astype(compute_dtype), preferred_element_type=jnp.float32
  )
  out = out.reshape(batch, tq, heads, v.shape[-1]).astype(v.dtype)
  if not return_lse:
    return out
  # [B, H, Tq]; -inf on empty rows, whose gradient stays finite (0, not 0/0)
  seen = denominator > 0
  lse = jnp.where(seen, jnp.log(jnp.where(seen, denominator, 1.0)) + row_max, -jnp.inf)[..., 0]
  return out, jnp.transpose(lse, (0, 2, 1))


def reference(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  causal: bool = False,
  window: int | tuple[int, int] | None = None,
  segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  softcap: float | None = None,
  bias: jax.Array | None = None,
  return_lse: bool = False,
  block_mask: jax.Array | None = None,
  block_mask_size: tuple[int, int] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """The float32 ground truth: materialises the [B, H, Tq, Tk] logits."""
  args = _canonical(
    q,
    k,
    v,
    scale=scale,
    causal=causal,
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    softcap=softcap,
    bias=bias,
    return_lse=return_lse,
    block_mask=block_mask,
    block_mask_size=block_mask_size,
  )
  out = _attention_jnp(**args, compute_dtype=jnp.float32)
  return out


def _canonical(
  q,
  k,
  v,
  *,
  scale,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  softcap,
  bias,
  return_lse,
  block_mask=None,
  block_mask_size=None,
):
  """Validates shapes and fills defaults; returns the keyword arguments every impl takes."""
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(f"softmax_attention wants BTHD arrays, got q{q.shape} k{k.shape} v{v.shape}")
  batch, tq, heads, dim = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  if k.shape[0] != batch or v.shape[:3] != k.shape[:3] or k.shape[3] != dim:
    raise ValueError(f"softmax_attention: incompatible q{q.shape} k{k.shape} v{v.shape}")
  if heads % kv_heads:
    raise ValueError(f"softmax_attention: kv heads ({kv_heads}) must divide q heads ({heads})")
  if scale is None:
    raise ValueError("softmax_attention: pass `scale` explicitly (e.g. head_dim ** -0.5)")
  if q_positions is None:
    q_positions = jnp.broadcast_to(jnp.arange(tq, dtype=jnp.int32), (batch, tq))
  if kv_positions is None:
    kv_positions = jnp.broadcast_to(jnp.arange(tk, dtype=jnp.int32), (batch, tk))
  if segment_ids is not None and kv_segment_ids is None:
    if tq != tk:
      raise ValueError("softmax_attention: pass kv_segment_ids when Tq != Tk")
    kv_segment_ids = segment_ids
  if block_mask is not None:
    if block_mask_size is None or len(block_mask_size) != 2:
      raise ValueError("softmax_attention: block_mask needs block_mask_size=(bq, bk)")
    block_mask_size = (int(block_mask_size[0]), int(block_mask_size[1]))
    want = (-(-tq // block_mask_size[0]), -(-tk // block_mask_size[1]))
    if (
      jnp.ndim(block_mask) != 3
      or block_mask.shape[0] not in (1, batch)
      or tuple(block_mask.shape[1:]) != want
    ):
      raise ValueError(
        f"softmax_attention: block_mask must be [1 or {batch}, {want[0]}, "
        f"{want[1]}] for block_mask_size {block_mask_size}, got "
        f"{jnp.shape(block_mask)}"
      )
  else:
    block_mask_size = None
  return dict(
    q=q,
    k=k,
    v=v,
    scale=scale,
    causal=causal,
    window=normalize_window(window),
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    softcap=softcap,
    bias=bias,
    return_lse=return_lse,
    block_mask=block_mask,
    block_mask_size=block_mask_size,
  )


@dispatcher.register("xla")
def _xla(**args):
  """Pure-jnp in the input dtype with float32 logits and accumulation."""
  return _attention_jnp(**args, compute_dtype=args["q"].dtype)


def _cudnn_supports(
  *,
  q,
  k,
  v,
  scale,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  softcap,
  bias,
  return_lse,
  explicit_positions,
  dropout,
  block_mask=None,
  block_mask_size=None,
):
  if jax.default_backend() != "gpu":
    return "cuDNN runs only on GPU"
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    return f"cuDNN needs bf16/f16 inputs of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}"
  if q.shape[-1] > 256 or q.shape[-1] % 8 or v.shape[-1] != q.shape[-1]:
    return f"cuDNN needs head_dim <= 256, a multiple of 8, equal for q and v; got {q.shape[-1]}"
  if explicit_positions:
    return "cuDNN takes no explicit positions (KV-cache decoding)"
  if segment_ids is not None:
    return "cuDNN takes no segment ids"
  if softcap is not None:
    return "cuDNN has no logit soft-capping"
  if return_lse:
    return "cuDNN path does not return the log-sum-exp"
  if window is not None and (not causal or window[1] != 0):
    return "cuDNN supports only a left window on causal attention"
  if jnp.ndim(scale) != 0:
    return "cuDNN takes one scalar scale"
  if block_mask is not None:
    return "cuDNN path takes no block-sparse mask"
  if dropout:
    return "cuDNN path applies no attention dropout (only 'xla' does)"
  return None


@dispatcher.register("cudnn", supports=_cudnn_supports)
def _cudnn(*, q, k, v, scale, causal, window, bias, **_):
  return jax.nn.dot_product_attention(
    q,
    k,
    v,
    bias=bias,
    scale=float(scale),
    is_causal=causal,
    local_window_size=window,
    implementation="cudnn",
  )


def _flash_supports(
  *,
  q,
  k,
  v,
  scale,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  softcap,
  bias,
  return_lse,
  explicit_positions,
  dropout,
  block_mask,
  block_mask_size,
  on_device,
):
  from pallas_kernels.flash_attention import reason

  backend = jax.default_backend()
  if dropout:
    return "the Pallas flash kernel applies no attention dropout (only 'xla' does)"
  if on_device and backend not in ("gpu", "tpu"):
    return (
      "the Pallas flash kernel lowers for GPU (Triton) and TPU (Mosaic) only "
      f"(backend {backend!r}); use 'interpret' to run it on CPU"
    )
  if bias is not None:
    return "the Pallas flash kernel takes no additive bias (use a per-head scale array, masks)"
  if jnp.ndim(scale) > 1 or (jnp.ndim(scale) == 1 and jnp.shape(scale)[0] not in (1, q.shape[2])):
    return (
      f"scale must be a number or a per-head array [{q.shape[2]}], got shape {jnp.shape(scale)}"
    )
  per_batch = explicit_positions or segment_ids is not None or block_mask is not None
  return reason(
    q,
    k,
    v,
    block_mask_size=block_mask_size,
    platform="tpu" if backend == "tpu" else "gpu",
    per_batch_schedule=per_batch,
  )


def _flash(
  *,
  q,
  k,
  v,
  scale,
  causal,
  window,
  segment_ids,
  kv_segment_ids,
  q_positions,
  kv_positions,
  softcap,
  bias,
  return_lse,
  block_mask,
  block_mask_size,
  interpret,
):
  from pallas_kernels.flash_attention import flash_attention

  del bias  # refused by _flash_supports
  if not isinstance(scale, (int, float)) and jnp.ndim(scale) == 0:
    try:
      scale = float(scale)  # a concrete scalar stays a compile-time constant
    except (TypeError, jax.errors.ConcretizationTypeError):
      scale = jnp.reshape(scale, (1,))
  return flash_attention(
    q,
    k,
    v,
    scale=scale,
    causal=causal,
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    softcap=softcap,
    block_mask=block_mask,
    block_mask_size=block_mask_size,
    return_lse=return_lse,
    interpret=interpret,
  )


dispatcher.register("pallas", supports=lambda **a: _flash_supports(**a, on_device=True))(
  lambda **a: _flash(**a, interpret=False)
)
dispatcher.register("interpret", supports=lambda **a: _flash_supports(**a, on_device=False))(
  lambda **a: _flash(**a, interpret=True)
)


def _chunked_supports(*, bias, dropout, **_):
  if dropout:
    return "the chunked form applies no attention dropout (only 'xla' does)"
  return None if bias is None else "the chunked form takes no additive bias"


@dispatcher.register("chunked", supports=_chunked_supports)
def _chunked(*, bias, **args):
  """The flash forward's algorithm in pure jnp, key block by key block (not in "auto")."""
  from pallas_kernels.flash_attention import chunked

  del bias  # refused by _chunked_supports
  return chunked(**args)


def softmax_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  causal: bool = False,
  window: int | tuple[int, int] | None = None,
  segment_ids: jax.Array | None = None,
  kv_segment_ids: jax.Array | None = None,
  q_positions: jax.Array | None = None,
  kv_positions: jax.Array | None = None,
  softcap: float | None = None,
  bias: jax.Array | None = None,
  return_lse: bool = False,
  block_mask: jax.Array | None = None,
  block_mask_size: tuple[int, int] | None = None,
  dropout_rate: float = 0.0,
  dropout_rng: jax.Array | None = None,
  implementation: str = "auto",
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Multi-head softmax attention; see the module docstring for the mask semantics.

  Returns o[B,Tq,H,Dv], or (o, lse[B,Tq,H] float32) when return_lse.
  implementation: "auto" | "xla" | "cudnn" | "pallas" | "interpret" | "chunked". "pallas" is
  the flash kernel of pallas_kernels.flash_attention on GPU (Triton lowering) or TPU (Mosaic
  lowering); "interpret" runs the same kernel in Pallas interpret mode (any backend; how CPU
  tests exercise it); "chunked" is its pure-jnp blockwise twin (any backend, no T x T
  buffer in the forward; never chosen by "auto"). dropout_rate with a dropout_rng (a PRNG
  key) drops attention probabilities, on "xla" only ("auto" then picks it).
  """
  if not 0.0 <= dropout_rate < 1.0:
    raise ValueError(f"softmax_attention: dropout_rate must be in [0, 1), got {dropout_rate}")
  dropout = {}
  if dropout_rate > 0.0 and dropout_rng is not None:
    dropout = {"dropout_rate": dropout_rate, "dropout_rng": dropout_rng}
  explicit_positions = q_positions is not None or kv_positions is not None
  args = _canonical(
    q,
    k,
    v,
    scale=scale,
    causal=causal,
    window=window,
    segment_ids=segment_ids,
    kv_segment_ids=kv_segment_ids,
    q_positions=q_positions,
    kv_positions=kv_positions,
    softcap=softcap,
    bias=bias,
    return_lse=return_lse,
    block_mask=block_mask,
    block_mask_size=block_mask_size,
  )
  plan = context_parallel.active()
  if plan is not None:
    from attnzoo.ops import sequence_parallel

    return sequence_parallel.softmax_attention(
      plan,
      **args,
      explicit_positions=explicit_positions,
      dropout=bool(dropout),
      implementation=implementation,
    )
  name = dispatcher.choose(
    implementation, **args, explicit_positions=explicit_positions, dropout=bool(dropout)
  )
  if name in ("pallas", "interpret") and not explicit_positions:
    # default positions let the kernel index its fully visible tiles arithmetically
    args = dict(args, q_positions=None, kv_positions=None)
  return dispatcher.implementations[name].fn(**args, **dropout)


def split_kv_attention(
  q: jax.Array,
  k: jax.Array,
  v: jax.Array,
  *,
  scale,
  q_positions: jax.Array,
  kv_positions: jax.Array,
  num_splits: int,
  **kwargs,
) -> jax.Array:
  """Attention of a few queries over a long KV cache with the keys split into `num_splits`
  equal chunks, each chunk attended as its own batch row and the partial outputs merged by
  their log-sum-exp (the split-KV schedule of Flash-Decoding, Dao et al. 2023). Equal to
  softmax_attention over the whole cache; a decoding step then has B x num_splits x H
  independent pieces of work instead of B x H. kwargs: causal, window, softcap,
  implementation (masks are on the explicit positions; empty slots carry EMPTY)."""
  batch, tk = k.shape[:2]
  if tk % num_splits:
    raise ValueError(f"split_kv_attention: {num_splits} splits do not divide {tk} keys")
  fold = lambda x: x.reshape(batch * num_splits, tk // num_splits, *x.shape[2:])
  repeat = lambda x: jnp.repeat(x, num_splits, axis=0)
  out, lse = softmax_attention(
    repeat(q),
    fold(k),
    fold(v),
    scale=scale,
    q_positions=repeat(q_positions),
    kv_positions=fold(kv_positions),
    return_lse=True,
    **kwargs,
  )
  out = out.reshape(batch, num_splits, *out.shape[1:])
  out, _ = merge_partials(out, lse.reshape(batch, num_splits, *lse.shape[1:]), axis=1)
  return out.astype(v.dtype)


def merge_partials(out: jax.Array, lse: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """Softmax attention over a union of key sets from its parts: partial outputs
  out[..., T, H, Dv] and their log-sum-exps lse[..., T, H] stacked along `axis` (leading the
  batch) -> (out float32, lse). Parts that see nothing (lse -inf) weigh 0, and so do their
  gradients (no 0/0)."""
  top = jnp.max(lse, axis=axis, keepdims=True)
  top = jnp.where(jnp.isfinite(top), top, 0.0)
  weights = jnp.exp(lse - top)
  total = jnp.sum(weights, axis=axis, keepdims=True)
  safe = jnp.where(total > 0, total, 1.0)
  merged = (
    jnp.sum(weights[..., None] * out.astype(jnp.float32), axis=axis)
    / jnp.squeeze(safe, axis)[..., None]
  )
  lse = jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)
  return merged, jnp.squeeze(lse, axis)


def decode_splits(num_keys: int, keys_per_split: int = 512) -> int:
  """The most splits of at most ceil(num_keys / keys_per_split) that divide num_keys evenly."""
  for splits in range(max(1, -(-num_keys // keys_per_split)), 0, -1):
    if num_keys % splits == 0:
      return splits
  return 1


def merge_attention(parts: list[tuple[jax.Array, jax.Array]]) -> jax.Array:
  """One softmax over the union of disjoint key sets, from each set's (o [B,T,H,D], lse
  [B,T,H]) (softmax_attention(..., return_lse=True)); `merge_partials` over the list. A set
  may be a lone logit with a zero value (an attention sink). Rows empty everywhere return 0."""
  out = jnp.stack([o for o, _ in parts])
  lse = jnp.stack([lse.astype(jnp.float32) for _, lse in parts])
  return merge_partials(out, lse, axis=0)[0].astype(parts[0][0].dtype)
