"""attnzoo.ops.selective_scan: associative-scan reference == lax.scan recurrence == chunked "xla"
(forward and gradients, segments, initial state, with and without softplus), dispatch and
argument checks. Chaining through the final state is the mamba mixer's decode test."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import Unsupported
from attnzoo.ops import selective_scan as ss
from pallas_kernels import selective_scan as kernels
from tests.conftest import relative_error as rel

DIFF = ("x", "delta", "A", "B", "C", "D", "delta_bias", "initial_state")


def make_inputs(b, t, d, n, *, softplus=True, segmented=True, dtype=jnp.float32, seed=0):
  """Random inputs; without softplus the raw delta is positive (a decaying recurrence)."""
  ks = jax.random.split(jax.random.key(seed), 8)
  normal = lambda i, shape: jax.random.normal(ks[i], shape)
  delta = normal(1, (b, t, d)) - 1.0
  if not softplus:
    delta = jax.nn.softplus(delta)
  seg = None
  if segmented:
    seg = np.zeros((b, t), np.int32)
    seg[0, t // 2 :] = 1
    seg[-1, 3:] = 4
    seg = jnp.asarray(seg)
  return dict(
    x=normal(0, (b, t, d)).astype(dtype),
    delta=delta.astype(dtype),
    A=-jnp.exp(0.5 * normal(2, (d, n))),
    B=normal(3, (b, t, n)).astype(dtype),
    C=normal(4, (b, t, n)).astype(dtype),
    D=normal(5, (d,)),
    delta_bias=0.3 * normal(6, (d,)),
    initial_state=normal(7, (b, d, n)),
    segment_ids=seg,
    delta_softplus=softplus,
  )


def outputs_and_grads(fn, inputs):
  """(y, final_state, {name: gradient}) of a fixed random projection of (y, final_state)."""
  names = [n for n in DIFF if inputs.get(n) is not None]
  rest = {n: v for n, v in inputs.items() if n not in names}

  def loss(diff):
    y, h = fn(**diff, **rest)
    wy = jnp.cos(jnp.arange(y.size, dtype=jnp.float32)).reshape(y.shape)
    wh = jnp.sin(jnp.arange(h.size, dtype=jnp.float32)).reshape(h.shape)
    return jnp.sum(y.astype(jnp.float32) * wy) + jnp.sum(h * wh), (y, h)

  (_, (y, h)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
    {n: inputs[n] for n in names}
  )
  return y, h, grads


def check(fn, inputs, tol):
  ref_inputs = {
    n: v.astype(jnp.float32) if n in ("x", "delta", "B", "C") else v for n, v in inputs.items()
  }
  y_ref, h_ref, g_ref = outputs_and_grads(
    lambda **kw: ss.recurrent(**kw, return_final_state=True), ref_inputs
  )
  y, h, g = outputs_and_grads(fn, inputs)
  assert y.dtype == inputs["x"].dtype and h.dtype == jnp.float32
  errors = {"y": rel(y, y_ref), "final_state": rel(h, h_ref)}
  errors.update({f"d{n}": rel(g[n], g_ref[n]) for n in g_ref})
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize("impl,softplus", [("associative", False), ("xla", True)])
def test_forms_agree_with_recurrence(impl, softplus):
  # T=37 in chunks of 8 for "xla" (five chunks, the last partial); N=5, D=6.
  inputs = make_inputs(2, 37 if impl == "xla" else 13, 6, 5, softplus=softplus)
  if impl == "xla":
    fn = lambda **kw: kernels.chunked(**kw, chunk=8)
  else:
    fn = lambda **kw: ss.selective_scan(**kw, return_final_state=True, implementation=impl)
  check(fn, inputs, 1e-5)


def test_dispatch_and_argument_checks():
  inputs = make_inputs(1, 5, 4, 3, segmented=False)
  assert ss.dispatcher.choose("auto", **inputs) == (
    "xla" if jax.default_backend() == "cpu" else "pallas"
  )
  if jax.default_backend() == "cpu":
    with pytest.raises(Unsupported, match="not on cpu"):
      ss.selective_scan(**inputs, implementation="pallas")
  with pytest.raises(ValueError, match=r"B must be \[B,T,N\]"):
    ss.selective_scan(**(inputs | {"B": inputs["B"][:, :, :2]}))
  with pytest.raises(ValueError, match=r"initial_state must be \[B,D,N\]"):
    ss.selective_scan(**(inputs | {"initial_state": jnp.zeros((1, 3, 4))}))
