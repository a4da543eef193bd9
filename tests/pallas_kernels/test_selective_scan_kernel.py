"""Selective-scan Pallas kernels vs the float32 lax.scan recurrence, forward and gradients of
x, delta, A, B, C, D, the delta bias and the initial state.

On CPU the kernels run in interpret mode (GPU form: Triton's; TPU form: Pallas' TPU
interpreter). On a GPU set ATTNZOO_KERNEL_IMPL=pallas to compile the GPU form with Triton.
Shapes: T=13 in chunks of 8 (two chunks, the last padded), D=20 in blocks of 16 (two blocks,
the last padded), N=3 (padded to 8)."""

import os

import jax.numpy as jnp
import pytest

from pallas_kernels import selective_scan as kernels
from tests.conftest import slow
from tests.ops.test_selective_scan import check, make_inputs

INTERPRET = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret") != "pallas"
TUNING = kernels.Tuning(chunk=8, block_d=16)


def kernel_fn(platform):
  return lambda **kw: kernels.selective_scan(
    **kw, tuning=TUNING, interpret=INTERPRET, platform=platform
  )


def test_gpu_form_float32():
  check(kernel_fn("gpu"), make_inputs(2, 13, 20, 3), 1e-5)


def test_gpu_form_bfloat16_without_segments_or_initial_state():
  inputs = make_inputs(2, 13, 20, 3, segmented=False, dtype=jnp.bfloat16)
  check(kernel_fn("gpu"), inputs | {"initial_state": None}, 1e-2)


@pytest.mark.skipif(not INTERPRET, reason="TPU form: interpret mode only off TPU")
def test_tpu_form_float32_without_softplus():
  check(kernel_fn("tpu"), make_inputs(2, 13, 20, 3, softplus=False), 1e-5)


@slow
@pytest.mark.skipif(not INTERPRET, reason="TPU form: interpret mode only off TPU")
def test_tpu_form_bfloat16():
  check(kernel_fn("tpu"), make_inputs(1, 21, 12, 4, dtype=jnp.bfloat16), 1e-2)


@slow
def test_long_chunks_default_tuning():
  """The default tuning (chunk 16) on T=40 with 40 channels (three blocks of 16 on GPU)."""
  inputs = make_inputs(1, 40, 40, 16, segmented=False)
  fn = lambda **kw: kernels.selective_scan(**kw, interpret=INTERPRET, platform="gpu")
  check(fn, inputs, 1e-5)


@pytest.mark.skipif(INTERPRET, reason="compiled kernels only (ATTNZOO_KERNEL_IMPL=pallas)")
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_compiled_mamba_sizes(dtype, tol):
  """On the device: N=16, default tuning, T=1000 (a partial last chunk), D=160."""
  inputs = make_inputs(2, 1000, 160, 16, dtype=dtype)
  check(lambda **kw: kernels.selective_scan(**kw), inputs, tol)
