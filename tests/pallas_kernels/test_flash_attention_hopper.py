"""The Hopper (Mosaic GPU) flash-attention forward: lowering on CPU, numerics on an sm90 GPU.

On CPU the kernel cannot run (wgmma has no interpreter), but Mosaic GPU lowers (layout
inference included) without a device: `jax.export` for platforms=["cuda"] checks shapes,
layouts and the API, for the forward alone and for jax.grad through flash_attention(hopper=True)
(the Triton backward lowered for an abstract H200). The GPU tests (skipped without an sm90
device) compare o, lse and dq/dk/dv with the float32 reference.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import Tuning, flash_attention, hopper, hopper_reason
from pallas_kernels.flash_attention import op as op_lib
from tests.pallas_kernels.test_flash_attention import check, inputs

S = jax.ShapeDtypeStruct
MOSAIC = "mosaic_gpu_v2"
TRITON = "__gpu$xla.gpu.triton"


def export_cuda(fn, *args):
  """StableHLO text of jit(fn) lowered for CUDA on an abstract H200 (Triton needs a device
  kind; Mosaic GPU assumes sm90 without one)."""
  device = jax.sharding.AbstractDevice(device_kind="NVIDIA H200", num_cores=132, platform="gpu")
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=device)
  with jax.sharding.use_abstract_mesh(mesh):
    return jax.export.export(
      jax.jit(fn),
      platforms=["cuda"],
      disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)],
    )(*args).mlir_module()


def shapes(batch, tq, tk, heads, kv_heads, dim, dtype):
  return (
    S((batch, tq, heads, dim), dtype),
    S((batch, tk, kv_heads, dim), dtype),
    S((batch, tk, kv_heads, dim), dtype),
  )


# (batch, T, H, Hkv, D, dtype, causal, tuning)
FORWARD_CASES = {
  "bf16_d128_causal_gqa": (2, 1024, 4, 2, 128, jnp.bfloat16, True, None),
  "f16_d64_noncausal": (1, 512, 2, 2, 64, jnp.float16, False, None),
  "bf16_d256_causal": (1, 256, 2, 1, 256, jnp.bfloat16, True, None),
  "bf16_d128_q128_kv64_s3": (
    1,
    512,
    2,
    1,
    128,
    jnp.bfloat16,
    True,
    Tuning(hopper_block_q=128, hopper_block_kv=64, hopper_stages=3),
  ),
  "f16_d64_kv192_nopingpong": (
    1,
    768,
    2,
    2,
    64,
    jnp.float16,
    False,
    Tuning(hopper_block_kv=192, hopper_pingpong=False),
  ),
  "bf16_d128_overlap_causal": (
    1,
    512,
    4,
    2,
    128,
    jnp.bfloat16,
    True,
    Tuning(hopper_pingpong=False, hopper_overlap=True),
  ),
  "f16_d64_overlap_kv64": (
    2,
    256,
    2,
    1,
    64,
    jnp.float16,
    False,
    Tuning(hopper_block_kv=64, hopper_stages=3, hopper_pingpong=False, hopper_overlap=True),
  ),
}


@pytest.mark.parametrize("name", sorted(FORWARD_CASES))
def test_forward_lowers(name):
  batch, t, heads, kv_heads, dim, dtype, causal, tuning = FORWARD_CASES[name]
  fn = functools.partial(
    hopper.forward, scale=dim**-0.5, causal=causal, kv_len=t - 7, tuning=tuning
  )
  text = export_cuda(fn, *shapes(batch, t, t, heads, kv_heads, dim, dtype))
  assert text.count(MOSAIC) >= 1
  assert f"tensor<{batch}x{heads}x{t}xf32>" in text  # lse2 [B, H, T]


@pytest.mark.parametrize("name", sorted(hopper.CANDIDATES))
def test_tuning_candidates_lower_at_d128(name):
  """Every tuning the GPU check script times fits shared memory and lowers (bf16, D=128)."""
  tuning = hopper.CANDIDATES[name]
  assert hopper.config_reason(128, jnp.bfloat16, tuning) is None
  for causal in (True, False):
    fn = functools.partial(hopper.forward, scale=0.08, causal=causal, tuning=tuning)
    assert MOSAIC in export_cuda(fn, *shapes(1, 768, 768, 2, 1, 128, jnp.bfloat16))


# (batch, Tq, Tk, H, Hkv, D, dtype, causal): odd lengths, GQA, D 64 / 96 (padded) / 128.
GRAD_CASES = {
  "bf16_causal_gqa_t1000_d128": (2, 1000, 1000, 4, 2, 128, jnp.bfloat16, True),
  "f16_noncausal_t1000_d64": (1, 1000, 1000, 2, 2, 64, jnp.float16, False),
  "bf16_noncausal_cross_d64": (1, 300, 700, 4, 1, 64, jnp.bfloat16, False),
  "f16_causal_t77_d96": (1, 77, 77, 2, 1, 96, jnp.float16, True),
}


@pytest.mark.parametrize("name", sorted(GRAD_CASES))
def test_grad_lowers_with_hopper_forward(name):
  batch, tq, tk, heads, kv_heads, dim, dtype, causal = GRAD_CASES[name]

  def loss(q, k, v):
    o, lse = flash_attention(q, k, v, scale=dim**-0.5, causal=causal, return_lse=True, hopper=True)
    return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(lse)

  text = export_cuda(
    jax.grad(loss, argnums=(0, 1, 2)), *shapes(batch, tq, tk, heads, kv_heads, dim, dtype)
  )
  # The Mosaic forward once; the Triton dq and dk/dv kernels, no Triton forward.
  assert text.count(f"@{MOSAIC}(") == 1
  assert text.count(f"@{TRITON}(") == 2


def test_auto_selection(monkeypatch):
  q, k, v = shapes(1, 256, 256, 2, 2, 64, jnp.bfloat16)
  fwd = lambda **kw: lambda q, k, v: flash_attention(q, k, v, scale=0.125, causal=True, **kw)
  # Without an sm90 default device auto keeps the Triton forward.
  monkeypatch.setattr(op_lib, "_sm90_default_device", lambda: False)
  assert MOSAIC not in export_cuda(fwd(), q, k, v)
  monkeypatch.setattr(op_lib, "_sm90_default_device", lambda: True)
  assert MOSAIC in export_cuda(fwd(), q, k, v)
  assert MOSAIC not in export_cuda(fwd(hopper=False), q, k, v)
  # Arguments the Hopper forward does not serve fall back to Triton under auto.
  assert MOSAIC not in export_cuda(fwd(window=(64, 0)), q, k, v)
  assert MOSAIC not in export_cuda(fwd(softcap=30.0), q, k, v)


@pytest.mark.parametrize(
  "kw, match",
  [
    (dict(window=(16, 0)), "window"),
    (dict(segment_ids=jnp.zeros((1, 128), jnp.int32)), "segment_ids"),
    (dict(q_positions=jnp.arange(128)[None]), "q_positions"),
    (dict(softcap=20.0), "softcap"),
    (dict(scale=jnp.full((2,), 0.125)), "static positive"),
    (dict(interpret=True), "interpret"),
    (dict(platform="tpu"), "GPU only"),
  ],
)
def test_unsupported_arguments_raise(kw, match):
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  kw = {"scale": 0.125, **kw}
  with pytest.raises(NotImplementedError, match=match):
    flash_attention(q, q, q, hopper=True, **kw)


@pytest.mark.parametrize(
  "q_shape, k_shape, dtype, causal, match",
  [
    ((1, 128, 2, 64), (1, 128, 2, 64), jnp.float32, False, "bf16/f16"),
    ((1, 128, 2, 32), (1, 128, 2, 32), jnp.bfloat16, False, "head_dim"),
    ((1, 128, 2, 64), (1, 256, 2, 64), jnp.bfloat16, True, "Tq == Tk"),
  ],
)
def test_unsupported_shapes_raise(q_shape, k_shape, dtype, causal, match):
  q, k = jnp.zeros(q_shape, dtype), jnp.zeros(k_shape, dtype)
  assert match in hopper_reason(q, k, k, scale=0.125, causal=causal, platform="gpu")
  with pytest.raises(NotImplementedError, match=match):
    flash_attention(q, k, k, scale=0.125, causal=causal, hopper=True)


def test_tuning_checks():
  with pytest.raises(ValueError):
    Tuning(hopper_block_q=96)
  with pytest.raises(ValueError):
    Tuning(hopper_block_kv=320)
  with pytest.raises(ValueError):
    Tuning(hopper_stages=1)
  with pytest.raises(ValueError):
    Tuning(hopper_overlap=True)  # pingpong must be off
  # D=256 with 128-row kv tiles and 3 stages overflows shared memory.
  why = hopper.config_reason(256, jnp.bfloat16, Tuning(hopper_block_kv=128, hopper_stages=3))
  assert "shared memory" in why
  assert hopper.config_reason(128, jnp.bfloat16, Tuning()) is None


# ------------------------------------------------------------------------------ GPU (sm90)


def _sm90():
  return op_lib._sm90_default_device()


gpu = pytest.mark.skipif(not _sm90(), reason="needs an sm90 (Hopper) GPU")


@gpu
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("dim", [64, 128])
def test_gpu_matches_reference(causal, dtype, dim):
  q, k, v, do, dlse = inputs(0, 2, 1000, 1000, 4, 2, dim, dtype)
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-2,
    causal=causal,
    kernel=functools.partial(flash_attention, hopper=True),
  )


@gpu
@pytest.mark.parametrize(
  "tuning",
  [
    Tuning(hopper_block_q=128, hopper_block_kv=64, hopper_stages=3),
    Tuning(hopper_pingpong=False),
    Tuning(hopper_pingpong=False, hopper_overlap=True),
  ],
)
def test_gpu_tunings_and_cross_attention(tuning):
  q, k, v, do, dlse = inputs(1, 1, 333, 333, 2, 1, 128, jnp.bfloat16)
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-2,
    causal=True,
    kernel=functools.partial(flash_attention, hopper=True, tuning=tuning),
  )
  q, k, v, do, dlse = inputs(2, 1, 200, 900, 4, 4, 64, jnp.bfloat16)
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=1e-2,
    kernel=functools.partial(flash_attention, hopper=True, tuning=tuning),
  )


@gpu
def test_gpu_auto_uses_hopper_and_matches_triton():
  q, k, v, _, _ = inputs(3, 1, 512, 512, 2, 2, 128, jnp.bfloat16)
  hop = jax.jit(
    functools.partial(flash_attention, scale=0.1, causal=True, return_lse=True, hopper=True)
  )(q, k, v)
  tri = jax.jit(
    functools.partial(flash_attention, scale=0.1, causal=True, return_lse=True, hopper=False)
  )(q, k, v)
  np.testing.assert_allclose(np.asarray(hop[1]), np.asarray(tri[1]), atol=2e-2)
  assert (
    MOSAIC
    in jax.jit(functools.partial(flash_attention, scale=0.1, causal=True)).lower(q, k, v).as_text()
  )
