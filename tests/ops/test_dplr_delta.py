"""attnzoo.ops.dplr_delta (RWKV-7's generalised delta rule): the naive reference (explicit
transition matrices) == the recurrence of `step` == the chunked "xla" form, forward and
gradients, on awkward shapes with packed segments and an initial state; split runs compose."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import dplr_delta as dplr
from tests.conftest import relative_error as rel
from tests.conftest import slow

NAMES = ("r", "k", "v", "log_decay", "a", "b", "initial_state")


def make_inputs(b, t, h, dk, dv, *, segmented, seed=0):
  """RWKV-7's parametrisation: decays in (0.545, 1), a = -kappa_hat, b = kappa_hat * alpha
  (numpy: no eager JAX ops to compile)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  kappa = normal(b, t, h, dk)
  kappa = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
  alpha = 1 / (1 + np.exp(-normal(b, t, h, dk)))
  log_decay = -np.exp(-np.logaddexp(0, -normal(b, t, h, dk)) - 0.5)
  seg = np.cumsum(rng.random((b, t)) < 0.08, axis=1) if segmented else None
  return dict(
    r=normal(b, t, h, dk),
    k=0.5 * normal(b, t, h, dk),
    v=normal(b, t, h, dv),
    log_decay=log_decay.astype(np.float32),
    a=-kappa,
    b=(kappa * alpha).astype(np.float32),
    initial_state=0.3 * normal(b, h, dk, dv),
    segment_ids=seg,
  )


def outputs_and_grads(fn, inputs, scale=0.7, seed=1):
  """(o, final state) and the gradients of <o, do> + <S, dS> w.r.t. every float input, in one
  compiled program."""
  rng = np.random.default_rng(seed)
  b, t, h, _ = inputs["r"].shape
  do = rng.standard_normal((b, t, h, inputs["v"].shape[-1])).astype(np.float32)
  ds = rng.standard_normal(inputs["initial_state"].shape).astype(np.float32)
  rest = {n: x for n, x in inputs.items() if n not in NAMES}

  @jax.jit
  def run(diff):
    (o, s), pullback = jax.vjp(lambda d: fn(**d, **rest, scale=scale), diff)
    return o, s, pullback((do, ds))[0]

  return run({n: inputs[n] for n in NAMES})


FORMS = {
  "reference": lambda **kw: dplr.reference(**kw, return_final_state=True),
  "recurrent": lambda **kw: dplr.dplr_delta(
    **kw, return_final_state=True, implementation="recurrent"
  ),
  "xla": lambda **kw: dplr.dplr_delta(**kw, return_final_state=True, implementation="xla"),
}


@pytest.mark.parametrize(
  "form,segmented",
  [
    ("xla", True),
    pytest.param("xla", False, marks=slow),
    pytest.param("recurrent", True, marks=slow),
  ],
)
def test_forms_agree_forward_and_gradients(form, segmented):
  inputs = make_inputs(2, 37, 3, 8, 5, segmented=segmented)  # T not a multiple of the chunk
  o_ref, s_ref, g_ref = outputs_and_grads(FORMS["reference"], inputs)
  o, s, g = outputs_and_grads(FORMS[form], inputs)
  errors = {"o": rel(o, o_ref), "S": rel(s, s_ref), **{n: rel(g[n], g_ref[n]) for n in NAMES}}
  assert max(errors.values()) < 1e-5, errors


def test_split_runs_and_steps_compose():
  """xla over [0, 20) then from its final state over [20, 37), and the scan of `step` (what
  decoding runs), equal the reference over [0, 37) (outputs and final state)."""
  inputs = make_inputs(2, 37, 1, 4, 3, segmented=False, seed=2)
  del inputs["segment_ids"]
  s0 = inputs.pop("initial_state")

  @jax.jit
  def run(inputs, s0):
    full = FORMS["reference"](**inputs, initial_state=s0, scale=1.0)
    o1, s1 = FORMS["xla"](**{n: x[:, :20] for n, x in inputs.items()}, initial_state=s0, scale=1.0)
    o2, s2 = FORMS["xla"](**{n: x[:, 20:] for n, x in inputs.items()}, initial_state=s1, scale=1.0)
    steps = FORMS["recurrent"](**inputs, initial_state=s0, scale=1.0)
    return full, (jnp.concatenate([o1, o2], 1), s2), steps

  (o, s), split, steps = run(inputs, s0)
  for o_form, s_form in (split, steps):
    assert rel(o_form, o) < 1e-5 and rel(s_form, s) < 1e-5


def test_bad_shapes_are_errors():
  z = lambda *shape: np.zeros(shape, np.float32)
  inputs = dict(r=z(1, 5, 2, 4), k=z(1, 5, 2, 4), v=z(1, 5, 2, 3), a=z(1, 5, 2, 4), b=z(1, 5, 2, 4))
  with pytest.raises(ValueError, match="log_decay must be"):
    dplr.dplr_delta(**inputs, log_decay=z(1, 5, 2, 2), scale=1.0)
  with pytest.raises(ValueError, match="initial_state must be"):
    dplr.dplr_delta(**inputs, log_decay=z(1, 5, 2, 4), initial_state=z(1, 2, 3, 3), scale=1.0)
