"""Contract tests run on every registered mixer: shapes, causality, decode ≡ full forward,
state_size equal to the bytes of the real decoding state."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import MIXERS, build_mixer
from tests.conftest import relative_error

# Options that exercise each mixer's interesting paths at small sizes.
TEST_KWARGS = {
    "attention": dict(num_heads=4, num_kv_heads=2, rope=True),
    "sliding_window": dict(num_heads=2, window=5),
}
D, B, T = 16, 2, 13


def make(name):
  return build_mixer(name, d_model=D, **TEST_KWARGS.get(name, {}))


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_shape_and_causality(name):
  mixer = make(name)
  x = x_input()
  params = mixer.init(jax.random.key(1), x)
  assert mixer.apply(params, x).shape == (B, T, D)
  t = 6  # d out[:, t] / d x[:, s] must vanish for s > t
  grad = jax.grad(lambda x: mixer.apply(params, x)[:, t].sum())(x)
  assert np.abs(np.asarray(grad[:, t + 1:])).max() == 0
  assert np.abs(np.asarray(grad[:, :t + 1])).max() > 0


@pytest.mark.parametrize("name", sorted(MIXERS))
@pytest.mark.parametrize("prefill", [1, 4])
def test_decode_equals_forward(name, prefill):
  mixer = make(name)
  x = x_input(2)
  params = mixer.init(jax.random.key(3), x)["params"]
  full = mixer.apply({"params": params}, x)
  cache = mixer.init(jax.random.key(3), x, decode=True)["cache"]
  outs, start = [], 0
  for stop in [prefill, *range(prefill + 1, T + 1)]:
    positions = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
    out, variables = mixer.apply({"params": params, "cache": cache}, x[:, start:stop],
                                 positions=positions, decode=True, mutable=["cache"])
    outs.append(out)
    cache, start = variables["cache"], stop
  assert relative_error(jnp.concatenate(outs, axis=1), full) < 1e-5


@pytest.mark.parametrize("name", sorted(MIXERS))
def test_state_size_is_the_decoding_state(name):
  """state_size(T) = bytes (at float32) of the floating-point arrays decoding keeps."""
  mixer = make(name)
  cache = mixer.init(jax.random.key(0), x_input(), decode=True)["cache"]
  floats = [a for a in jax.tree.leaves(cache) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert mixer.state_size(T) * B == sum(a.size * 4 for a in floats)


def test_attention_state_sizes():
  assert build_mixer("attention", d_model=64, num_heads=1).state_size(64) == 2 * 64 * 64 * 4
  gqa = build_mixer("attention", d_model=64, num_heads=8, num_kv_heads=2)
  assert gqa.state_size(100) == 2 * 100 * 2 * 8 * 4
  window = build_mixer("sliding_window", d_model=64, num_heads=4, window=16)
  assert window.state_size(1000) == 2 * 16 * 64 * 4
  assert window.state_size(8) == 2 * 8 * 64 * 4


def test_sliding_window_sees_only_the_window():
  mixer = build_mixer("sliding_window", d_model=D, num_heads=2, window=4)
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: mixer.apply(params, x)[:, 10].sum())(x)
  seen = np.abs(np.asarray(grad)).sum(axis=(0, 2)) > 0
  assert seen.tolist() == [False] * 7 + [True] * 4 + [False] * 2


def test_attention_matrix_rows_are_distributions():
  mixer = make("attention")
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  weights = mixer.apply(params, x, method=mixer.attention_matrix)
  assert weights.shape == (B, 4, T, T)
  np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(jnp.triu(weights, 1))).max() == 0


def test_bad_options_are_errors():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    build_mixer("attention", d_model=10, num_heads=3).init(jax.random.key(0), jnp.zeros((1, 4, 10)))
  with pytest.raises(ValueError, match="has no option"):
    build_mixer("attention", d_model=10, nonsense=1)
  with pytest.raises(ValueError, match="unknown mixer"):
    build_mixer("no_such_mixer", d_model=10)
