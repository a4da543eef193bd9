"""diag_ssm: the closed-form kernel against powers of dA, convolution form ≡ recurrence
(initial state, packed segments, final state, gradients), discretisations and initialisations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import diag_ssm as ds
from tests.conftest import relative_error

B, T, G, R, N = 2, 13, 3, 2, 4  # channels C = G * R share an SSM per group


def complex_error(x, ref):
  x, ref = np.asarray(x), np.asarray(ref)
  return relative_error(np.stack([x.real, x.imag]), np.stack([ref.real, ref.imag]))


def ssm_params(method, key=0):
  a = jnp.asarray(ds.s4d_eigenvalues(2 * N, "lin"))[None].repeat(G, 0)
  dt = jnp.array([0.01, 0.1, 0.5])
  log_da, b_bar = ds.discretize(dt, a, method)
  k1, k2 = jax.random.split(jax.random.key(key))
  c = jax.lax.complex(jax.random.normal(k1, (G, N)), jax.random.normal(k2, (G, N)))
  return a, dt, log_da, c * b_bar


@pytest.mark.parametrize("method", ["zoh", "bilinear"])
def test_discretization_and_kernel(method):
  a, dt, log_da, w = ssm_params(method)
  a64, dt64 = np.asarray(a, np.complex128), np.asarray(dt, np.float64)[:, None]
  if method == "zoh":
    da, bb = np.exp(dt64 * a64), (np.exp(dt64 * a64) - 1) / a64
  else:
    da, bb = (1 + dt64 * a64 / 2) / (1 - dt64 * a64 / 2), dt64 / (1 - dt64 * a64 / 2)
  assert complex_error(np.exp(np.asarray(log_da)), da) < 1e-6
  assert complex_error(ds.discretize(dt, a, method)[1], bb) < 1e-6
  ref = np.stack([2 * np.real((np.asarray(w) * da**l).sum(-1)) for l in range(T)])
  assert relative_error(ds.kernel(log_da, w, T), ref) < 1e-5


def test_convolution_form_equals_recurrence():
  _, _, log_da, w = ssm_params("zoh", key=1)
  u = jax.random.normal(jax.random.key(2), (B, T, G * R))
  x0 = jax.random.normal(jax.random.key(3), (B, G * R, N, 2))
  seg = jnp.array([[0] * 5 + [1] * 8, [3] * T])
  kw = dict(initial_state=x0, return_final_state=True, segment_ids=seg)
  y1, f1 = jax.jit(lambda *a: ds.diag_ssm(*a, **kw))(u, log_da, w)
  y2, f2 = jax.jit(lambda *a: ds.recurrent(*a, **kw))(u, log_da, w)
  assert relative_error(y1, y2) < 1e-5 and relative_error(f1, f2) < 1e-5
  loss = lambda fn: lambda u, la, w: jnp.sum(jnp.sin(fn(u, la, w, initial_state=x0)))
  g1 = jax.jit(jax.grad(loss(ds.reference), argnums=(0, 1, 2)))(u, log_da, w)
  g2 = jax.jit(jax.grad(loss(ds.recurrent), argnums=(0, 1, 2)))(u, log_da, w)
  for a, b in zip(g1, g2):
    assert complex_error(a, b) < 1e-4


def test_initialisations():
  n = np.arange(4)
  np.testing.assert_allclose(ds.s4d_eigenvalues(8, "lin"), -0.5 + 1j * np.pi * n)
  np.testing.assert_allclose(ds.s4d_eigenvalues(8, "inv").imag, (8 / np.pi) * (8 / (2 * n + 1) - 1))
  # LegS: the normal part of A + P P^T (A the HiPPO-LegS matrix, P_n = sqrt(n + 1/2))
  m = np.arange(8)
  legs = -np.where(m[:, None] > m, np.sqrt((2 * m[:, None] + 1) * (2 * m + 1)), 0.0)
  legs -= np.diag(m + 1.0)
  p = np.sqrt(m + 0.5)
  eig = np.linalg.eigvals(legs + np.outer(p, p))
  np.testing.assert_allclose(
    np.sort(eig[eig.imag > 0].imag), ds.legs_eigenvalues(8).imag, rtol=1e-6
  )
  np.testing.assert_allclose(eig.real, -0.5, atol=1e-6)


def test_auto_takes_the_recurrence_for_long_packed_sequences():
  u, seg = jnp.zeros((1, 80, 2)), jnp.zeros((1, 80), jnp.int32)
  kw = dict(log_da=jnp.zeros((2, 2)), w=jnp.zeros((2, 2)), initial_state=None)
  kw.update(return_final_state=False)
  assert ds.dispatcher.choose("auto", u=u, segment_ids=seg, **kw) == "recurrent"
  assert ds.dispatcher.choose("auto", u=u, segment_ids=None, **kw) == "xla"
  assert ds.dispatcher.choose("auto", u=u[:, :13], segment_ids=seg[:, :13], **kw) == "xla"
