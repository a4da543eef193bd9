"""Softmax attention (Vaswani et al. 2017), layout BTHD, with every mask the zoo needs.

softmax_attention(q[B,Tq,H,D], k[B,Tk,Hkv,D], v[B,Tk,Hkv,Dv], *, scale, ...) -> o[B,Tq,H,Dv]

Masks are defined on token positions (default `arange`): `causal` keeps kv_pos <= q_pos;
`window=(left, right)` keeps q_pos - left <= kv_pos <= q_pos + right (an int w means (w, 0));
`segment_ids` keep pairs in the same segment (packed documents). Decoding passes explicit
`q_positions` / `kv_positions` for a KV cache; empty cache slots carry position `EMPTY`,
which every causal or windowed query masks out. Rows with no visible key return 0 (lse -inf).
Grouped-query / multi-query: Hkv divides H; query head h reads kv head h // (H // Hkv).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from attnzoo.ops.dispatch import Dispatcher

EMPTY = jnp.iinfo(jnp.int32).max  # position of an empty KV-cache slot

dispatcher = Dispatcher("softmax_attention", auto_order={
    "gpu": ("cudnn", "pallas", "xla"),
    "tpu": ("pallas", "xla"),
    "default": ("xla",),
})


def normalize_window(window):
  if window is None:
    return None
  if isinstance(window, int):
    window = (window, 0)
  left, right = window
  if left < 0 or right < 0:
    raise ValueError(f"window widths must be >= 0, got {window}")
  return int(left), int(right)


def attention_mask(q_positions, kv_positions, *, causal, window, segment_ids, kv_segment_ids):
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
  return mask


def _attention_jnp(q, k, v, *, scale, causal, window, segment_ids, kv_segment_ids,
                   q_positions, kv_positions, softcap, bias, return_lse, compute_dtype):
  batch, tq, heads, _ = q.shape
  tk, kv_heads = k.shape[1], k.shape[2]
  groups = heads // kv_heads
  q = q.astype(compute_dtype).reshape(batch, tq, kv_heads, groups, q.shape[-1])
  logits = jnp.einsum("bqhgd,bkhd->bhgqk", q, k.astype(compute_dtype),
                      preferred_element_type=jnp.float32)
  logits = logits.reshape(batch, heads, tq, tk) * jnp.asarray(scale, jnp.float32).reshape(-1, 1, 1)
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  mask = attention_mask(q_positions, kv_positions, causal=causal, window=window,
                        segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
  logits = jnp.where(mask, logits, -jnp.inf)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  weights = jnp.exp(logits - row_max)
  denominator = jnp.sum(weights, axis=-1, keepdims=True)
  probs = weights / jnp.where(denominator > 0, denominator, 1.0)
  probs = probs.reshape(batch, kv_heads, groups, tq, tk).astype(compute_dtype)
  out = jnp.einsum("bhgqk,bkhd->bqhgd", probs, v.astype(compute_dtype),
                   preferred_element_type=jnp.float32)
  out = out.reshape(batch, tq, heads, v.shape[-1]).astype(v.dtype)
  if not return_lse:
    return out
  lse = (jnp.log(denominator) + row_max)[..., 0]  # [B, H, Tq]; -inf on empty rows
  return out, jnp.transpose(lse, (0, 2, 1))


def reference(q, k, v, *, scale, causal=False, window=None, segment_ids=None,
              kv_segment_ids=None, q_positions=None, kv_positions=None, softcap=None,
              bias=None, return_lse=False):
  """The float32 ground truth: materialises the [B, H, Tq, Tk] logits."""
  args = _canonical(q, k, v, scale=scale, causal=causal, window=window,
                    segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                    q_positions=q_positions, kv_positions=kv_positions, softcap=softcap,
                    bias=bias, return_lse=return_lse)
  out = _attention_jnp(**args, compute_dtype=jnp.float32)
  return out


def _canonical(q, k, v, *, scale, causal, window, segment_ids, kv_segment_ids, q_positions,
               kv_positions, softcap, bias, return_lse):
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
  return dict(q=q, k=k, v=v, scale=scale, causal=causal, window=normalize_window(window),
              segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
              q_positions=q_positions, kv_positions=kv_positions, softcap=softcap,
              bias=bias, return_lse=return_lse)


@dispatcher.register("xla")
def _xla(**args):
  """Pure-jnp in the input dtype with float32 logits and accumulation."""
  return _attention_jnp(**args, compute_dtype=args["q"].dtype)


def _cudnn_supports(*, q, k, v, scale, causal, window, segment_ids, kv_segment_ids,
                    q_positions, kv_positions, softcap, bias, return_lse, explicit_positions):
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
  return None


@dispatcher.register("cudnn", supports=_cudnn_supports)
def _cudnn(*, q, k, v, scale, causal, window, bias, **_):
  return jax.nn.dot_product_attention(
      q, k, v, bias=bias, scale=float(scale), is_causal=causal,
      local_window_size=window, implementation="cudnn")


def softmax_attention(q, k, v, *, scale, causal=False, window=None, segment_ids=None,
                      kv_segment_ids=None, q_positions=None, kv_positions=None,
                      softcap=None, bias=None, return_lse=False, implementation="auto"):
  """Multi-head softmax attention; see the module docstring for the mask semantics.

  Returns o[B,Tq,H,Dv], or (o, lse[B,Tq,H] float32) when return_lse.
  implementation: "auto" | "xla" | "cudnn" | "pallas" | "interpret".
  """
  explicit_positions = q_positions is not None or kv_positions is not None
  args = _canonical(q, k, v, scale=scale, causal=causal, window=window,
                    segment_ids=segment_ids, kv_segment_ids=kv_segment_ids,
                    q_positions=q_positions, kv_positions=kv_positions, softcap=softcap,
                    bias=bias, return_lse=return_lse)
  name = dispatcher.choose(implementation, **args, explicit_positions=explicit_positions)
  return dispatcher.implementations[name].fn(**args)
