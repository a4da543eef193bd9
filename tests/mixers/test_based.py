"""based and base_conv: the Taylor attention against its closed form, state sizes as Zoology
counts them, BaseConv against its formula."""

import jax
import numpy as np

from attnzoo.mixers import build_mixer
from attnzoo.models.backbone import layer_mixers
from tests.conftest import relative_error

D, B, T = 16, 2, 9


def test_based_matches_taylor_attention():
  fd = 4
  mixer = build_mixer("based", d_model=D, num_heads=2, feature_dim=fd, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  proj = lambda n: np.einsum(
    "btd,dhf->bthf", np.asarray(x, np.float64), np.asarray(params[n]["kernel"], np.float64)
  )
  q, k, v = proj("q"), proj("k"), proj("v")
  s = np.einsum("bihf,bjhf->bhij", q, k)
  a = (1 + s / np.sqrt(fd) + s**2 / (2 * fd)) * np.tril(np.ones((T, T)))
  a = a / a.sum(-1, keepdims=True)
  o = np.einsum("bhij,bjhv->bihv", a, v)
  ref = np.einsum("bthv,hvd->btd", o, np.asarray(params["out"]["kernel"], np.float64))
  assert relative_error(mixer.apply({"params": params}, x), ref) < 1e-5
  weights = mixer.apply({"params": params}, x, method=mixer.attention_matrix)
  assert relative_error(weights, a) < 1e-5


def test_based_state_size():
  # 1 head, feature_dim 16: 153 Taylor features x (d_model values + 1 normaliser column)
  assert build_mixer("based", d_model=64).state_size(512) == 153 * 65 * 4
  assert (
    build_mixer("based", d_model=64, num_heads=4, feature_dim=8).state_size(1) == 4 * 45 * 17 * 4
  )


def test_base_conv_formula():
  mixer = build_mixer("base_conv", d_model=D, kernel_size=3)
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  xn = np.asarray(x, np.float64)
  w = np.asarray(params["conv"]["kernel"], np.float64)  # [3, D], w[2] on the current
  conv = np.asarray(params["conv"]["bias"], np.float64) + sum(
    w[2 - i] * np.pad(xn, [(0, 0), (i, 0), (0, 0)])[:, :T] for i in range(3)
  )
  lin = xn @ np.asarray(params["projection"]["kernel"]) + np.asarray(params["projection"]["bias"])
  assert relative_error(mixer.apply({"params": params}, x), conv * lin + xn) < 1e-6
  assert mixer.state_size(1000) == 2 * D * 4


def test_based_recipe_hybrid_cycles_over_layers():
  names = [
    n
    for n, _ in layer_mixers(
      ["base_conv", "based", "sliding_window"], {"based": {"feature_dim": 16}}, 6
    )
  ]
  assert names == ["base_conv", "based", "sliding_window"] * 2
