"""gaussian_attention (GAAM over time): the whole-sequence form against a numpy transcription
of the paper's formula; causal scan ≡ masked-sum reference ≡ recurrent step, forward, final
state and gradients, with an initial state and packed segments."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.ops import gaussian_attention as G
from tests.conftest import relative_error

B, T, H, D, NG = 2, 11, 3, 2, 3


def inputs():
  keys = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(keys[0], (B, T, H, D))
  return x, 0.3 * jax.random.normal(keys[1], (H, NG)), 1 + jax.random.uniform(keys[2], (H, NG))


def test_forms():
  """The whole-sequence form against a numpy transcription of the paper's code; the causal
  scan ≡ masked-sum reference ≡ recurrent step, with an initial state and packed segments,
  forward, final state and gradients."""
  x, offsets, c = inputs()
  seg = jnp.array([[0] * 4 + [1] * 7, [0] * T])

  @jax.jit
  def run(x, offsets, c):
    whole = G.gaussian_attention(x, offsets, c, causal=False)
    x0 = G.recurrent(x[:, ::-1], offsets, c, return_final_state=True)[1]
    kw = dict(initial_state=x0, return_final_state=True, segment_ids=seg)
    outs = [fn(x, offsets, c, **kw) for fn in (G.recurrent, G.reference, G.scan)]
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, initial_state=x0, segment_ids=seg)))
    grads = [jax.grad(loss(fn), (0, 1, 2))(x, offsets, c) for fn in (G.reference, G.scan)]
    return whole, outs, grads

  whole, outs, grads = run(x, offsets, c)
  xn, dn, cn = (np.asarray(a, np.float64) for a in (x, offsets, c))
  mean, var = xn.mean(1, keepdims=True), xn.var(1, keepdims=True) + 1e-8
  mix = np.ones_like(xn)
  for g in range(NG):
    z = (xn - mean - dn[:, g, None]) / np.sqrt(var)
    mix *= np.exp(-(z**2) / (2 * cn[:, g, None] ** 2)) / np.sqrt(2 * np.pi * cn[:, g, None] ** 2)
  mix /= mix.sum(1, keepdims=True)
  assert relative_error(whole, xn * mix) < 1e-5
  (y0, f0), *rest = outs
  for y, f in rest:
    assert relative_error(y, y0) < 1e-5 and relative_error(f, f0) < 1e-5
  for a, b in zip(*grads):
    assert np.isfinite(np.asarray(a)).all() and relative_error(a, b) < 1e-4
