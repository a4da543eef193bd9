"""mamba2 against a hand-written sequential SSD scan (numpy, float64), and its inits."""

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


def test_mamba2_matches_sequential_scan():
  n, p, g = 4, 8, 2
  mixer = build_mixer("mamba2", d_model=D, d_state=n, head_dim=p, ngroups=g, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  d_inner, heads = 2 * D, 2 * D // p
  u = np.asarray(x, np.float64)
  zxbcdt = u @ P["in_proj"]["kernel"]
  z, xbc, dt = np.split(zxbcdt, [d_inner, 2 * d_inner + 2 * g * n], axis=-1)
  w, bias = P["conv"]["kernel"], P["conv"]["bias"]  # [4, C]
  k = w.shape[0]
  xbc = silu(
    bias + sum(w[k - 1 - i] * np.pad(xbc, [(0, 0), (i, 0), (0, 0)])[:, :T] for i in range(k))
  )
  xs, bs, cs = np.split(xbc, [d_inner, d_inner + g * n], axis=-1)
  xs = xs.reshape(B, T, heads, p)
  bs, cs = bs.reshape(B, T, g, n), cs.reshape(B, T, g, n)
  dt = softplus(dt + P["dt_bias"])
  a = -np.exp(P["A_log"])
  y = np.zeros((B, T, heads, p))
  for b in range(B):
    for h in range(heads):
      grp = h // (heads // g)
      state = np.zeros((n, p))
      for t in range(T):
        state = np.exp(dt[b, t, h] * a[h]) * state + dt[b, t, h] * np.outer(
          bs[b, t, grp], xs[b, t, h]
        )
        y[b, t, h] = cs[b, t, grp] @ state + P["D"][h] * xs[b, t, h]
  y = y.reshape(B, T, d_inner) * silu(z)
  y = y.reshape(B, T, g, d_inner // g)
  y = y / np.sqrt(np.mean(y**2, axis=-1, keepdims=True) + 1e-5)
  y = y.reshape(B, T, d_inner) * P["norm"]["scale"]
  ref = y @ P["out_proj"]["kernel"]
  assert relative_error(mixer.apply({"params": params}, x), ref) < 1e-5
  # hidden attention: y_ssm = A (x) per head
  att = mixer.apply({"params": params}, x, method=mixer.attention_matrix)
  assert att.shape == (B, heads, T, T)
  assert np.abs(np.asarray(jnp.triu(att, 1))).max() == 0


def test_mamba2_inits_and_state_size():
  mixer = build_mixer("mamba2", d_model=64)  # 2 heads of 64, N = 64
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 4, 64)))["params"]
  a = np.exp(np.asarray(params["A_log"]))
  assert a.shape == (2,) and (a >= 1).all() and (a <= 16).all()
  dt = softplus(np.asarray(params["dt_bias"], np.float64))
  assert (dt >= 1e-3 - 1e-9).all() and (dt <= 0.1 + 1e-9).all()
  np.testing.assert_array_equal(np.asarray(params["D"]), 1.0)
  # SSM state 2 x 64 x 64, conv buffer 3 x (128 + 2 x 64)
  assert mixer.state_size(1000) == (2 * 64 * 64 + 3 * 256) * 4
