"""The TPU (Mosaic) form of the linear-attention kernels, checked on CPU.

Export: forward and gradients lower to Mosaic TPU custom calls (jax.export for platform "tpu";
this lowers, it does not compile or run). Interpret: the TPU-shaped kernels (layout [B,H,T,D],
one-chunk blocks, a sequential grid axis with a VMEM carry) run in Pallas' TPU interpret mode
against the float32 reference.
"""

import re
import types

import jax
import jax.numpy as jnp
import pytest

from attnzoo.ops import linear_attention as la
from pallas_kernels.linear_attention import Tuning
from pallas_kernels.linear_attention import linear_attention as kernel
from tests.conftest import slow
from tests.ops.test_linear_attention import assert_all_close, loss_and_grads, make_inputs

S = jax.ShapeDtypeStruct


def inputs(kind, bonus, segments, b, t, h, kd, vd, dtype):
  """Shapes of the kernel's arguments (q, k, v, log_decay, bonus, h0, segment_ids)."""
  g = {"none": None, "scalar": (b, t, h), "vector": (b, t, h, kd)}[kind]
  return (
    S((b, t, h, kd), dtype),
    S((b, t, h, kd), dtype),
    S((b, t, h, vd), dtype),
    None if g is None else S(g, jnp.float32),
    S((h, kd), dtype) if bonus else None,
    S((b, h, kd, vd), jnp.float32),
    S((b, t), jnp.int32) if segments else None,
  )


def run(q, k, v, g, u, h0, seg):
  return kernel(q, k, v, g, scale=0.3, bonus=u, initial_state=h0, segment_ids=seg, platform="tpu")


def grads(*args):
  """Gradients w.r.t. q, k, v, log_decay, bonus and the initial state (and the outputs)."""

  def loss(*args):
    o, s = run(*args)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s), (o, s)

  return jax.grad(loss, argnums=range(6), has_aux=True)(*args)


def tpu_kernels(fn, args):
  """Names of the Mosaic TPU kernels in fn exported for TPU, in program order."""
  module = jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()
  names = re.findall(r'kernel_name = "(\w+)"', module)
  assert module.count("tpu_custom_call(") == len(names)
  return names


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kind", ["none", "scalar", "vector"])
@pytest.mark.parametrize("bonus,segments", [(False, False), (True, True)])
def test_exports_for_tpu(dtype, kind, bonus, segments):
  args = inputs(kind, bonus, segments, 2, 100, 3, 40, 20, dtype)
  cumsum = ["cumsum_kernel"] if kind != "none" else []
  forward = cumsum + ["states_kernel", "output_kernel"]
  # vector decay: the output kernel at both sub-block sizes behind lax.cond
  assert tpu_kernels(run, args) == (forward + forward[-1:] if kind == "vector" else forward)
  backward = ["dstates_kernel", "dqk_kernel", "dv_kernel"]  # h_n saved by the forward
  assert set(tpu_kernels(grads, args)) == set(forward + backward)


def tpu_interpret(tuning):
  def op(q, k, v, *, log_decay=None, return_final_state, **kw):
    o, h = kernel(q, k, v, log_decay, **kw, tuning=tuning, interpret=True, platform="tpu")
    return (o, h) if return_final_state else o

  return op


@pytest.mark.parametrize(
  "variant,segments",
  [
    ("scalar", True),
    pytest.param("vector", False, marks=slow),
    pytest.param("bonus", False, marks=slow),
  ],
)
def test_tpu_interpret_float32(variant, segments):
  # B,T,H,K,V = 2,37,3,12,20: T in chunks of 16 (the last padded), K, V padded to 16, 32
  q, k, v, kw = make_inputs(variant, seed=21, segments=segments)
  want = loss_and_grads(la.reference, q, k, v, kw)
  got = loss_and_grads(tpu_interpret(Tuning(chunk=16)), q, k, v, kw)
  assert_all_close(got, want, 1e-5, f"tpu {variant} ")


def test_pallas_supports_tpu(monkeypatch):
  q, k, v, kw = make_inputs("scalar", segments=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert la.dispatcher.auto_order["tpu"][0] == "pallas"
  for device_kind, reason in (("TPU v5 lite", None), ("TPU v6 lite", None), ("TPU v4", "v5")):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=device_kind)])
    why = la.dispatcher.reason("pallas", q=q, k=k, v=v, bonus=None, segment_ids=None, **kw)
    assert why is None if reason is None else reason in why
