"""Helpers shared by the Pallas kernel packages: the target platform, padded sizes, the 2-D
dot of the kernel bodies, and the two forms of a sequential kernel's loop over chunks (GPU:
inside the kernel; TPU: along the grid's last axis).

A sequential kernel takes `loop` and calls `loop(body, n_chunks, init_ref, final_ref)`, with
`body(i, carry) -> carry` handling chunk i of its blocks (n_chunks = 1 on TPU)."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

F32 = jnp.float32


def resolve_platform(platform: str | None = None) -> str:
  """"gpu" or "tpu": `platform` when given, else "tpu" if JAX's default backend is TPU."""
  if platform is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"Pallas kernels: platform must be 'gpu' or 'tpu', got {platform!r}")
  return platform


def next_pow2(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= n and >= minimum (a power of two)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """2-D dot with float32 accumulation; trans_a/trans_b contract over a's first / b's last
  axis."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def loop_in_kernel(body, n_chunks, init_ref, final_ref):
  """GPU: the blocks hold the whole sequence; loop over its chunks, the carry in registers."""
  final_ref[...] = lax.fori_loop(0, n_chunks, body, init_ref[...].astype(F32))


def _loop_over_grid(body, n_chunks, init_ref, final_ref, *, carry_ref, axis):
  """TPU: the blocks hold one chunk (n_chunks == 1) and grid axis `axis` (the last,
  "arbitrary") walks the chunks; the float32 carry stays in VMEM scratch between steps."""
  del n_chunks
  step = pl.program_id(axis)

  @pl.when(step == 0)
  def _():
    carry_ref[...] = init_ref[...].astype(F32)

  carry_ref[...] = body(0, carry_ref[...])

  @pl.when(step == pl.num_programs(axis) - 1)
  def _():
    final_ref[...] = carry_ref[...]


def carry_in_scratch(kernel, axis):
  """The TPU form of a sequential kernel on a grid whose last axis (`axis`) walks the chunks:
  its last ref is the VMEM carry."""
  def wrapped(*refs, **kw):
    *refs, carry_ref = refs
    kernel(*refs, **kw, loop=functools.partial(_loop_over_grid, carry_ref=carry_ref, axis=axis))
  return wrapped
