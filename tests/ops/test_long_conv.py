"""long_conv: FFT ≡ direct ≡ a numpy loop (forward and gradients), packed segments, the naive
decoding cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import Unsupported
from attnzoo.ops import long_conv as lc
from tests.conftest import relative_error

B, T, C = 2, 13, 5


def numpy_conv(u, k, seg=None):
  u, k = np.asarray(u, np.float64), np.asarray(k, np.float64)
  y = np.zeros_like(u)
  for b in range(u.shape[0]):
    for t in range(u.shape[1]):
      for s in range(t + 1):
        if t - s < k.shape[0] and (seg is None or seg[b, s] == seg[b, t]):
          y[b, t] += k[t - s] * u[b, s]
  return y


@pytest.mark.parametrize("taps", [9, 20])
def test_fft_and_direct_match_the_loop(taps):
  u = jax.random.normal(jax.random.key(0), (B, T, C))
  k = jax.random.normal(jax.random.key(1), (taps, C))
  ref = numpy_conv(u, k)
  for impl in ("fft", "direct", "auto"):
    y = jax.jit(lc.long_conv, static_argnames="implementation")(u, k, implementation=impl)
    assert relative_error(y, ref) < 1e-5, impl
  loss = lambda impl: lambda u, k: jnp.sum(jnp.sin(lc.long_conv(u, k, implementation=impl)))
  g_fft = jax.jit(jax.grad(loss("fft"), argnums=(0, 1)))(u, k)
  g_ref = jax.jit(jax.grad(lambda u, k: jnp.sum(jnp.sin(lc.reference(u, k))), argnums=(0, 1)))(u, k)
  for a, b in zip(g_fft, g_ref):
    assert relative_error(a, b) < 1e-5


def test_segments_and_fft_refusal():
  u = jax.random.normal(jax.random.key(2), (B, T, C))
  k = jax.random.normal(jax.random.key(3), (T, C))
  seg = jnp.array([[0] * 4 + [1] * 6 + [2] * 3, [5] * T])
  assert relative_error(lc.long_conv(u, k, segment_ids=seg), numpy_conv(u, k, seg)) < 1e-5
  with pytest.raises(Unsupported, match="no segment_ids"):
    lc.long_conv(u, k, segment_ids=seg, implementation="fft")
  assert lc.fft_size(13) == 27 and lc.fft_size(64) == 128 and lc.fft_size(7) == 15


def test_naive_cache_equals_the_full_convolution():
  u = jax.random.normal(jax.random.key(4), (B, T, C))
  k = jax.random.normal(jax.random.key(5), (T, C))
  state, outs = lc.init_state(B, T, C), []
  for start, stop in [(0, 4), *((t, t + 1) for t in range(4, T))]:
    state, y = lc.decode_window(state, u[:, start:stop], k)
    outs.append(y)
  assert int(state["index"]) == T
  assert relative_error(jnp.concatenate(outs, 1), lc.reference(u, k)) < 1e-5
