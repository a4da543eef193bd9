"""prefix_attention (Aaren): the associative scan ≡ the quadratic form ≡ the recurrent step,
forward, final state and gradients, with an initial state and packed segments; and the
equivalence with RWKV-4's WKV at decay and bonus 0."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.ops import prefix_attention as P
from attnzoo.ops import wkv4
from tests.conftest import relative_error

B, T, H, D = 2, 13, 3, 5


def inputs(scale=1.0):
  ks, kv = jax.random.split(jax.random.key(0))
  return scale * jax.random.normal(ks, (B, T, H)), jax.random.normal(kv, (B, T, H, D))


def loop(s, v):
  s, v = np.asarray(s, np.float64), np.asarray(v, np.float64)
  o = np.zeros_like(v)
  for t in range(T):
    e = np.exp(s[:, : t + 1] - s[:, : t + 1].max(1, keepdims=True))
    o[:, t] = np.einsum("bih,bihd->bhd", e, v[:, : t + 1]) / e.sum(1)[..., None]
  return o


def test_scan_equals_quadratic_equals_recurrent():
  s, v = inputs(60.0)  # e^s overflows float32 if computed naively
  k = jnp.broadcast_to(s[..., None], v.shape).reshape(B, T, H * D)
  zero = jnp.zeros(H * D)

  @jax.jit
  def run(s, v):
    forms = [fn(s, v) for fn in (P.reference, P.recurrent, P.prefix_attention)]
    # per channel it is WKV-4 with no decay and no bonus
    return forms + [wkv4.reference(k, v.reshape(B, T, -1), zero, zero).reshape(v.shape)]

  ref = loop(s, v)
  for o in run(s, v):
    assert np.isfinite(np.asarray(o)).all() and relative_error(o, ref) < 1e-5


def test_state_segments_and_gradients():
  """With an initial state and packed segments: outputs and final states of the three forms,
  and the gradients of the scan against the quadratic form's."""
  s, v = inputs()
  seg = jnp.array([[0] * 5 + [1] * 8, [0] * T])
  unscaled = lambda st: st[..., :-1] * jnp.exp(st[..., -1:])  # (w e^m, u e^m)

  @jax.jit
  def run(s, v):
    x0 = P.recurrent(s[:, ::-1], v, return_final_state=True)[1]
    kw = dict(initial_state=x0, return_final_state=True, segment_ids=seg)
    outs = [fn(s, v, **kw) for fn in (P.recurrent, P.reference, P.scan)]
    loss = lambda fn: lambda *a: jnp.sum(jnp.sin(fn(*a, initial_state=x0, segment_ids=seg)))
    return outs, [jax.grad(loss(fn), (0, 1))(s, v) for fn in (P.scan, P.reference)]

  ((o0, f0), *rest), (g1, g2) = run(s, v)
  for o, f in rest:
    assert relative_error(o, o0) < 1e-5 and relative_error(unscaled(f), unscaled(f0)) < 1e-5
  for a, b in zip(g1, g2):
    assert relative_error(a, b) < 1e-5
