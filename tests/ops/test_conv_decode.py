"""Fast generation through a long convolution: FutureFill ≡ the naive cache ≡ the convolution
of the generated inputs; distillation recovers a filter that is a sum of exponentials, and
its SSM decode matches the naive one."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import conv_decode as cd
from attnzoo.ops import diag_ssm as ds
from attnzoo.ops import long_conv as lc
from tests.conftest import relative_error

B, C, L = 2, 3, 24


def feedback():
  emb = jax.random.normal(jax.random.key(1), (C, C))
  u0 = jax.random.normal(jax.random.key(2), (B, C))
  return u0, lambda t, y: jnp.tanh(y @ emb) + 0.01 * t


def test_futurefill_equals_naive():
  u0, next_input = feedback()
  kernel = jax.random.normal(jax.random.key(0), (L, C)) * jnp.exp(-jnp.arange(L) / 8)[:, None]
  us, ys = jax.jit(lambda u0: cd.generate_naive(u0, kernel, next_input, L))(u0)
  assert relative_error(ys, lc.reference(us, kernel)) < 1e-5
  us2, ys2 = jax.jit(lambda u0: cd.generate_futurefill(u0, kernel, next_input, L, 6))(u0)
  assert relative_error(ys2, ys) < 1e-5 and relative_error(us2, us) < 1e-5
  with pytest.raises(ValueError, match="multiple of epoch"):
    cd.generate_futurefill(u0, kernel, next_input, L, 5)


def test_distilled_ssm_decodes_like_the_filter():
  a = jnp.asarray(ds.s4d_eigenvalues(8, "lin"))[None].repeat(C, 0)
  log_da, b_bar = ds.discretize(jnp.array([0.1, 0.2, 0.3]), a, "zoh")
  kernel = ds.kernel(log_da, (1 + 1j) * b_bar, 64)  # 4 conjugate pairs: order 8 is exact
  log_da2, w2 = cd.distill_modal(np.asarray(kernel), order=8)
  assert relative_error(ds.kernel(log_da2, w2, 64), kernel) < 1e-4
  u0, next_input = feedback()
  _, ys = jax.jit(lambda u0: cd.generate_ssm(u0, log_da2, w2, next_input, L))(u0)
  _, ref = jax.jit(lambda u0: cd.generate_naive(u0, kernel, next_input, L))(u0)
  assert relative_error(ys, ref) < 1e-4
