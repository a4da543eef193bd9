"""mamba (Mamba-1) against a hand-written sequential block (numpy, float64), its hidden
attention and its inits (one model, to compile once)."""

import jax
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

D, B, T = 40, 2, 9  # d_inner 80, N 16, dt_rank ceil(40 / 16) = 3


def softplus(x):
  return np.log1p(np.exp(x))


def silu(x):
  return x / (1 + np.exp(-x))


def test_mamba_matches_sequential_block():
  mixer = build_mixer("mamba", d_model=D, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d_inner, rank, n = 80, 3, 16
  xs, z = np.split(np.asarray(x, np.float64) @ P["in_proj"]["kernel"], 2, axis=-1)
  w, bias = P["conv"]["kernel"], P["conv"]["bias"]  # [4, d_inner]
  k = w.shape[0]
  xs = silu(
    bias + sum(w[k - 1 - i] * np.pad(xs, [(0, 0), (i, 0), (0, 0)])[:, :T] for i in range(k))
  )
  dt, bs, cs = np.split(xs @ P["x_proj"]["kernel"], [rank, rank + n], axis=-1)
  dt = softplus(dt @ P["dt_proj"]["kernel"] + P["dt_bias"])  # [B,T,d_inner]
  a = -np.exp(P["A_log"])  # [d_inner, N]
  y = np.zeros((B, T, d_inner))
  for b in range(B):
    state = np.zeros((d_inner, n))
    for t in range(T):
      state = np.exp(dt[b, t, :, None] * a) * state + (dt[b, t] * xs[b, t])[:, None] * bs[b, t]
      y[b, t] = state @ cs[b, t] + P["D"] * xs[b, t]
  ref = (y * silu(z)) @ P["out_proj"]["kernel"]
  assert relative_error(mixer.apply({"params": params}, x), ref) < 1e-5
  # hidden attention: the scan's output without the D skip is M x per channel
  att = np.asarray(mixer.apply({"params": params}, x, method=mixer.attention_matrix))
  assert att.shape == (B, d_inner, T, T) and np.abs(np.triu(att, 1)).max() == 0
  y_att = np.einsum("bdts,bsd->btd", att, xs) + P["D"] * xs
  assert relative_error(y_att, y) < 1e-5

  # inits (mamba_simple.py): S4D-Real A, D = 1, dt in [1e-3, 1e-1], dt_proj U(+-rank^-0.5)
  np.testing.assert_allclose(np.exp(P["A_log"]), np.tile(np.arange(1, 17), (80, 1)), 1e-6)
  dt0 = softplus(P["dt_bias"])
  assert dt0.shape == (80,) and (dt0 >= 1e-3 - 1e-9).all() and (dt0 <= 0.1 + 1e-9).all()
  np.testing.assert_array_equal(P["D"], 1.0)
  assert P["x_proj"]["kernel"].shape == (80, 3 + 2 * 16)
  w = P["dt_proj"]["kernel"]
  assert w.shape == (3, 80) and np.abs(w).max() <= 3**-0.5 and np.abs(w).max() > 0.5 * 3**-0.5
  assert P["conv"]["kernel"].shape == (4, 80) and "bias" not in P["in_proj"]
  # SSM state 80 x 16, conv buffer 3 x 80
  assert mixer.state_size(1000) == (80 * 16 + 3 * 80) * 4
