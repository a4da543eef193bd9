"""attnzoo.ops.delta_rule: recurrent (ground truth) == chunked "xla" form, step decoding."""

import functools

import jax
import jax.numpy as jnp
import pytest

from attnzoo.ops import delta_rule as dr
from attnzoo.ops.dispatch import Unsupported
from tests.conftest import relative_error as rel
from tests.conftest import slow


def make_inputs(b, t, h, dk, dv, *, gated, segmented, dtype=jnp.float32, seed=0):
  ks = jax.random.split(jax.random.PRNGKey(seed), 8)
  q = jax.random.normal(ks[0], (b, t, h, dk))
  k = jax.random.normal(ks[1], (b, t, h, dk))
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)  # DeltaNet: L2-normalised keys
  v = jax.random.normal(ks[2], (b, t, h, dv))
  beta = jax.nn.sigmoid(jax.random.normal(ks[3], (b, t, h)))  # in (0, 1)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h)) + 2.0) if gated else None
  s0 = 0.3 * jax.random.normal(ks[5], (b, h, dk, dv))
  seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.06, (b, t)), axis=1) if segmented else None
  return dict(
    q=q.astype(dtype),
    k=k.astype(dtype),
    v=v.astype(dtype),
    beta=beta,
    log_decay=log_decay,
    initial_state=s0,
    segment_ids=seg,
  )


def outputs_and_grads(fn, inputs, scale, seed=1):
  """Forward (o, final state) and gradients of <o, do> + <S, dS> w.r.t. every float input."""
  fn = jax.jit(functools.partial(fn, scale=scale))  # scale stays a static Python float
  names = [
    n for n in ("q", "k", "v", "beta", "log_decay", "initial_state") if inputs[n] is not None
  ]
  o, s = fn(**inputs)
  ko, ks = jax.random.split(jax.random.PRNGKey(seed))
  do = jax.random.normal(ko, o.shape)
  ds = jax.random.normal(ks, s.shape)

  def loss(diff):
    o, s = fn(**{**inputs, **diff})
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(s * ds)

  grads = jax.grad(loss)({n: inputs[n] for n in names})
  return o, s, grads


def reference_fn(**kw):
  return dr.reference(**kw, return_final_state=True)


def impl_fn(implementation):
  return lambda **kw: dr.delta_rule(**kw, return_final_state=True, implementation=implementation)


def check(inputs, implementation, tol, scale=0.4):
  ref_inputs = {
    n: (None if x is None else x.astype(jnp.float32) if n in "qkv" else x)
    for n, x in inputs.items()
  }
  o_ref, s_ref, g_ref = outputs_and_grads(reference_fn, ref_inputs, scale)
  o, s, g = outputs_and_grads(impl_fn(implementation), inputs, scale)
  assert o.dtype == inputs["v"].dtype and s.dtype == jnp.float32
  errors = {"o": rel(o, o_ref), "final_state": rel(s, s_ref)}
  errors.update({f"d{n}": rel(g[n], g_ref[n]) for n in g_ref})
  bad = {n: e for n, e in errors.items() if not e <= tol}
  assert not bad, f"{implementation}: relative errors above {tol}: {bad} (all: {errors})"


@pytest.mark.parametrize(  # the general case by default, its special cases opt-in
  "gated,segmented",
  [
    pytest.param(False, False, marks=slow),
    pytest.param(True, False, marks=slow),
    pytest.param(False, True, marks=slow),
    (True, True),
  ],
)
def test_xla_matches_recurrent_float32(gated, segmented):
  # T=150: three chunks of 64, the last one padded; odd head dims.
  check(make_inputs(2, 150, 2, 24, 40, gated=gated, segmented=segmented), "xla", 1e-5)


def test_xla_bfloat16():
  check(make_inputs(2, 100, 2, 32, 32, gated=True, segmented=True, dtype=jnp.bfloat16), "xla", 1e-2)


def test_step_decoding_matches_forward():
  x = make_inputs(2, 23, 3, 16, 12, gated=True, segmented=True)
  o_full, s_full = dr.delta_rule(**x, scale=0.5, return_final_state=True, implementation="xla")
  seg = x["segment_ids"]
  reset = jnp.concatenate([jnp.zeros((2, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
  state = x["initial_state"]
  step = jax.jit(lambda s, *a, reset: dr.step(s, *a, scale=0.5, reset=reset))
  outs = []
  for t in range(23):
    ld = None if x["log_decay"] is None else x["log_decay"][:, t]
    state, o = step(
      state, x["q"][:, t], x["k"][:, t], x["v"][:, t], x["beta"][:, t], ld, reset=reset[:, t]
    )
    outs.append(o)
  assert rel(jnp.stack(outs, 1), o_full) < 1e-5
  assert rel(state, s_full) < 1e-5


def test_init_state_and_chunked_continuation():
  """Running two halves with the state handed over equals one run."""
  x = make_inputs(1, 90, 2, 16, 16, gated=True, segmented=False)
  x["initial_state"] = dr.init_state(1, 2, 16, 16)
  o, s = dr.delta_rule(**x, scale=0.5, return_final_state=True, implementation="xla")
  first = {n: (a[:, :41] if n in ("q", "k", "v", "beta", "log_decay") else a) for n, a in x.items()}
  second = {
    n: (a[:, 41:] if n in ("q", "k", "v", "beta", "log_decay") else a) for n, a in x.items()
  }
  o1, s1 = dr.delta_rule(**first, scale=0.5, return_final_state=True, implementation="xla")
  second["initial_state"] = s1
  o2, s2 = dr.delta_rule(**second, scale=0.5, return_final_state=True, implementation="xla")
  assert rel(jnp.concatenate([o1, o2], 1), o) < 1e-5 and rel(s2, s) < 1e-5


def test_dispatch():
  x = make_inputs(1, 8, 1, 16, 16, gated=False, segmented=False)
  o = dr.delta_rule(**x, scale=0.5)  # auto
  assert o.shape == (1, 8, 1, 16)
  if jax.default_backend() != "gpu":
    with pytest.raises(Unsupported, match="only on GPU"):
      dr.delta_rule(**x, scale=0.5, implementation="pallas")
  with pytest.raises(Unsupported, match="float32 or bfloat16"):
    dr.delta_rule(
      **{**x, **{n: x[n].astype(jnp.float16) for n in "qkv"}}, scale=0.5, implementation="interpret"
    )
  with pytest.raises(ValueError, match="scale"):
    dr.delta_rule(**x, scale=None)
  with pytest.raises(ValueError, match="beta"):
    dr.delta_rule(**{**x, "beta": x["beta"][..., None]}, scale=0.5)
