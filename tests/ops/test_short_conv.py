"""attnzoo.ops.short_conv: reference == explicit loop == recurrent `step`, segments, chaining."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers.layers import ShortConv, state_bytes
from attnzoo.ops import short_conv as sc

B, T, C = 2, 11, 5


def rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(k, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  x = jax.random.normal(ks[0], (B, T, C))
  w = jax.random.normal(ks[1], (k, C))
  bias = jax.random.normal(ks[2], (C,))
  h0 = jax.random.normal(ks[3], (B, k - 1, C))
  return x, w, bias, h0


def segments():
  seg = np.zeros((B, T), np.int32)
  seg[0, 4:] = 1
  seg[0, 6:] = 2  # a segment shorter than the kernel
  seg[1, 9:] = 5
  return jnp.asarray(seg)


def loop(x, w, bias, h0, seg):
  """y_t = bias + sum_i w[i] x_{t-(K-1)+i}, only over the same segment (numpy)."""
  x, w, bias, h0, seg = map(np.asarray, (x, w, bias, h0, seg))
  k = w.shape[-2]
  y = np.zeros(x.shape)
  for b in range(B):
    for t in range(T):
      y[b, t] = bias
      for i in range(k):
        s = t - (k - 1) + i
        if s >= 0 and seg[b, s] == seg[b, t]:
          y[b, t] += (w[i] if w.ndim == 2 else w[b, t, i]) * x[b, s]
        elif s < 0 and seg[b, t] == seg[b, 0]:
          y[b, t] += (w[i] if w.ndim == 2 else w[b, t, i]) * h0[b, k - 1 + s]
  return y


@pytest.mark.parametrize("k", [1, 3, 4])
def test_reference_matches_loop_and_recurrent(k):
  x, w, bias, h0 = inputs(k)
  seg = segments()
  y, hT = sc.reference(x, w, bias, initial_state=h0, segment_ids=seg, return_final_state=True)
  assert rel(y, loop(x, w, bias, h0, seg)) < 1e-6
  y2, hT2 = sc.recurrent(x, w, bias, initial_state=h0, segment_ids=seg, return_final_state=True)
  assert rel(y2, y) < 1e-6
  np.testing.assert_allclose(np.asarray(hT2), np.asarray(hT), atol=1e-6)
  y3 = sc.short_conv(x, w, bias, initial_state=h0, segment_ids=seg, implementation="xla")
  assert rel(y3, y) < 1e-6


def test_per_position_weights():
  """Dynamic convolution weights [B,T,K,C]: reference == loop == recurrent, with gradients."""
  rng = np.random.default_rng(3)
  x, w, bias, h0 = (
    rng.standard_normal(s).astype(np.float32) for s in ((B, T, C), (B, T, 3, C), (C,), (B, 2, C))
  )
  seg = segments()

  @jax.jit
  def run(x, w, bias, h0):
    forms = []
    for fn in (sc.reference, sc.recurrent):
      f = lambda *a: fn(*a[:3], initial_state=a[3], segment_ids=seg)
      y, pullback = jax.vjp(f, x, w, bias, h0)
      forms.append((y, pullback(jnp.sin(y))))
    return forms

  (y, g), (y2, g2) = run(x, w, bias, h0)
  assert rel(y, loop(x, w, bias, h0, seg)) < 1e-6 and rel(y2, y) < 1e-6
  assert all(rel(a, b) < 1e-5 for a, b in zip(g2, g))


def test_chaining_and_step():
  k = 4
  x, w, bias, _ = inputs(k, seed=1)
  full = sc.short_conv(x, w, bias)
  y1, s = sc.short_conv(x[:, :5], w, bias, return_final_state=True)
  y2, s = sc.short_conv(x[:, 5:7], w, bias, initial_state=s, return_final_state=True)
  outs = [y1, y2]
  for t in range(7, T):
    s, yt = sc.step(s, x[:, t], w, bias)
    outs.append(yt[:, None])
  assert rel(jnp.concatenate(outs, axis=1), full) < 1e-6
  np.testing.assert_allclose(np.asarray(s), np.asarray(x[:, -3:]), atol=0)


def test_final_state_zero_before_last_segment():
  k = 4
  x, w, bias, _ = inputs(k)
  seg = jnp.asarray(np.repeat([[0] * (T - 2) + [1, 1]], B, axis=0))
  _, s = sc.short_conv(x, w, bias, segment_ids=seg, return_final_state=True)
  np.testing.assert_array_equal(np.asarray(s[:, 0]), 0.0)
  np.testing.assert_allclose(np.asarray(s[:, 1:]), np.asarray(x[:, -2:]))


def test_gradients_match_recurrent():
  x, w, bias, h0 = inputs(3)
  seg = segments()
  f = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a[:3], initial_state=a[3], segment_ids=seg)))
  g1 = jax.grad(f(sc.reference), argnums=(0, 1, 2, 3))(x, w, bias, h0)
  g2 = jax.grad(f(sc.recurrent), argnums=(0, 1, 2, 3))(x, w, bias, h0)
  for a, b in zip(g1, g2):
    assert rel(a, b) < 1e-5


def test_bad_shapes_are_errors():
  x, w, bias, _ = inputs(3)
  with pytest.raises(ValueError, match="weight"):
    sc.short_conv(x, w[:, :2])
  with pytest.raises(ValueError, match="initial_state"):
    sc.short_conv(x, w, initial_state=jnp.zeros((B, 3, C)))


def test_layer_decode_equals_forward():
  layer = ShortConv(kernel_size=4, activation="silu")
  x = jax.random.normal(jax.random.key(0), (B, T, C))
  params = layer.init(jax.random.key(1), x)["params"]
  full = layer.apply({"params": params}, x)
  cache = layer.init(jax.random.key(1), x, decode=True)["cache"]
  assert sum(a.size * 4 for a in jax.tree.leaves(cache)) == B * state_bytes((3, C))
  outs = []
  for start, stop in [(0, 3), (3, 4), (4, 8), *[(t, t + 1) for t in range(8, T)]]:
    out, var = layer.apply(
      {"params": params, "cache": cache}, x[:, start:stop], decode=True, mutable=["cache"]
    )
    outs.append(out)
    cache = var["cache"]
  assert rel(jnp.concatenate(outs, axis=1), full) < 1e-6
