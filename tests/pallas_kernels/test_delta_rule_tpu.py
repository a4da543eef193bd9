"""The TPU (Mosaic) form of the delta-rule kernels, checked on CPU.

Export: forward and gradients lower to Mosaic TPU custom calls (jax.export for platform "tpu";
this lowers, it does not compile or run). Interpret: the TPU-shaped kernels (token layout
[B,H,T,D], one-chunk blocks, sequential grid axis with a VMEM carry) run in Pallas' TPU
interpret mode against the float32 reference.
"""

import re
import types

import jax
import jax.numpy as jnp
import pytest

from attnzoo.ops import delta_rule as dr
from pallas_kernels import delta_rule as kernels
from pallas_kernels.common import resolve_platform
from tests.conftest import slow
from tests.ops.test_delta_rule import make_inputs
from tests.pallas_kernels.test_delta_rule_kernel import check

FORWARD = ["delta_rule_wy", "delta_rule_state", "delta_rule_output"]
BACKWARD = [
  "delta_rule_wu",
  "delta_rule_state",
  "delta_rule_dv_local",
  "delta_rule_dstate",
  "delta_rule_grad_qk",
  "delta_rule_grad_wy",
]


def tpu_kernels(fn, inputs):
  """Names of the Mosaic TPU kernels in fn exported for TPU, in program order."""
  specs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), inputs)
  module = jax.export.export(jax.jit(fn), platforms=("tpu",))(specs).mlir_module()
  names = re.findall(r'kernel_name = "(\w+)"', module)
  assert module.count("tpu_custom_call(") == len(names)
  return names


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("gated,segmented", [(False, False), (True, False), (True, True)])
def test_exports_for_tpu(dtype, gated, segmented):
  x = make_inputs(2, 100, 3, 24, 40, gated=gated, segmented=segmented, dtype=dtype)
  seg = x.pop("segment_ids")

  def run(x):
    return kernels.delta_rule(**x, scale=0.3, segment_ids=seg, platform="tpu")

  def value_and_grads(x):
    def loss(x):
      o, s = run(x)
      return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s), (o, s)

    return jax.grad(loss, has_aux=True)(x)  # q, k, v, beta, log_decay, initial_state

  assert tpu_kernels(run, x) == FORWARD
  assert sorted(tpu_kernels(value_and_grads, x)) == sorted(FORWARD + BACKWARD)


def tpu_interpret(chunk):
  return lambda **kw: kernels.delta_rule(**kw, chunk=chunk, interpret=True, platform="tpu")


def test_tpu_interpret_gated_segmented_float32():
  # T=37 in chunks of 16 (three chunks, the last padded); head dims 24, 40 padded to 32, 64.
  check(make_inputs(1, 37, 2, 24, 40, gated=True, segmented=True), tpu_interpret(16), 1e-5)


@slow
def test_tpu_interpret_plain_bfloat16():
  check(
    make_inputs(1, 45, 2, 16, 24, gated=False, segmented=False, dtype=jnp.bfloat16),
    tpu_interpret(16),
    1e-2,
  )


def test_pallas_supports_tpu(monkeypatch):
  x = make_inputs(1, 8, 1, 16, 16, gated=False, segmented=False)
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  assert dr.dispatcher.auto_order["tpu"][0] == "pallas"
  for kind, reason in (("TPU v5 lite", None), ("TPU v6 lite", None), ("TPU v4", "TPU v5")):
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(device_kind=kind)])
    why = dr.dispatcher.reason("pallas", **x, scale=0.5)
    assert why is None if reason is None else reason in why
  assert resolve_platform() == "tpu"
  with pytest.raises(ValueError, match="platform"):
    resolve_platform("cpu")
