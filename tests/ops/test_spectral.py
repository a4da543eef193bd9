"""attnzoo.ops.spectral: FNet's Fourier mixing and FFTNet's spectral filter, the explicit-DFT
reference == the FFT form (forward and gradients) on odd sizes; packed segments are
transformed on their own."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import spectral
from tests.conftest import relative_error as rel
from tests.conftest import slow


def value_and_grad(fn, *args):
  """fn(*args) and the gradient of <fn(*args), g> for a fixed random g, w.r.t. every arg."""
  out = fn(*args)
  g = jnp.asarray(np.random.default_rng(9).standard_normal(out.shape), jnp.float32)
  return out, jax.grad(lambda *a: jnp.sum(fn(*a) * g), argnums=tuple(range(len(args))))(*args)


def test_fourier_mix_forms_agree_and_segments_stay_apart():
  x = np.random.default_rng(0).standard_normal((2, 13, 6)).astype(np.float32)
  seg = np.array([[0] * 5 + [1] * 8, [0] * 13])

  @jax.jit
  def run(x):
    forms = [
      value_and_grad(lambda x: spectral.fourier_mix(x, implementation=i), x)
      for i in ("reference", "fft")
    ]
    return forms, spectral.fourier_mix(x, segment_ids=seg)

  ((ref, g_ref), (fft, g_fft)), packed = run(x)
  np.testing.assert_allclose(ref, np.real(np.fft.fft2(x, axes=(1, 2))), atol=1e-4)
  assert rel(fft, ref) < 1e-5 and rel(g_fft[0], g_ref[0]) < 1e-5
  alone = lambda piece: np.real(np.fft.fft2(piece, axes=(1, 2)))
  np.testing.assert_allclose(packed[:1, :5], alone(x[:1, :5]), atol=1e-4)
  np.testing.assert_allclose(packed[:1, 5:], alone(x[:1, 5:]), atol=1e-4)
  assert rel(packed[1], ref[1]) < 1e-5


@pytest.mark.parametrize(  # padded, even length (a Nyquist bin); unpadded, odd length
  "steps,length", [(13, 16), pytest.param(9, 9, marks=slow)]
)
def test_spectral_filter_forms_agree(steps, length):
  rng = np.random.default_rng(1)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  bins = length // 2 + 1
  x, weight = normal(2, steps, 3, 4), 1 + 0.5 * normal(2, 3, bins)
  bias = 0.3 * normal(3, bins) - 0.2  # some bins cut by the ReLU

  @jax.jit
  def run(x, weight, bias):
    forms = [
      value_and_grad(
        lambda *a: spectral.spectral_filter(*a, length=length, implementation=i), x, weight, bias
      )
      for i in ("reference", "fft")
    ]
    ones, zeros = jnp.ones((2, 3, bins)), jnp.zeros((3, bins))
    return forms, spectral.spectral_filter(x, ones, zeros, length=length)

  ((ref, g_ref), (fft, g_fft)), same = run(x, weight, bias)
  assert rel(fft, ref) < 1e-5
  assert all(rel(a, b) < 1e-5 for a, b in zip(g_fft, g_ref))
  assert rel(same, x) < 1e-5  # a unit filter and zero modReLU bias: the round trip returns x
