"""LTE: the visibility masks equal a brute-force top-b selection and respect the budget,
causality by gradients once tokens are evicted, decoding in chunks, bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from tests.conftest import decode_in_chunks, relative_error

D, B, T = 16, 2, 13
OPTIONS = dict(num_heads=2, window=4, sink_tokens=2, retained=2)


def make(**kw):
  return build_mixer("lte", d_model=D, **{**OPTIONS, **kw})


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def test_visibility_is_the_top_scores_within_the_budget():
  mixer, x = make(), x_input()
  params = mixer.init(jax.random.key(1), x)

  def masks(m, x):
    scores = m._scores(m.k(x))
    return scores, m.visibility(scores)

  scores, (local, retained) = jax.jit(lambda p, x: mixer.apply(p, x, method=masks))(params, x)
  scores, local, retained = map(np.asarray, (scores, local, retained))
  w, s, b = OPTIONS["window"], OPTIONS["sink_tokens"], OPTIONS["retained"]
  for i in range(B):
    for h in range(OPTIONS["num_heads"]):
      for t in range(T):
        candidates = sorted(range(s, t - w + 1), key=lambda j: (-scores[i, j, h], j))
        expected = np.zeros(T, bool)
        expected[candidates[:b]] = True
        np.testing.assert_array_equal(retained[i, h, t], expected)
        window = [j for j in range(T) if j <= t and (j > t - w or j < s)]
        assert local[i, h, t].nonzero()[0].tolist() == window
        visible = local[i, h, t] | retained[i, h, t]
        assert visible.sum() == min(t + 1, s + w + b)  # exactly the budget once it is full


def test_causal_once_tokens_are_evicted():
  mixer, x = make(), x_input()
  params = mixer.init(jax.random.key(1), x)
  seen = jax.jit(
    jax.vmap(
      lambda t: jnp.abs(jax.grad(lambda x: mixer.apply(params, x)[:, t].sum())(x)).sum((0, 2))
    )
  )(jnp.arange(T))
  seen = np.asarray(seen) > 0
  assert not np.triu(seen, 1).any()
  # the scores of evicted tokens (through the CNN and the gate) reach outputs outside the window
  assert seen[T - 1, : T - OPTIONS["window"]].any()


def test_decode_in_chunks():
  mixer, x = make(), x_input(3)
  params = jax.jit(mixer.init)(jax.random.key(4), x)["params"]
  full = jax.jit(mixer.apply)({"params": params}, x)
  decoded, _ = decode_in_chunks(
    mixer, {"params": params}, x, (6, 7, 13), key=4
  )  # prefill, a step, a chunk past the window
  assert relative_error(decoded, full) < 1e-5


def test_bad_options_are_errors():
  x = x_input()
  with pytest.raises(ValueError, match="must exceed the score's reach"):
    make(window=3).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="score_kernel must be odd"):
    make(score_kernel=2).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="lte does not take segment_ids"):
    make().init(jax.random.key(0), x, segment_ids=jnp.zeros((B, T), jnp.int32))
