"""linear_attention / lsa mixers and the feature maps of attnzoo.mixers.layers: each map against
its formula, the mixer against a hand-written quadratic form, decoding for every map, and
packed sequences (segment_ids) for every linear-attention family of this module set."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer, layers
from tests.conftest import relative_error

D, B, T = 16, 2, 11
MAPS = ["identity", "elu", "relu", "performer", "cosformer", "taylor"]


def x_input(seed=0, t=T):
  return jax.random.normal(jax.random.key(seed), (B, t, D))


def test_taylor_kernel_identity():
  ks = jax.random.split(jax.random.key(0), 2)
  d = 8
  q = jax.random.normal(ks[0], (5, d))
  k = jax.random.normal(ks[1], (7, d))
  phi_q, phi_k = layers.taylor_feature_map(q), layers.taylor_feature_map(k)
  assert phi_q.shape[-1] == layers.taylor_feature_size(d) == 1 + 8 + 36
  s = q @ k.T
  expected = 1 + s / math.sqrt(d) + s**2 / (2 * d)
  np.testing.assert_allclose(np.asarray(phi_q @ phi_k.T), np.asarray(expected), rtol=1e-5)
  assert layers.taylor_feature_size(16) == 153  # what Zoology's state_size counts


def test_elementwise_maps():
  x = jax.random.normal(jax.random.key(1), (2, 3, 2, 4))
  np.testing.assert_allclose(
    np.asarray(layers.feature_map("elu", x)),
    np.where(np.asarray(x) > 0, np.asarray(x) + 1, np.exp(np.asarray(x))),
    rtol=1e-6,
  )
  np.testing.assert_array_equal(
    np.asarray(layers.feature_map("relu", x)), np.maximum(np.asarray(x), 0)
  )
  assert layers.feature_map("identity", x) is x


def test_cosformer_reweighting():
  ks = jax.random.split(jax.random.key(2), 2)
  q = jax.random.normal(ks[0], (1, 6, 1, 4))
  k = jax.random.normal(ks[1], (1, 6, 1, 4))
  pos = jnp.arange(6)[None] * 7
  horizon = 50
  fq = layers.cosformer_feature_map(q, pos, horizon)[0, :, 0]
  fk = layers.cosformer_feature_map(k, pos, horizon)[0, :, 0]
  rq, rk = np.maximum(np.asarray(q[0, :, 0]), 0), np.maximum(np.asarray(k[0, :, 0]), 0)
  p = np.asarray(pos[0], np.float64)
  expected = (rq @ rk.T) * np.cos(np.pi * (p[:, None] - p[None, :]) / (2 * horizon))
  np.testing.assert_allclose(np.asarray(fq @ fk.T), expected, rtol=1e-5, atol=1e-6)


def test_performer_estimates_the_softmax_kernel():
  d, m = 8, 8192
  ks = jax.random.split(jax.random.key(3), 2)
  q = 0.5 * jax.random.normal(ks[0], (16, d))
  k = 0.5 * jax.random.normal(ks[1], (16, d))
  w = jnp.asarray(layers.performer_projection(0, d, m))
  assert w.shape == (d, m)
  np.testing.assert_array_equal(np.asarray(w), layers.performer_projection(0, d, m))
  est = layers.performer_feature_map(q, w) @ layers.performer_feature_map(k, w).T
  exact = jnp.exp(q @ k.T / math.sqrt(d))
  assert relative_error(est, exact) < 0.05
  assert float(layers.performer_feature_map(q, w).min()) > 0  # positive features


def quadratic(phi_q, phi_k, v, scale, normalize, eps=1e-6):
  """o_i = sum_{j<=i} s_ij v_j (/ sum_j s_ij), per head, float64."""
  phi_q, phi_k, v = (np.asarray(a, np.float64) for a in (phi_q, phi_k, v))
  s = np.einsum("bihf,bjhf->bhij", phi_q, phi_k) * scale
  s = s * np.tril(np.ones(s.shape[-2:]))
  o = np.einsum("bhij,bjhv->bihv", s, v)
  if normalize:
    o = o / (s.sum(-1).transpose(0, 2, 1)[..., None] + eps)
  return o


@pytest.mark.parametrize("feature_map", MAPS)
def test_mixer_matches_quadratic_form_and_decodes(feature_map):
  normalize = feature_map != "identity"
  mixer = build_mixer(
    "linear_attention",
    d_model=D,
    num_heads=2,
    feature_map=feature_map,
    feature_dim=4,
    normalize=normalize,
    cosformer_horizon=16,
    implementation="xla",
  )
  x = x_input()
  params = mixer.init(jax.random.key(0), x)["params"]
  full = mixer.apply({"params": params}, x)
  phi_q, phi_k = mixer.apply({"params": params}, x, None, method=lambda m, x, p: m._features(x, p))
  v = mixer.apply({"params": params}, x, method=lambda m, x: m.v(x))
  o = quadratic(phi_q, phi_k, v, mixer._scale(), normalize)
  ref = np.einsum("bthv,hvd->btd", o, np.asarray(params["out"]["kernel"], np.float64))
  assert relative_error(full, ref) < 1e-5
  # prompt of 4, then one token at a time
  cache = mixer.init(jax.random.key(0), x, decode=True)["cache"]
  outs = []
  for start, stop in [(0, 4)] + [(t, t + 1) for t in range(4, T)]:
    pos = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
    out, var = mixer.apply(
      {"params": params, "cache": cache},
      x[:, start:stop],
      positions=pos,
      decode=True,
      mutable=["cache"],
    )
    outs.append(out)
    cache = var["cache"]
  assert relative_error(jnp.concatenate(outs, axis=1), full) < 1e-5


def test_lsa_is_plain_causal_linear_attention():
  mixer = build_mixer("lsa", d_model=D, num_heads=2, scale=0.5, implementation="xla")
  x = x_input(1)
  params = mixer.init(jax.random.key(0), x)["params"]
  q, k, v = (
    np.einsum(
      "btd,dhf->bthf", np.asarray(x, np.float64), np.asarray(params[n]["kernel"], np.float64)
    )
    for n in "qkv"
  )
  o = quadratic(q, k, v, 0.5, normalize=False)
  ref = np.einsum("bthv,hvd->btd", o, np.asarray(params["out"]["kernel"], np.float64))
  assert relative_error(mixer.apply({"params": params}, x), ref) < 1e-5
  assert mixer.state_size(100) == 2 * 8 * 8 * 4


def test_normalised_attention_matrix_rows_sum_to_one():
  mixer = build_mixer(
    "linear_attention", d_model=D, num_heads=2, feature_map="elu", implementation="xla"
  )
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  a = mixer.apply(params, x, method=mixer.attention_matrix)
  assert a.shape == (B, 2, T, T)
  np.testing.assert_allclose(np.asarray(a.sum(-1)), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(jnp.triu(a, 1))).max() == 0


# Every linear-time mixer of this set, with options that make a quick check.
PACKED = {
  "base_conv": dict(),
  "linear_attention": dict(num_heads=2, feature_map="cosformer", cosformer_horizon=32),
  "lsa": dict(num_heads=2),
  "based": dict(num_heads=2, feature_dim=4),
  "retnet": dict(num_heads=2),
  "lightning": dict(num_heads=2),
  "mamba2": dict(d_state=4, head_dim=8),
}


@pytest.mark.parametrize("name", sorted(PACKED))
def test_packed_sequences_equal_separate_runs(name):
  """Two sequences packed in one row with segment_ids (positions restarting) give the same
  outputs as each run on its own."""
  kwargs = dict(PACKED[name])
  if name != "base_conv":
    kwargs["implementation"] = "xla"
  mixer = build_mixer(name, d_model=D, **kwargs)
  t1, t2 = 5, 7
  x = x_input(4, t1 + t2)
  params = mixer.init(jax.random.key(0), x)
  seg = jnp.asarray([[0] * t1 + [1] * t2] * B)
  pos = jnp.asarray([list(range(t1)) + list(range(t2))] * B)
  packed = mixer.apply(params, x, positions=pos, segment_ids=seg)
  first = mixer.apply(params, x[:, :t1])
  second = mixer.apply(params, x[:, t1:])
  assert relative_error(packed, jnp.concatenate([first, second], axis=1)) < 1e-5
