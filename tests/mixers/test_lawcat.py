"""LAWCAT: positive shared features, normalised attention rows, conv reach, and the output is
the output projection of (hidden attention) @ values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

B, T, D, H = 2, 10, 16, 2


@pytest.mark.parametrize("gate", ["vector", "scalar", "none"])
def test_lawcat_rows_normalised_and_output_consistent(gate):
  mixer = build_mixer("lawcat", d_model=D, num_heads=H, gate=gate, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  weights = np.asarray(mixer.apply(params, x, method=mixer.attention_matrix), np.float64)
  assert weights.shape == (B, H, T, T)
  assert weights.min() >= 0 and np.abs(np.triu(weights, 1)).max() == 0
  np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-4)
  _, _, v, _ = mixer.apply(params, x, method=mixer._features)
  o = jnp.einsum("bhts,bshv->bthv", weights, v)
  expected = jnp.einsum("bthv,hvd->btd", o, params["params"]["out"]["kernel"])
  assert relative_error(mixer.apply(params, x), expected) < 1e-4


def test_lawcat_features_positive_and_shared():
  mixer = build_mixer("lawcat", d_model=D, num_heads=H, feature_dim=3)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  q, k, _, log_decay = mixer.apply(params, x, method=mixer._features)
  assert q.shape == k.shape == log_decay.shape == (B, T, H, 6)
  assert float(q.min()) > 0 and float(k.min()) > 0
  u = jax.random.normal(jax.random.key(2), (B, T, H, D // H))
  same = mixer.apply(params, u, method=mixer.phi)
  np.testing.assert_allclose(np.asarray(same[..., :3].sum(-1)), 1.0, rtol=1e-5)


def test_lawcat_conv_reaches_three_tokens_back():
  """With the gate and values fixed, q~_t sees x_{t-3..t}: changing x_s moves the query
  features at s..s+3 only."""
  mixer = build_mixer("lawcat", d_model=D, num_heads=H, conv_size=4)
  x = jax.random.normal(jax.random.key(0), (1, T, D))
  params = mixer.init(jax.random.key(1), x)
  q0 = mixer.apply(params, x, method=mixer._features)[0]
  q1 = mixer.apply(params, x.at[:, 3].add(1.0), method=mixer._features)[0]
  moved = np.abs(np.asarray(q1 - q0)).sum(axis=(0, 2, 3)) > 0
  assert moved.tolist() == [False] * 3 + [True] * 4 + [False] * (T - 7)
