"""mamba (Mamba-1) against a hand-written sequential block (numpy, float64), and its inits."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

D, B, T = 16, 2, 9


def softplus(x):
  return np.log1p(np.exp(x))


def silu(x):
  return x / (1 + np.exp(-x))


def test_mamba_matches_sequential_block():
  n = 4
  mixer = build_mixer("mamba", d_model=D, d_state=n, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d_inner, rank = 2 * D, 1
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


def test_mamba_inits_and_state_size():
  mixer = build_mixer("mamba", d_model=40)  # d_inner 80, N 16, dt_rank ceil(40/16) = 3
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 4, 40)))["params"]
  np.testing.assert_allclose(np.exp(params["A_log"]), np.tile(np.arange(1, 17), (80, 1)), 1e-6)
  dt = softplus(np.asarray(params["dt_bias"], np.float64))
  assert dt.shape == (80,) and (dt >= 1e-3 - 1e-9).all() and (dt <= 0.1 + 1e-9).all()
  np.testing.assert_array_equal(np.asarray(params["D"]), 1.0)
  assert params["x_proj"]["kernel"].shape == (80, 3 + 2 * 16)
  w = np.asarray(params["dt_proj"]["kernel"])
  assert w.shape == (3, 80) and np.abs(w).max() <= 3**-0.5 and np.abs(w).max() > 0.5 * 3**-0.5
  assert params["conv"]["kernel"].shape == (4, 80) and "bias" not in params["in_proj"]
  # SSM state 80 x 16, conv buffer 3 x 80
  assert mixer.state_size(1000) == (80 * 16 + 3 * 80) * 4
