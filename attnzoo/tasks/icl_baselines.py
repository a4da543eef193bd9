"""Classical in-context estimators on the same prompts as the models (attnzoo/tasks/icl.py).

Every estimator takes xs [B, N, d], ys [B, N] and returns predictions [B, N]: the prediction at
position k uses the first k pairs only (k = 0 predicts 0), the quantity Garg et al. (2022) plot
against the number of in-context examples.
  least_squares  min-norm least squares (pinv).
  ridge          (XᵀX + λI)⁻¹Xᵀy with λ a scalar or one per sequence (the oracle λ = σ_τ²/w²).
  averaging      ŵ = mean_j y_j x_j.
  knn            mean of the k nearest (Euclidean) earlier targets.
  lasso          argmin 1/(2k)‖Xw − y‖² + α‖w‖₁ by FISTA (sklearn's objective).
  gd             K steps of gradient descent on 1/(2k)‖Xw − y‖² from w = 0 with step η.
  gd_plus_plus   GD++ (von Oswald et al. 2023): before each GD step the inputs are moved,
                 x ← x − γ·C x with C = 1/k Σ_j x_j x_jᵀ (a curvature correction).
  ada_ridge      AdaRR (Vladymyrov et al. 2024): σ̂² = RSS_OLS / (k − d), then ridge with λ = σ̂²
                 (clipped to [clip_low, ∞) and multiplied by `scale`, which gives TunedRR).
`line_search` picks η (or λ) by the loss at the last position over a grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _prefixes(xs, ys):
  """Per prefix length k = 0..N-1: masked xs [B,N(k),N,d], ys [B,N(k),N], counts [N(k)]."""
  n = xs.shape[1]
  mask = (jnp.arange(n)[None, :] < jnp.arange(n)[:, None]).astype(xs.dtype)  # [k, j]
  return xs[:, None] * mask[None, :, :, None], ys[:, None] * mask[None], mask.sum(-1)


def _predict(w, xs):
  """Prediction of y_k from the weights fitted on the first k pairs: w [B,N,d]."""
  return jnp.einsum("bkd,bkd->bk", w, xs)


def least_squares(xs: jax.Array, ys: jax.Array) -> jax.Array:
  px, py, _ = _prefixes(xs, ys)
  w = jnp.einsum("bkdn,bkn->bkd", jnp.linalg.pinv(px), py)
  return _predict(w, xs)


def ridge(xs: jax.Array, ys: jax.Array, lam) -> jax.Array:
  px, py, _ = _prefixes(xs, ys)
  d = xs.shape[-1]
  lam = jnp.broadcast_to(jnp.asarray(lam, xs.dtype), (xs.shape[0],))
  gram = jnp.einsum("bknd,bkne->bkde", px, px) + lam[:, None, None, None] * jnp.eye(d)
  w = jnp.linalg.solve(gram, jnp.einsum("bknd,bkn->bkd", px, py)[..., None])[..., 0]
  return _predict(w, xs)


def averaging(xs: jax.Array, ys: jax.Array) -> jax.Array:
  px, py, count = _prefixes(xs, ys)
  w = jnp.einsum("bknd,bkn->bkd", px, py) / jnp.maximum(count, 1)[None, :, None]
  return _predict(w, xs)


def knn(xs: jax.Array, ys: jax.Array, k: int = 3) -> jax.Array:
  n = xs.shape[1]
  dist = jnp.sum((xs[:, :, None] - xs[:, None]) ** 2, -1)  # [B, query, j]
  earlier = jnp.arange(n)[None, :] < jnp.arange(n)[:, None]
  dist = jnp.where(earlier, dist, jnp.inf)
  _, idx = jax.lax.top_k(-dist, min(k, n))
  valid = jnp.take_along_axis(jnp.broadcast_to(earlier, dist.shape), idx, -1)
  near = jnp.take_along_axis(jnp.broadcast_to(ys[:, None], dist.shape), idx, -1)
  return jnp.sum(near * valid, -1) / jnp.maximum(valid.sum(-1), 1)


def lasso(xs: jax.Array, ys: jax.Array, alpha: float, iters: int = 500) -> jax.Array:
  px, py, count = _prefixes(xs, ys)
  count = jnp.maximum(count, 1)[None, :, None]
  gram = jnp.einsum("bknd,bkne->bkde", px, px) / count[..., None]
  xty = jnp.einsum("bknd,bkn->bkd", px, py) / count
  step = 1.0 / jnp.maximum(jnp.linalg.eigvalsh(gram)[..., -1], 1e-12)[..., None]

  def body(_, carry):
    w, z, t = carry
    grad = jnp.einsum("bkde,bke->bkd", gram, z) - xty
    v = z - step * grad
    w_new = jnp.sign(v) * jnp.maximum(jnp.abs(v) - step * alpha, 0.0)
    t_new = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
    return w_new, w_new + (t - 1) / t_new * (w_new - w), t_new

  zero = jnp.zeros_like(xty)
  w, _, _ = jax.lax.fori_loop(0, iters, body, (zero, zero, jnp.ones(())))
  return _predict(w, xs)


def gd_plus_plus(xs: jax.Array, ys: jax.Array, eta, gamma, steps: int = 1) -> jax.Array:
  """K = `steps` GD++ steps; gamma = 0 gives plain K-step GD. The query is transformed with the
  context. eta and gamma may be scalars or one value per step."""
  px, py, count = _prefixes(xs, ys)
  count = jnp.maximum(count, 1)[None, :, None]
  eta = jnp.broadcast_to(jnp.asarray(eta, xs.dtype), (steps,))
  gamma = jnp.broadcast_to(jnp.asarray(gamma, xs.dtype), (steps,))
  q = xs  # each query with the context of its own prefix
  r = py  # residuals of the context, y − ŵᵀx
  pred = jnp.zeros_like(ys)
  for s in range(steps):
    # One GD step on the residuals: Δŵ = η/k Σ_j r_j x_j; query and residuals follow.
    dw = eta[s] * jnp.einsum("bknd,bkn->bkd", px, r) / count
    pred = pred + jnp.einsum("bkd,bkd->bk", dw, q)
    r = r - jnp.einsum("bkd,bknd->bkn", dw, px)
    cov = jnp.einsum("bknd,bkne->bkde", px, px) / count[..., None]
    q = q - gamma[s] * jnp.einsum("bkde,bke->bkd", cov, q)
    px = px - gamma[s] * jnp.einsum("bkde,bkne->bknd", cov, px)
  return pred


def gd(xs: jax.Array, ys: jax.Array, eta, steps: int = 1) -> jax.Array:
  return gd_plus_plus(xs, ys, eta, 0.0, steps)


def ada_ridge(xs: jax.Array, ys: jax.Array, scale: float = 1.0, clip_low: float = 0.0) -> jax.Array:
  """AdaRR (scale 1, no clip) / TunedRR: ridge with λ = scale·max(σ̂², clip_low) per prefix,
  σ̂² the OLS residual variance of that prefix (0 while k ≤ d, where OLS interpolates)."""
  px, py, count = _prefixes(xs, ys)
  d = xs.shape[-1]
  w_ols = jnp.einsum("bkdn,bkn->bkd", jnp.linalg.pinv(px), py)
  rss = jnp.sum((py - jnp.einsum("bknd,bkd->bkn", px, w_ols)) ** 2, -1)
  sigma2 = jnp.where(count > d, rss / jnp.maximum(count - d, 1), 0.0)
  lam = scale * jnp.maximum(sigma2, clip_low)
  gram = jnp.einsum("bknd,bkne->bkde", px, px) + lam[..., None, None] * jnp.eye(d)
  w = jnp.linalg.solve(gram, jnp.einsum("bknd,bkn->bkd", px, py)[..., None])[..., 0]
  return _predict(w, xs)


def line_search(predict, xs, ys, grid) -> tuple[float, jax.Array]:
  """The grid value v minimising the mean squared error at the last position of
  predict(xs, ys, v), and that error per grid value."""
  losses = jnp.stack([jnp.mean((predict(xs, ys, v)[:, -1] - ys[:, -1]) ** 2) for v in grid])
  return float(jnp.asarray(grid)[jnp.argmin(losses)]), losses
