"""HGRN-2: forget gate above its learned lower bound, key = 1 - forget gate, no bound at the
first layer, and the bound's initial value rising with depth."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer

B, T, D = 2, 9, 16


def gates(layer_idx, num_layers, scale=1.0, bound=None):
  mixer = build_mixer(
    "hgrn2",
    d_model=D,
    num_heads=2,
    layer_idx=layer_idx,
    num_layers=num_layers,
    implementation="xla",
  )
  x = 4 * jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  params = jax.tree.map(lambda a: a * scale, params)
  if bound is not None:
    params["params"]["bound_logit"] = jnp.full_like(params["params"]["bound_logit"], bound)
  log_f, key = mixer.apply(params, x, method=mixer.gates)
  return params, np.exp(np.asarray(log_f, np.float64)), np.asarray(key, np.float64)


def test_first_layer_has_no_lower_bound():
  params, f, key = gates(0, 4, scale=20.0)
  assert "bound_logit" not in params["params"]
  assert f.min() < 1e-3 and f.max() <= 1.0
  np.testing.assert_allclose(key, 1 - f, atol=1e-6)


def test_forget_gate_respects_lower_bound():
  beta = 1 / (1 + np.exp(-0.7))
  params, f, key = gates(2, 4, scale=20.0, bound=0.7)
  assert f.min() >= beta - 1e-6 and f.max() <= 1.0
  assert f.min() < beta + 1e-3  # saturated gates reach the bound
  np.testing.assert_allclose(key, 1 - f, atol=1e-6)


def test_lower_bound_initialised_by_depth():
  for layer, layers in [(1, 4), (3, 4), (2, 3)]:
    params, _, _ = gates(layer, layers)
    beta = jax.nn.sigmoid(params["params"]["bound_logit"])
    np.testing.assert_allclose(np.asarray(beta), layer / layers, rtol=1e-5)


def test_hgrn2_state_expansion_size():
  mixer = build_mixer("hgrn2", d_model=64, num_heads=4, expand_ratio=32)
  assert mixer.state_size(1000) == 4 * 32 * 16 * 4
  assert build_mixer("hgrn2", d_model=64).state_size(10) == 64 * 64 * 4
