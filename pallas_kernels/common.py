"""Helpers shared by the Pallas kernel packages: the target platform, padded sizes, the 2-D
dot of the kernel bodies, and the pallas_call of either platform with the two forms of a
sequential kernel's loop over chunks (GPU: inside the kernel; TPU: along the grid's last axis).

A sequential kernel takes `loop` and calls `loop(body, n_chunks, init_ref, final_ref)`, with
`body(i, carry) -> carry` handling chunk i of its blocks (n_chunks = 1 on TPU)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

F32 = jnp.float32
EMPTY = 2**31 - 1  # the position of an empty KV-cache slot (int32 max)


def segment_starts(segment_ids):
  """bool [B,T]: True at the first token of every packed segment after the first (where the id
  changes), False at t = 0. Every recurrent form resets its state where this is True."""
  previous, current = segment_ids[:, :-1], segment_ids[:, 1:]
  return jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool), current != previous], axis=1)


def canonical_segments(segment_ids):
  """int32 [B,T] segment index that grows by one at every change of id (0 at the first token)."""
  return jnp.cumsum(segment_starts(segment_ids).astype(jnp.int32), axis=1)


def resolve_platform(platform: str | None = None) -> str:
  """ "gpu" or "tpu": `platform` when given, else "tpu" if JAX's default backend is TPU."""
  if platform is None:
    return "tpu" if jax.default_backend() == "tpu" else "gpu"
  if platform not in ("gpu", "tpu"):
    raise ValueError(f"Pallas kernels: platform must be 'gpu' or 'tpu', got {platform!r}")
  return platform


def device_reason(kernels: str) -> str | None:
  """Why `kernels` (a phrase naming them) cannot run compiled on JAX's default backend, or None.
  They lower for GPU (Triton) and for TPU v5 and newer (Mosaic rejects the linear and
  delta-rule kernels' sublane gathers and per-position row sums before v5, AOT-checked on v4)."""
  backend = jax.default_backend()
  if backend not in ("gpu", "tpu"):
    return f"{kernels} run only on GPU (Triton) or TPU (Mosaic), not on {backend}; use 'interpret'"
  kind = jax.devices()[0].device_kind
  if backend == "tpu" and kind in ("TPU v2", "TPU v3", "TPU v4"):
    return f"{kernels} need TPU v5 or newer, got {kind}"
  return None


def next_pow2(n: int, minimum: int = 1) -> int:
  """The smallest power of two >= n and >= minimum (a power of two)."""
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def round_up(n: int, m: int) -> int:
  """The smallest multiple of m that is >= n."""
  return -(-n // m) * m


def dot(a, b, *, trans_a=False, trans_b=False, precision=None):
  """2-D dot with float32 accumulation; trans_a/trans_b contract over a's first / b's last
  axis."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=F32)


def _loop_in_kernel(body, n_chunks, init_ref, final_ref):
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


def pallas_call(
  kernel,
  *,
  tpu,
  interpret,
  grid,
  in_specs,
  out_specs,
  out_shape,
  name,
  carry=None,
  chunks=None,
  launch=(4, 2),
  aliases=None,
):
  """pl.pallas_call in the platform's form, applied to nothing yet.

  carry: the float32 carry shape of a sequential kernel, which takes `loop` (module
  docstring): on TPU the grid gains a last, "arbitrary" axis of `chunks` steps and the carry
  lives in VMEM scratch; on GPU the kernel loops over its whole-sequence blocks.
  launch: Triton's (num_warps, num_stages). interpret: Pallas' interpreter of that form.
  aliases: {input index: output index}, outputs written in place of those inputs."""
  kwargs = {}
  if tpu:
    semantics = ("parallel",) * len(grid)
    if carry is not None:
      axis, inner = len(grid), kernel

      def kernel(*refs, **kw):
        *refs, carry_ref = refs
        inner(*refs, **kw, loop=functools.partial(_loop_over_grid, carry_ref=carry_ref, axis=axis))

      kwargs["scratch_shapes"] = [pltpu.VMEM(carry, F32)]
      grid, semantics = grid + (chunks,), semantics + ("arbitrary",)
    kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=semantics)
    if interpret:
      kwargs["interpret"] = pltpu.InterpretParams()
  else:
    if carry is not None:
      kernel = functools.partial(kernel, loop=_loop_in_kernel)
    if interpret:
      kwargs["interpret"] = True
    else:
      kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=launch[0], num_stages=launch[1])
  return pl.pallas_call(
    kernel,
    grid=grid,
    in_specs=in_specs,
    out_specs=out_specs,
    out_shape=out_shape,
    name=name,
    input_output_aliases=aliases or {},
    **kwargs,
  )
