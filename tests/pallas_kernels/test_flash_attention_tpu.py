"""The flash-attention kernels in their Mosaic TPU form, checked on a CPU host.

Export tests lower forward and gradient for TPU (`jax.export` with platforms=("tpu",), under
an abstract TPU device so generation-dependent lowering rules resolve): this runs the Pallas
TPU lowering and its block-shape checks, not Mosaic's own compiler (in libtpu; the opt-in
test_tpu_compile.py compiles the kernels with it, ahead of time, when libtpu is available).
Interpret tests run the same TPU-shaped kernels (BHTD blocks, SMEM schedules, [rows, 1]
statistics) in Pallas TPU interpret mode against the float32 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops.softmax_attention import EMPTY, softmax_attention
from pallas_kernels.flash_attention import flash_attention, reason
from tests.conftest import slow
from tests.pallas_kernels.test_flash_attention import check, inputs

S = jax.ShapeDtypeStruct
tpu_kernel = functools.partial(flash_attention, platform="tpu", interpret=True)


def export_tpu(fn, *args, device_kind="TPU v5 lite"):
  """StableHLO text of jit(fn) lowered for TPU (`device_kind` names the target chip)."""
  device = jax.sharding.AbstractDevice(device_kind=device_kind, num_cores=1, platform="tpu")
  with jax.sharding.use_abstract_mesh(
    jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  ):
    return jax.export.export(jax.jit(fn), platforms=("tpu",))(*args).mlir_module()


def attention_loss(attention, extra_names, grad_scale=False, grad=True):
  """A loss over o and lse; with `grad` its value_and_grad w.r.t. q, k, v (and a per-head
  scale)."""

  def loss(q, k, v, *extra):
    kw = dict(zip(extra_names, extra))
    o, lse = attention(q, k, v, scale=kw.pop("scale", 0.125), return_lse=True, **kw)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0))

  if not grad:
    return loss
  argnums = (0, 1, 2, 3 + list(extra_names).index("scale")) if grad_scale else (0, 1, 2)
  return jax.value_and_grad(loss, argnums=argnums)


def flash_case(shape, kw, sds=S, grad=True):
  """(fn, args) of one case: `attention_loss` of flash_attention(platform="tpu") and its
  arguments as ShapeDtypeStructs made by `sds`. shape = (batch, Tq, Tk, H, Hkv, D, dtype); the
  keywords "segments", "positions", "block_mask" and "scale" add those arguments (a [H] scale
  is differentiated), the others go to flash_attention."""
  b, tq, tk, h, hkv, d, dtype = shape
  kw = dict(kw)
  extra = {}
  if kw.pop("segments", False):
    extra["segment_ids"] = sds((b, tq), jnp.int32)
  if kw.pop("positions", False):
    extra["q_positions"] = sds((b, tq), jnp.int32)
    extra["kv_positions"] = sds((b, tk), jnp.int32)
  if kw.pop("block_mask", False):
    extra["block_mask"] = sds((b, -(-tq // 128), -(-tk // 128)), jnp.bool_)
    kw["block_mask_size"] = (128, 128)
  grad_scale = kw.pop("scale", False)
  if grad_scale:
    extra["scale"] = sds((h,), jnp.float32)
  attention = functools.partial(flash_attention, platform="tpu", **kw)
  return (
    attention_loss(attention, list(extra), grad_scale, grad),
    (
      sds((b, tq, h, d), dtype),
      sds((b, tk, hkv, d), dtype),
      sds((b, tk, hkv, d), dtype),
      *extra.values(),
    ),
  )


# (batch, Tq, Tk, H, Hkv, D, dtype), mask keywords (see `flash_case`).
EXPORT_CASES = {
  "causal_gqa_bf16_d128": ((2, 300, 300, 8, 2, 128, jnp.bfloat16), dict(causal=True)),
  "noncausal_mqa_f32_d64": ((1, 200, 330, 4, 1, 64, jnp.float32), dict()),
  "window_bf16_d128": ((1, 520, 520, 4, 2, 128, jnp.bfloat16), dict(window=(100, 20))),
  "causal_window_f16": ((2, 256, 256, 2, 2, 64, jnp.float16), dict(causal=True, window=64)),
  "segments_softcap_bf16_d256": (
    (2, 256, 256, 4, 1, 256, jnp.bfloat16),
    dict(causal=True, softcap=20.0, segments=True),
  ),
  "block_mask_f32": ((2, 256, 384, 2, 2, 64, jnp.float32), dict(block_mask=True)),
  "kv_cache_positions": ((2, 64, 256, 4, 2, 128, jnp.bfloat16), dict(causal=True, positions=True)),
  "per_head_scale_f32_d32": ((1, 160, 160, 4, 2, 32, jnp.float32), dict(causal=True, scale=True)),
}


def export_case(name, device_kind="TPU v5 lite"):
  fn, args = flash_case(*EXPORT_CASES[name])
  return export_tpu(fn, *args, device_kind=device_kind)


def assert_three_kernels(text):
  assert text.count("stablehlo.custom_call @tpu_custom_call") == 3
  for kernel in ("flash_attention_fwd", "flash_attention_dq", "flash_attention_dkv"):
    assert f'kernel_name = "{kernel}"' in text, kernel


@pytest.mark.parametrize("name", sorted(EXPORT_CASES))
def test_export_forward_and_grad(name):
  assert_three_kernels(export_case(name))


@pytest.mark.parametrize("device_kind", ["TPU v5", "TPU v6 lite", "TPU7x"])
def test_export_other_generations(device_kind):
  assert_three_kernels(export_case("segments_softcap_bf16_d256", device_kind))


def test_export_forward_only_and_dispatch(monkeypatch):
  # On a TPU backend softmax_attention's "pallas" (and "auto") picks the Mosaic kernels.
  monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
  q = S((2, 200, 4, 128), jnp.bfloat16)
  for implementation in ("pallas", "auto"):
    text = export_tpu(
      lambda q: softmax_attention(q, q, q, scale=0.1, causal=True, implementation=implementation), q
    )
    assert text.count("stablehlo.custom_call @tpu_custom_call") == 1
    assert 'kernel_name = "flash_attention_fwd"' in text


def test_tpu_limits_reported():
  q = S((1, 256, 2, 64), jnp.float32)
  assert reason(q, q, q, platform="tpu") is None
  assert "multiples of 128" in reason(q, q, q, platform="tpu", block_mask_size=(64, 64))
  assert reason(q, q, q, platform="gpu", block_mask_size=(64, 64)) is None
  long = S((1, 2**17, 8, 128), jnp.bfloat16)
  assert "VMEM" in reason(long, long, long, platform="tpu")
  many = S((64, 16384, 1, 64), jnp.bfloat16)
  assert reason(many, many, many, platform="tpu", per_batch_schedule=False) is None
  assert "SMEM" in reason(many, many, many, platform="tpu")


# Interpret mode: (batch, Tq, Tk, H, Hkv, D) and mask keywords; T is not a multiple of the
# 128-row tile, except where a block mask needs whole tiles.
INTERPRET_CASES = {
  "causal_gqa": ((1, 250, 250, 4, 2, 64), dict(causal=True)),
  "noncausal_mqa_cross": ((1, 72, 200, 3, 1, 40), dict()),
  "window_left_right": ((1, 200, 200, 2, 1, 32), dict(window=(37, 20))),
  "softcap_causal": ((1, 150, 150, 2, 2, 64), dict(causal=True, softcap=3.0)),
}


@pytest.mark.parametrize(
  "name", [n if n == "causal_gqa" else pytest.param(n, marks=slow) for n in sorted(INTERPRET_CASES)]
)
def test_interpret_f32(name):
  (b, tq, tk, h, hkv, d), kw = INTERPRET_CASES[name]
  q, k, v, do, dlse = inputs(0, b, tq, tk, h, hkv, d, jnp.float32)
  check(q, k, v, do, dlse, tol=1e-5, kernel=tpu_kernel, **kw)


def test_interpret_segments_and_per_head_scale():
  b, t = 2, 160
  q, k, v, do, dlse = inputs(1, b, t, t, 2, 1, 32, jnp.float32)
  rng = np.random.default_rng(0)
  seg = np.stack([np.sort(rng.integers(0, 4, t)) for _ in range(b)]).astype(np.int32)
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-5,
    kernel=tpu_kernel,
    causal=True,
    segment_ids=jnp.asarray(seg),
    scale=jnp.asarray([0.1, 0.3]),
    grad_scale=True,
  )


def test_interpret_block_mask():
  b, tq, tk = 1, 256, 384
  q, k, v, do, dlse = inputs(2, b, tq, tk, 2, 2, 32, jnp.float32)
  bm = np.array([[[True, False, True], [False, True, True]]])
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-5,
    kernel=tpu_kernel,
    block_mask=jnp.asarray(bm),
    block_mask_size=(128, 128),
  )


@slow
def test_interpret_kv_cache_empty_rows():
  b, tq, tk = 1, 20, 140
  q, k, v, do, dlse = inputs(4, b, tq, tk, 2, 1, 32, jnp.float32)
  q_pos = jnp.arange(40, 60, dtype=jnp.int32)[None]
  kv_pos = np.arange(tk, dtype=np.int32)[None]
  kv_pos[:, 60:] = EMPTY
  q_seg = np.zeros((b, tq), np.int32)
  q_seg[:, :3] = 7  # no key carries segment 7
  o, lse = check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-5,
    kernel=tpu_kernel,
    use_lse=False,
    causal=True,
    q_positions=q_pos,
    kv_positions=jnp.asarray(kv_pos),
    segment_ids=jnp.asarray(q_seg),
    kv_segment_ids=jnp.zeros((b, tk), jnp.int32),
  )
  assert np.all(np.asarray(o)[:, :3] == 0) and np.all(np.asarray(lse)[:, :3] == -np.inf)


def test_interpret_bf16():
  q, k, v, do, dlse = inputs(5, 1, 144, 144, 2, 1, 128, jnp.bfloat16)
  check(q, k, v, do, dlse, tol=1e-2, kernel=tpu_kernel, causal=True)


def test_float16_runs_float32_kernels():
  # Mosaic has no float16 vectors: float16 inputs take the float32 kernels (o back in f16).
  q = S((1, 200, 2, 64), jnp.float16)
  text = export_tpu(
    attention_loss(functools.partial(flash_attention, platform="tpu", causal=True), []), q, q, q
  )
  assert_three_kernels(text)
  calls = [line for line in text.splitlines() if "@tpu_custom_call" in line]
  assert all("f16" not in line and "f32" in line for line in calls)
  q, k, v, do, dlse = inputs(6, 1, 130, 130, 2, 1, 32, jnp.float16)
  check(q, k, v, do, dlse, tol=2e-3, kernel=tpu_kernel, causal=True, window=(40, 0))
