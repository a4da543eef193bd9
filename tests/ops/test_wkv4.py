"""wkv4: the quadratic, chunked and recurrent forms against a float64 loop (large keys
included), with initial state, packed segments, final state and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import wkv4 as W
from tests.conftest import relative_error

B, T, C = 2, 13, 5


def inputs(scale=1.0):
  keys = jax.random.split(jax.random.key(0), 4)
  k = scale * jax.random.normal(keys[0], (B, T, C))
  v = jax.random.normal(keys[1], (B, T, C))
  w = jnp.exp(jax.random.normal(keys[2], (C,)))
  u = jax.random.normal(keys[3], (C,))
  return k, v, w, u


def numpy_wkv(k, v, w, u):
  k, v, w, u = (np.asarray(a, np.float64) for a in (k, v, w, u))
  y = np.zeros_like(v)
  for t in range(k.shape[1]):
    logits = [k[:, i] - (t - 1 - i) * w for i in range(t)] + [u + k[:, t]]
    logits = np.stack(logits, 1)
    e = np.exp(logits - logits.max(1, keepdims=True))
    y[:, t] = (e * v[:, : t + 1]).sum(1) / e.sum(1)
  return y


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: e^k overflows float32 if computed naively
def test_forms_match_the_loop(scale):
  k, v, w, u = inputs(scale)
  ref = numpy_wkv(k, v, w, u)
  for fn in (W.reference, W.recurrent, lambda *a: W.chunked(*a, chunk=4), W.wkv4):
    y = jax.jit(fn)(k, v, w, u)
    assert np.isfinite(np.asarray(y)).all() and relative_error(y, ref) < 1e-5


def test_state_segments_and_gradients():
  k, v, w, u = inputs()
  x0 = W.recurrent(k, v, w, u, return_final_state=True)[1]
  seg = jnp.array([[0] * 5 + [1] * 8, [0] * T])
  unscaled = lambda s: s[:, :2] * jnp.exp(s[:, 2:])  # (p e^o, q e^o)
  kw = dict(initial_state=x0, return_final_state=True, segment_ids=seg)
  y0, f0 = jax.jit(lambda *a: W.recurrent(*a, **kw))(k, v, w, u)
  for fn in (W.reference, lambda *a, **kw: W.chunked(*a, chunk=4, **kw)):
    y, f = jax.jit(lambda *a: fn(*a, **kw))(k, v, w, u)
    assert relative_error(y, y0) < 1e-5 and relative_error(unscaled(f), unscaled(f0)) < 1e-5
  loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, segment_ids=seg)))
  chunked = lambda *a, **kw: W.chunked(*a, chunk=4, **kw)
  g1 = jax.jit(jax.grad(loss(chunked), argnums=(0, 1, 2, 3)))(k, v, w, u)
  g2 = jax.jit(jax.grad(loss(W.recurrent), argnums=(0, 1, 2, 3)))(k, v, w, u)
  for a, b in zip(g1, g2):
    assert relative_error(a, b) < 1e-5
