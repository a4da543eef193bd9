"""Delta-rule Pallas kernels vs the float32 recurrent reference.

On CPU the kernels run in interpret mode. On a GPU set ATTNZOO_KERNEL_IMPL=pallas to compile
them with Triton (the default is "interpret").
"""
import functools
import os

import jax
import jax.numpy as jnp
import pytest

from attnzoo.ops import delta_rule as dr
from pallas_kernels import delta_rule as kernels

IMPL = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret")
INTERPRET = IMPL != "pallas"


def make_inputs(b, t, h, dk, dv, *, gated, segmented, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  v = jax.random.normal(ks[2], (b, t, h, dv))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))
  log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 2.0) if gated else None
  s0 = 0.3 * jax.random.normal(ks[5], (b, h, dk, dv))
  seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.06, (b, t)), axis=1) if segmented else None
  return dict(q=q.astype(dtype), k=k.astype(dtype), v=v.astype(dtype), beta=beta,
              log_decay=log_decay, initial_state=s0, segment_ids=seg)


def rel(x, ref):
  x, ref = jnp.asarray(x, jnp.float32), jnp.asarray(ref, jnp.float32)
  return float(jnp.linalg.norm(x - ref) / jnp.linalg.norm(ref))


def outputs_and_grads(fn, inputs, scale, seed=1):
  fn = jax.jit(functools.partial(fn, scale=scale))  # scale stays a static Python float
  names = [n for n in ("q", "k", "v", "beta", "log_decay", "initial_state")
           if inputs[n] is not None]
  o, s = fn(**inputs)
  ko, ks = jax.random.split(jax.random.PRNGKey(seed))
  do = jax.random.normal(ko, o.shape)
  ds = jax.random.normal(ks, s.shape)

  def loss(diff):
    o, s = fn(**{**inputs, **diff})
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * ds)

  return o, s, jax.grad(loss)({n: inputs[n] for n in names})


def check(inputs, fn, tol, scale=0.4):
  ref_inputs = {n: (None if x is None else x.astype(jnp.float32) if n in "qkv" else x)
                for n, x in inputs.items()}
  ref = lambda **kw: dr.reference(**kw, return_final_state=True)
  o_ref, s_ref, g_ref = outputs_and_grads(ref, ref_inputs, scale)
  o, s, g = outputs_and_grads(fn, inputs, scale)
  assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
  errors = {"o": rel(o, o_ref), "final_state": rel(s, s_ref)}
  errors.update({f"d{n}": rel(g[n], g_ref[n]) for n in g_ref})
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


def kernel_fn(chunk):
  return lambda **kw: kernels.delta_rule(**kw, chunk=chunk, interpret=INTERPRET)


# Resets without decay run the gated kernel path with zero log decay, so three cases cover it.
@pytest.mark.parametrize("gated,segmented", [(False, False), (True, False), (True, True)])
def test_kernel_float32(gated, segmented):
  # T=37 in chunks of 16 (three chunks, the last padded); odd head dims padded to 32 / 64.
  check(make_inputs(2, 37, 3, 24, 40, gated=gated, segmented=segmented), kernel_fn(16), 1e-5)


def test_kernel_float32_chunk64():
  check(make_inputs(1, 130, 1, 32, 64, gated=True, segmented=True), kernel_fn(64), 1e-5)


def test_kernel_bfloat16():
  check(make_inputs(2, 77, 2, 64, 32, gated=True, segmented=True, dtype=jnp.bfloat16),
        kernel_fn(32), 1e-2)


def test_op_dispatch_to_kernel():
  x = make_inputs(1, 45, 2, 16, 16, gated=True, segmented=False)
  check(x, lambda **kw: dr.delta_rule(**kw, return_final_state=True, implementation=IMPL),
        1e-5)


def test_kernel_without_initial_state():
  x = make_inputs(1, 20, 1, 16, 16, gated=False, segmented=False)
  x["initial_state"] = None
  o = dr.delta_rule(**x, scale=0.5, implementation=IMPL)
  o_ref = dr.reference(**x, scale=0.5)
  assert rel(o, o_ref) < 1e-5
