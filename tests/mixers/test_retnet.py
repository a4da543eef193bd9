"""retnet and lightning: decays and positions against the papers' formulas, the mixers'
attention matrices against hand-written decayed scores."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from attnzoo.mixers.lightning import alibi_slopes, lightning_log_decay
from attnzoo.mixers.retnet import retnet_log_decay
from attnzoo.ops.rotary import apply_rope
from tests.conftest import relative_error

D, B, T = 16, 2, 9


def test_retnet_decays():
  gamma = np.exp(np.asarray(retnet_log_decay(4), np.float64))
  np.testing.assert_allclose(gamma, [1 - 2**-5, 1 - 2**-6, 1 - 2**-7, 1 - 2**-8], rtol=1e-7)


def test_retnet_attention_matrix_and_state():
  mixer = build_mixer("retnet", d_model=D, num_heads=2, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  proj = lambda n: jnp.einsum("btd,dhf->bthf", x, params[n]["kernel"])
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  q, k = apply_rope(proj("q"), pos), apply_rope(proj("k"), pos)
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  s = np.einsum("bihf,bjhf->bhij", q, k) / math.sqrt(8)
  gamma = np.exp(np.asarray(retnet_log_decay(2), np.float64))
  n = np.arange(T)
  decay = np.where(
    n[:, None] >= n[None, :], gamma[:, None, None] ** (n[:, None] - n[None, :]).clip(0), 0.0
  )
  a = mixer.apply({"params": params}, x, method=mixer.attention_matrix)
  assert relative_error(a, s * decay) < 1e-5
  assert mixer.state_size(10) == 2 * 8 * 16 * 4  # value_factor 2


def test_alibi_slopes_and_layer_scaling():
  np.testing.assert_allclose(alibi_slopes(8), [2.0 ** -(i + 1) for i in range(8)])
  np.testing.assert_allclose(alibi_slopes(4), [2.0 ** -(2 * (i + 1)) for i in range(4)])
  assert len(alibi_slopes(6)) == 6
  first = np.asarray(lightning_log_decay(4, 0, 5))
  last = np.asarray(lightning_log_decay(4, 4, 5))
  np.testing.assert_allclose(first, -np.asarray(alibi_slopes(4)) * (1 + 1e-5), rtol=1e-6)
  np.testing.assert_allclose(last, -np.asarray(alibi_slopes(4)) * 1e-5, rtol=1e-5)


def test_lightning_lrpe_scores():
  """q'.k' = sum_i q_i k_i cos(theta_i (n - m)) with silu q, k, times lambda^(n-m)."""
  mixer = build_mixer(
    "lightning", d_model=D, num_heads=2, layer_idx=1, num_layers=4, implementation="xla"
  )
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  theta = np.asarray(params["lrpe_theta"], np.float64)
  np.testing.assert_allclose(theta, 10000.0 ** (-2 / 16 * np.arange(16)), rtol=1e-6)
  theta = theta.reshape(2, 8)  # [H, d/H]
  proj = lambda n: np.asarray(
    jax.nn.silu(jnp.einsum("btd,dhf->bthf", x, params[n]["kernel"])), np.float64
  )
  q, k = proj("q"), proj("k")
  n = np.arange(T)
  rel_pos = n[:, None] - n[None, :]
  cos = np.cos(theta[:, None, None, :] * rel_pos[None, :, :, None])  # [H, T, T, 8]
  s = np.einsum("bihf,bjhf,hijf->bhij", q, k, cos)
  lam = np.exp(np.asarray(lightning_log_decay(2, 1, 4), np.float64))
  decay = np.where(rel_pos >= 0, lam[:, None, None] ** rel_pos.clip(0), 0.0)
  a = mixer.apply({"params": params}, x, method=mixer.attention_matrix)
  assert relative_error(a, s * decay) < 1e-5
  assert mixer.state_size(10) == 2 * 16 * 8 * 4
