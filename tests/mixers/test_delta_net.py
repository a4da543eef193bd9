"""DeltaNet / Gated DeltaNet: the layer equals a naive float64 loop (short convs, SiLU, L2
norm, beta, Mamba-2 decay, gated RMSNorm); unit-norm q/k, beta and decay ranges; the hidden
attention matrix reproduces the op's output."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from attnzoo.ops.delta_rule import delta_rule
from tests.conftest import relative_error

B, T, D, H = 2, 10, 16, 2


def silu(x):
  return x / (1 + np.exp(-x))


def naive(p, x, heads, gated, eps=1e-5):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape

  def conv(z, w):  # causal depthwise, w [K, C], w[-1] on the current
    kk = w.shape[0]
    zp = np.concatenate([np.zeros((b, kk - 1, z.shape[-1])), z], axis=1)
    return sum(zp[:, i : i + t] * w[i] for i in range(kk))

  feats = {n: silu(conv(x @ p[n]["kernel"], p[n + "_conv"]["kernel"])) for n in "qkv"}
  q, k, v = (f.reshape(b, t, heads, -1) for f in (feats["q"], feats["k"], feats["v"]))
  q = q / np.linalg.norm(q, axis=-1, keepdims=True)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  beta = 1 / (1 + np.exp(-(x @ p["b"]["kernel"])))
  decay = np.ones(beta.shape)
  if gated:
    dt = np.log1p(np.exp(x @ p["a"]["kernel"] + p["dt_bias"]))
    decay = np.exp(-np.exp(p["A_log"]) * dt)
  o = np.zeros(v.shape)
  scale = q.shape[-1] ** -0.5
  for bi in range(b):
    for h in range(heads):
      s = np.zeros((q.shape[-1], v.shape[-1]))
      for ti in range(t):
        kt, bt = k[bi, ti, h], beta[bi, ti, h]
        s = decay[bi, ti, h] * (s - bt * np.outer(kt, kt @ s)) + bt * np.outer(kt, v[bi, ti, h])
        o[bi, ti, h] = scale * s.T @ q[bi, ti, h]
  g = np.einsum("btd,dhv->bthv", x, p["g"]["kernel"])
  o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + eps) * p["norm"]["scale"] * silu(g)
  return np.einsum("bthv,hvd->btd", o, p["out"]["kernel"])


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_delta_net_equals_naive_loop(name):
  mixer = build_mixer(name, d_model=D, num_heads=H, expand_v=1.5, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  params = jax.tree.map(lambda a: a * 5 if a.ndim == 2 and a.shape[0] == D else a, params)
  out = mixer.apply({"params": params}, x)
  assert relative_error(out, naive(params, x, H, name == "gated_deltanet")) < 1e-5


def test_delta_net_normalisation_and_gate_ranges():
  mixer = build_mixer("gated_deltanet", d_model=D, num_heads=H, allow_neg_eigval=True)
  x = 5 * jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a * 5 if a.ndim > 1 else a, params)
  q, k, v, beta, log_decay = mixer.apply(params, x, method=mixer._features)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(q), axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(k), axis=-1), 1.0, rtol=1e-5)
  beta = np.asarray(beta)
  assert beta.shape == (B, T, H) and beta.min() > 0 and beta.max() < 2 and beta.max() > 1
  decay = np.exp(np.asarray(log_decay))
  assert decay.shape == (B, T, H) and decay.min() > 0 and decay.max() <= 1
  assert decay.min() < 0.999


def test_delta_net_attention_matrix_reproduces_op_output():
  mixer = build_mixer("gated_deltanet", d_model=D, num_heads=H, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  q, k, v, beta, log_decay = mixer.apply(params, x, method=mixer._features)
  weights = mixer.apply(params, x, method=mixer.attention_matrix)
  assert weights.shape == (B, H, T, T)
  assert np.abs(np.asarray(jnp.triu(weights, 1))).max() == 0
  o = delta_rule(
    q, k, v, beta, scale=q.shape[-1] ** -0.5, log_decay=log_decay, implementation="xla"
  )
  assert relative_error(jnp.einsum("bhts,bshv->bthv", weights, v), o) < 1e-5


def test_delta_net_state_size_counts_conv_buffers():
  mixer = build_mixer("deltanet", d_model=64, num_heads=4, conv_size=4)
  assert mixer.state_size(512) == (4 * 16 * 16 + 3 * 3 * 64) * 4
  no_conv = build_mixer("deltanet", d_model=64, num_heads=4, use_short_conv=False)
  assert no_conv.state_size(512) == 4 * 16 * 16 * 4
