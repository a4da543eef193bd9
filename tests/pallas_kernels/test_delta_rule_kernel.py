"""Delta-rule Pallas kernels vs the float32 recurrent reference.

On CPU the kernels run in interpret mode. On a GPU set ATTNZOO_KERNEL_IMPL=pallas to compile
them with Triton (the default is "interpret").
"""

import os

import jax.numpy as jnp
import pytest

from attnzoo.ops import delta_rule as dr
from pallas_kernels import delta_rule as kernels
from tests.conftest import relative_error as rel
from tests.conftest import slow
from tests.ops.test_delta_rule import make_inputs, outputs_and_grads

IMPL = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret")
INTERPRET = IMPL != "pallas"
# further cases of paths the default case already covers: opt-in in interpret mode (minutes on
# the CPU), always run by the compiled kernel
slow_here = slow if INTERPRET else ()


def check(inputs, fn, tol, scale=0.4):
  ref_inputs = {
    n: (None if x is None else x.astype(jnp.float32) if n in "qkv" else x)
    for n, x in inputs.items()
  }
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
@pytest.mark.parametrize(
  "gated,segmented",
  [
    pytest.param(False, False, marks=slow_here),
    pytest.param(True, False, marks=slow_here),
    (True, True),
  ],
)
def test_kernel_float32(gated, segmented):
  # T=37 in chunks of 16 (three chunks, the last padded); odd head dims padded to 32 / 64.
  check(make_inputs(2, 37, 3, 24, 40, gated=gated, segmented=segmented), kernel_fn(16), 1e-5)


def test_kernel_float32_chunk64():
  check(make_inputs(1, 130, 1, 32, 64, gated=True, segmented=True), kernel_fn(64), 1e-5)


def test_kernel_bfloat16():
  check(
    make_inputs(2, 77, 2, 64, 32, gated=True, segmented=True, dtype=jnp.bfloat16),
    kernel_fn(32),
    1e-2,
  )


def test_op_dispatch_to_kernel():
  x = make_inputs(1, 45, 2, 16, 16, gated=True, segmented=False)
  check(x, lambda **kw: dr.delta_rule(**kw, return_final_state=True, implementation=IMPL), 1e-5)


def test_kernel_without_initial_state():
  x = make_inputs(1, 20, 1, 16, 16, gated=False, segmented=False)
  x["initial_state"] = None
  o = dr.delta_rule(**x, scale=0.5, implementation=IMPL)
  o_ref = dr.reference(**x, scale=0.5)
  assert rel(o, o_ref) < 1e-5
