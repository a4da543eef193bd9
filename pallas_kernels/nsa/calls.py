"""The pallas_calls of the NSA kernels (bodies in kernels.py): BlockSpecs, grids and launch
knobs of the forward, dq, dk/dv and selection-scores kernels (Triton on GPU, interpret mode on
CPU; layouts as kernels.py describes)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .kernels import Scores, Static, dkv_kernel, dq_kernel, fwd_kernel, scores_kernel


def _call(kernel, cfg, launch, name, grid, in_specs, out_specs, out_shape, args):
  kwargs = {"interpret": True} if cfg.interpret else {}
  if not cfg.interpret:
    kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=launch[0], num_stages=launch[1])
  return pl.pallas_call(
    functools.partial(kernel, cfg=cfg),
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    name=name,
    **kwargs,
  )(*args)


def _per_token_specs(cfg, q, k, v, idx, qpos, extra=()):
  """Specs of a per-token program (t, g, b): the token's group rows of q (and of `extra` row
  arrays: dO [.., D] or per-row statistics), the whole k, v of its kv head, its indices and
  the query positions."""
  g_rows = cfg.groups
  row_spec = lambda a: (
    pl.BlockSpec((None, None, g_rows, a.shape[-1]), lambda t, g, b: (b, g, t, 0))
    if a.ndim == 4
    else pl.BlockSpec((None, None, g_rows), lambda t, g, b: (b, g, t))
  )
  whole = lambda a: pl.BlockSpec((None, None) + a.shape[2:], lambda t, g, b: (b, g, 0, 0))
  return [
    row_spec(q),
    whole(k),
    whole(v),
    *(row_spec(a) for a in extra),
    pl.BlockSpec((None, None, None, idx.shape[-1]), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, qpos.shape[1]), lambda t, g, b: (b, 0)),
  ]


def forward(q, k, v, idx, qpos, cfg: Static):
  """-> o [B, Hkv, Tq*groups, Dv] (q's dtype), lse2 [B, Hkv, Tq*groups] float32."""
  batch, kv_heads, n_rows, _ = q.shape
  tq = idx.shape[2]
  dv = v.shape[-1]
  out_specs = [
    pl.BlockSpec((None, None, cfg.groups, dv), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, None, cfg.groups), lambda t, g, b: (b, g, t)),
  ]
  out_shape = [
    jax.ShapeDtypeStruct((batch, kv_heads, n_rows, dv), q.dtype),
    jax.ShapeDtypeStruct((batch, kv_heads, n_rows), jnp.float32),
  ]
  return _call(
    fwd_kernel,
    cfg,
    cfg.fwd,
    "nsa_selected_fwd",
    (tq, kv_heads, batch),
    _per_token_specs(cfg, q, k, v, idx, qpos),
    out_specs,
    out_shape,
    (q, k, v, idx, qpos),
  )


def backward_dq(q, k, v, do, lse2, delta, idx, qpos, cfg: Static):
  batch, kv_heads, _, d = q.shape
  tq = idx.shape[2]
  return _call(
    dq_kernel,
    cfg,
    cfg.dq,
    "nsa_selected_dq",
    (tq, kv_heads, batch),
    _per_token_specs(cfg, q, k, v, idx, qpos, extra=(do, lse2, delta)),
    pl.BlockSpec((None, None, cfg.groups, d), lambda t, g, b: (b, g, t, 0)),
    jax.ShapeDtypeStruct(q.shape, q.dtype),
    (q, k, v, do, lse2, delta, idx, qpos),
  )


def backward_dkv(q, k, v, do, lse2, delta, idx_rows, qpos_rows, sched, cfg: Static):
  """idx_rows [B, Hkv, Tq*groups, n] and qpos_rows [B, Tq*groups]: indices and positions per
  query row; sched [B, Hkv, n_blocks, 2 + n_tiles]. Returns float32 partial dk, dv [splits, B,
  Hkv, Tk, D] (their sum over the first axis is the gradient)."""
  batch, kv_heads, tk, _ = k.shape
  splits = cfg.dkv_splits
  whole = lambda a: pl.BlockSpec(
    (None, None) + a.shape[2:], lambda g, js, b: (b, g) + (0,) * (a.ndim - 2)
  )
  own = lambda a: pl.BlockSpec(
    (None, None, cfg.block, a.shape[-1]), lambda g, js, b: (b, g, js // splits, 0)
  )
  part = lambda a: pl.BlockSpec(
    (None, None, None, cfg.block, a.shape[-1]),
    lambda g, js, b: (js % splits, b, g, js // splits, 0),
  )
  in_specs = [
    whole(q),
    own(k),
    own(v),
    whole(do),
    whole(lse2),
    whole(delta),
    whole(idx_rows),
    pl.BlockSpec((None, qpos_rows.shape[1]), lambda g, js, b: (b, 0)),
    pl.BlockSpec((None, None, None, sched.shape[-1]), lambda g, js, b: (b, g, js // splits, 0)),
  ]
  shape = lambda a: jax.ShapeDtypeStruct((splits,) + a.shape, jnp.float32)
  return _call(
    dkv_kernel,
    cfg,
    cfg.dkv,
    "nsa_selected_dkv",
    (kv_heads, (tk // cfg.block) * splits, batch),  # kv heads fastest
    in_specs,
    [part(k), part(v)],
    [shape(k), shape(v)],
    (q, k, v, do, lse2, delta, idx_rows, qpos_rows, sched),
  )


def selection_scores(q, kc, lse2, qpos, w, spill, cfg: Static, sc: Scores):
  """q rows [B, Hkv, Tq*groups, D], kc [B, Hkv, Nc, D] (Nc a multiple of sc.tile), lse2 rows
  (+inf where a row sees nothing), qpos [B, Tq], overlap weights w, spill [tile, width] ->
  scores [B, Hkv, Tq, (Nc / tile + 1) * width] float32."""
  batch, kv_heads, _, d = q.shape
  tq = qpos.shape[1]
  rows = sc.block_q * cfg.groups
  width = w.shape[1]
  n_out = (kc.shape[2] // sc.tile + 1) * width
  in_specs = [
    pl.BlockSpec((None, None, rows, d), lambda t, g, b: (b, g, t, 0)),
    pl.BlockSpec((None, None) + kc.shape[2:], lambda t, g, b: (b, g, 0, 0)),
    pl.BlockSpec((None, None, rows), lambda t, g, b: (b, g, t)),
    pl.BlockSpec((None, sc.block_q), lambda t, g, b: (b, t)),
    pl.BlockSpec(w.shape, lambda t, g, b: (0, 0)),
    pl.BlockSpec(spill.shape, lambda t, g, b: (0, 0)),
  ]
  return _call(
    functools.partial(scores_kernel, sc=sc),
    cfg,
    sc.launch,
    "nsa_selection_scores",
    (tq // sc.block_q, kv_heads, batch),
    in_specs,
    pl.BlockSpec((None, None, sc.block_q, n_out), lambda t, g, b: (b, g, t, 0)),
    jax.ShapeDtypeStruct((batch, kv_heads, tq, n_out), jnp.float32),
    (q, kc, lse2, qpos, w, spill),
  )
