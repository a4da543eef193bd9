"""The one-layer-per-step attention models of the GD-equivalence papers, on the concat prompt
(tokens e_i = (x_i, y_i) for the context, e_q = (x_q, 0) last; keys and values come from the
context only; no norms, MLPs or positions). Pure functions of a params pytree, so sweeps vmap
over runs.

`linear_transformer` (von Oswald et al. 2023; Vladymyrov et al. 2024, seed #46): each layer
adds Δe_t = 1/n Σ_i W_PV e_i (e_iᵀ W_KQ e_t) to every token; the prediction is −y_q. Layer
parameterisations (`LT_KINDS`):
  full  W_KQ, W_PV full (d+1)² matrices.
  diag  four scalars ω_xx, ω_xy, ω_yx, ω_yy: Δx_t = 1/n Σ_i x_i (ω_xx x_iᵀx_t + ω_xy y_i y_t),
        Δy_t = 1/n Σ_i y_i (ω_yx x_iᵀx_t + ω_yy y_i y_t). We train the ω as free parameters
        (the products of block-diagonal W_KQ and W_PV tie them; the function class is larger).
  gdpp  GD++: ω_xx and ω_yx only. With ω_xx = −γ, ω_yx = −η it is GD++ exactly, and with
        ω_xx = 0 it is K-step gradient descent (icl_baselines.gd_plus_plus).

`attention_heads` (He et al. 2025, seed #17): one layer of H heads with full (d+1)² Q, K, V and a
per-head output vector o_h; ŷ = Σ_h o_hᵀ Σ_i a_h(i) V_h e_i, where a_h is the softmax over the
context of (K_h e_i)ᵀ(Q_h e_q)/sqrt(d+1) or, for the linear-attention control, the same scores
unnormalised (plain linear attention: the 1/L that GD needs is learned into the weights at the
training length, so the prediction scales with L beyond it; divided by the actual length the
control would generalise like softmax, which is not the paper's comparison). `head_matrices`
gives each head's KQ = K_hᵀQ_h and OV = o_hᵀV_h.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LT_KINDS = ("full", "diag", "gdpp")
DIAG_KEYS = {"diag": ("xx", "xy", "yx", "yy"), "gdpp": ("xx", "yx")}


def init_linear_transformer(key, kind: str, num_layers: int, dim: int, scale: float = 0.002):
  """Layers of N(0, scale²) parameters (von Oswald's init scale 0.002)."""
  if kind not in LT_KINDS:
    raise ValueError(f"unknown linear-transformer kind {kind!r}; use {', '.join(LT_KINDS)}")
  keys = jax.random.split(key, num_layers)
  if kind == "full":
    size = (2, dim + 1, dim + 1)
    return [dict(zip(("kq", "pv"), scale * jax.random.normal(k, size))) for k in keys]
  names = DIAG_KEYS[kind]
  return [dict(zip(names, scale * jax.random.normal(k, (len(names),)))) for k in keys]


def _layer(layer: dict, e: jax.Array, n_ctx: int) -> jax.Array:
  ctx = e[:, :n_ctx]
  if "kq" in layer:
    scores = jnp.einsum("bid,de,bte->bti", ctx, layer["kq"], e)
    return e + jnp.einsum("bti,bid,ed->bte", scores, ctx, layer["pv"]) / n_ctx
  x, y, cx, cy = e[..., :-1], e[..., -1], ctx[..., :-1], ctx[..., -1]
  gx = jnp.einsum("bid,btd->bti", cx, x) / n_ctx
  gy = cy[:, None, :] * y[:, :, None] / n_ctx
  w = lambda k: layer.get(k, 0.0)
  dx = jnp.einsum("bti,bid->btd", w("xx") * gx + w("xy") * gy, cx)
  dy = jnp.einsum("bti,bi->bt", w("yx") * gx + w("yy") * gy, cy)
  return e + jnp.concatenate([dx, dy[..., None]], -1)


def linear_transformer(layers: list[dict], tokens: jax.Array) -> jax.Array:
  """tokens [B, N, d+1] (query last, its y entry 0) -> prediction of y_q [B]."""
  e = tokens
  for layer in layers:
    e = _layer(layer, e, tokens.shape[1] - 1)
  return -e[:, -1, -1]


def init_attention_heads(key, num_heads: int, dim: int, scale: float = 0.1):
  """Q, K, V [H, d+1, d+1] and o [H, d+1], N(0, scale²) (the scale is our choice, not checked
  against the paper's code)."""
  kq, kk, kv, ko = jax.random.split(key, 4)
  size = (num_heads, dim + 1, dim + 1)
  return {
    "q": scale * jax.random.normal(kq, size),
    "k": scale * jax.random.normal(kk, size),
    "v": scale * jax.random.normal(kv, size),
    "o": scale * jax.random.normal(ko, (num_heads, dim + 1)),
  }


def attention_heads(params: dict, tokens: jax.Array, softmax: bool = True) -> jax.Array:
  """tokens [B, N, d+1] -> ŷ_q [B]: the query (last token) attends to the N − 1 context tokens."""
  ctx, q = tokens[:, :-1], tokens[:, -1]
  scores = jnp.einsum("hed,bid,hef,bf->bhi", params["k"], ctx, params["q"], q)
  scores = scores / jnp.sqrt(tokens.shape[-1])
  a = jax.nn.softmax(scores, -1) if softmax else scores
  values = jnp.einsum("he,hed,bid->bhi", params["o"], params["v"], ctx)
  return jnp.sum(a * values, (1, 2))


def head_matrices(params: dict) -> tuple[jax.Array, jax.Array]:
  """Per head KQ = K_hᵀQ_h [H, d+1, d+1] and OV = o_hᵀV_h [H, d+1]."""
  kq = jnp.einsum("hed,hef->hdf", params["k"], params["q"])
  ov = jnp.einsum("he,hed->hd", params["o"], params["v"])
  return kq, ov
