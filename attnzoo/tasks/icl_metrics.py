"""Metrics of in-context learning (attnzoo/tasks/icl.py): error curves with bootstrap intervals,
error beyond the training length, one-layer weight diagnostics (He et al. 2025, seed #17) and the
cosine between the model's and gradient descent's prediction gradients (von Oswald et al. 2023).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def error_curve(
  preds, targets, scale=1.0, *, level: float = 0.9, resamples: int = 1000, seed: int = 0
) -> dict[str, np.ndarray]:
  """Normalised squared error per position (context length) [N] with a bootstrap interval over
  sequences: {"mean", "low", "high"} (Garg et al.: 90% intervals)."""
  err = (np.asarray(preds, np.float64) - np.asarray(targets, np.float64)) ** 2
  err = err / np.broadcast_to(np.asarray(scale, np.float64), err.shape[:1])[:, None]
  rng = np.random.default_rng(seed)
  idx = rng.integers(0, len(err), (resamples, len(err)))
  boot = err[idx].mean(1)  # [resamples, N]
  tail = (1 - level) / 2
  return {
    "mean": err.mean(0),
    "low": np.quantile(boot, tail, axis=0),
    "high": np.quantile(boot, 1 - tail, axis=0),
  }


def beyond_length(curve: np.ndarray, train_points: int) -> float:
  """Mean error at the positions past the training length (positions ≥ train_points)."""
  curve = np.asarray(curve)
  if len(curve) <= train_points:
    raise ValueError(f"the curve has {len(curve)} positions, none beyond {train_points}")
  return float(curve[train_points:].mean())


def weight_diagnostics(kq, ov) -> dict[str, np.ndarray]:
  """One-layer attention weights per head: KQ [H, d+1, d+1], OV [H, d+1] (y entry last).

  kq_diag_fraction  ‖diag of the x-block‖² / ‖KQ‖² (1: KQ = ω I on x, zero elsewhere)
  kq_diag_cv        std/|mean| of the x-block diagonal (0: equal entries)
  omega             mean of the x-block diagonal, per head
  ov_y_fraction     OV_y² / ‖OV‖² (1: only the y entry is used)
  mu                OV_y per head, and mu_sum = Σ_h μ_h
  """
  kq, ov = np.asarray(kq, np.float64), np.asarray(ov, np.float64)
  diag = np.diagonal(kq[:, :-1, :-1], axis1=1, axis2=2)
  omega = diag.mean(-1)
  mu = ov[:, -1]
  return {
    "kq_diag_fraction": (diag**2).sum(-1) / np.maximum((kq**2).sum((1, 2)), 1e-30),
    "kq_diag_cv": diag.std(-1) / np.maximum(np.abs(omega), 1e-30),
    "omega": omega,
    "ov_y_fraction": mu**2 / np.maximum((ov**2).sum(-1), 1e-30),
    "mu": mu,
    "mu_sum": mu.sum(),
  }


def gradient_cosine(predict, reference, tokens) -> np.ndarray:
  """Cosine between ∂ŷ/∂x_q of `predict` and of `reference` (both: tokens [B,N,d+1] -> [B],
  query last) per sequence [B]."""

  def grad_xq(fn):
    one = lambda t: fn(t[None])[0]
    return jax.vmap(jax.grad(one))(tokens)[:, -1, :-1]

  g, h = grad_xq(predict), grad_xq(reference)
  cos = jnp.sum(g * h, -1) / jnp.maximum(
    jnp.linalg.norm(g, axis=-1) * jnp.linalg.norm(h, axis=-1), 1e-30
  )
  return np.asarray(cos)
