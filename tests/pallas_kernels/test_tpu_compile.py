"""Opt-in: the TPU kernels through the real Mosaic compiler, ahead of time, on a CPU host.

The export/interpret tests (test_flash_attention_tpu.py, test_delta_rule_tpu.py) stop at the
Pallas TPU lowering; Mosaic's own compiler lives in libtpu. With libtpu installed, jax can
compile for a TPU topology description without a TPU (`jax.experimental.topologies`), which
runs Mosaic on every kernel: layouts, VMEM budgets, scalar prefetch, block shapes.

Opt in by pointing ATTNZOO_LIBTPU_PATH at a directory holding the `libtpu` package of the
version this jax wants (the project venv has none), e.g.

    pip install --target /opt/libtpu "libtpu==0.0.48.1"      # for jax 0.11.2
    ATTNZOO_LIBTPU_PATH=/opt/libtpu python -m pytest tests/pallas_kernels/test_tpu_compile.py

(or install libtpu into the venv itself). Otherwise the tests skip. libtpu reads its
environment when jax initialises its backends, so each generation compiles in a subprocess
(`python -m tests.pallas_kernels.test_tpu_compile TOPOLOGY`) with the TPU variables set.
"""

import importlib.util
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
LIBTPU_ENV = "ATTNZOO_LIBTPU_PATH"
# Topology names of jax.experimental.topologies (one chip of each is compiled for).
GENERATIONS = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "tpu7x": "tpu7x:2x2x1"}


def _libtpu_pythonpath():
  """(directory to prepend to PYTHONPATH or "", None) or (None, reason to skip)."""
  path = os.environ.get(LIBTPU_ENV)
  if path:
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.basename(path) == "libtpu" and os.path.isfile(os.path.join(path, "libtpu.so")):
      path = os.path.dirname(path)  # pointed at the package itself
    if os.path.isfile(os.path.join(path, "libtpu", "libtpu.so")):
      return path, None
    return None, f"{LIBTPU_ENV}={path} holds no libtpu package (libtpu/libtpu.so)"
  if importlib.util.find_spec("libtpu") is not None:
    return "", None
  return None, (
    f"libtpu cannot be imported: set {LIBTPU_ENV} to a directory holding the libtpu "
    "package (pip install --target DIR libtpu==<the version jax wants>) to compile "
    "the TPU kernels with the real Mosaic compiler"
  )


@pytest.mark.parametrize("generation", sorted(GENERATIONS))
def test_mosaic_compiles(generation):
  libtpu_dir, why = _libtpu_pythonpath()
  if why:
    pytest.skip(why)
  env = dict(os.environ)
  env.update(
    PYTHONPATH=os.pathsep.join(p for p in (libtpu_dir, str(REPO), env.get("PYTHONPATH")) if p),
    # A CPU host describing a TPU slice: no TPU metadata server, no device to open; several
    # test processes may load libtpu at once.
    JAX_PLATFORMS="cpu",
    TPU_ACCELERATOR_TYPE="v5litepod-4",
    TPU_WORKER_HOSTNAMES="localhost",
    TPU_SKIP_MDS_QUERY="1",
    ALLOW_MULTIPLE_LIBTPU_LOAD="1",
  )
  result = subprocess.run(
    [sys.executable, "-m", "tests.pallas_kernels.test_tpu_compile", GENERATIONS[generation]],
    cwd=REPO,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  lines = [line for line in result.stdout.splitlines() if line.startswith(("OK", "FAIL"))]
  report = "\n".join(lines) + "\n--- stderr (tail) ---\n" + result.stderr[-4000:]
  assert result.returncode == 0, report
  assert len(lines) == len(_case_names()) and all(l.startswith("OK") for l in lines), report


# ------------------------------------------------------------------ the compiling subprocess

# Flash attention: (batch, Tq, Tk, H, Hkv, D, dtype name), keywords as in
# test_flash_attention_tpu.flash_case. Every T but the block-mask case's is off the 128-row
# tile.
FLASH_CASES = {
  "causal_gqa_bf16_d128": ((1, 300, 300, 4, 2, 128, "bfloat16"), dict(causal=True)),
  "cross_mqa_f32_d64": ((1, 200, 330, 4, 1, 64, "float32"), dict()),
  "window_f16_d64": ((2, 200, 200, 2, 2, 64, "float16"), dict(causal=True, window=(50, 0))),
  "segments_softcap_scale_bf16_d256": (
    (2, 256, 256, 4, 2, 256, "bfloat16"),
    dict(causal=True, softcap=20.0, segments=True, scale=True),
  ),
  "block_mask_positions_f32_d32": (
    (1, 256, 384, 2, 1, 32, "float32"),
    dict(block_mask=True, positions=True, causal=True),
  ),
}
# Delta rule: (batch, T, H, Dk, Dv, dtype name), gated, segmented.
DELTA_CASES = {
  "delta_plain_f32": ((1, 100, 2, 24, 40, "float32"), False, False),
  "delta_gated_segmented_bf16": ((1, 200, 2, 64, 128, "bfloat16"), True, True),
}


# Linear attention: (batch, T, H, K, V, dtype name), decay kind; with bonus, segments and an
# initial state (all differentiated).
LINEAR_CASES = {
  "linear_none_f32": ((2, 100, 3, 40, 20, "float32"), "none"),
  "linear_scalar_bf16_d128": ((1, 1000, 2, 128, 128, "bfloat16"), "scalar"),
  "linear_vector_bf16_d128": ((1, 1000, 2, 128, 128, "bfloat16"), "vector"),
}


def _linear_fn(name, sds):
  import jax
  import jax.numpy as jnp

  from pallas_kernels.linear_attention import linear_attention

  (b, t, h, dk, dv, dtype), kind = LINEAR_CASES[name]
  dtype, f32 = jnp.dtype(dtype), jnp.float32

  def loss(q, k, v, log_decay, bonus, state, segments):
    o, s = linear_attention(
      q,
      k,
      v,
      log_decay,
      scale=0.3,
      bonus=bonus,
      initial_state=state,
      segment_ids=segments,
      platform="tpu",
    )
    return jnp.sum(o.astype(f32) ** 2) + jnp.sum(s)

  decay = {"none": None, "scalar": (b, t, h), "vector": (b, t, h, dk)}[kind]
  args = (
    sds((b, t, h, dk), dtype),
    sds((b, t, h, dk), dtype),
    sds((b, t, h, dv), dtype),
    None if decay is None else sds(decay, f32),
    sds((h, dk), dtype),
    sds((b, h, dk, dv), f32),
    sds((b, t), jnp.int32),
  )
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)), args


def _case_names():
  return (
    ["flash_fwd_causal_gqa_bf16_d128"]
    + [f"flash_grad_{n}" for n in FLASH_CASES]
    + [f"{n}_grad" for n in DELTA_CASES]
    + [f"{n}_grad" for n in LINEAR_CASES]
  )


def _flash_fn(name, sds, grad):
  import jax.numpy as jnp

  from tests.pallas_kernels.test_flash_attention_tpu import flash_case

  shape, kw = FLASH_CASES[name]
  return flash_case(shape[:-1] + (jnp.dtype(shape[-1]),), kw, sds, grad)


def _delta_fn(name, sds):
  import jax
  import jax.numpy as jnp

  from pallas_kernels.delta_rule import delta_rule

  (b, t, h, dk, dv, dtype), gated, segmented = DELTA_CASES[name]
  dtype = jnp.dtype(dtype)

  def loss(q, k, v, beta, log_decay, state, segments):
    o, s = delta_rule(
      q,
      k,
      v,
      beta,
      scale=0.3,
      log_decay=log_decay if gated else None,
      initial_state=state,
      segment_ids=segments if segmented else None,
      platform="tpu",
    )
    return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

  f32 = jnp.float32
  args = (
    sds((b, t, h, dk), dtype),
    sds((b, t, h, dk), dtype),
    sds((b, t, h, dv), dtype),
    sds((b, t, h), f32),
    sds((b, t, h), f32),
    sds((b, h, dk, dv), f32),
    sds((b, t), jnp.int32),
  )
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4, 5)), args


def _compile_all(topology_name):
  """Compiles every case for one chip of the topology; prints OK/FAIL lines; exit status."""
  import jax
  from jax.experimental import topologies

  device = topologies.get_topology_desc(platform="tpu", topology_name=topology_name).devices[0]
  print(device.device_kind, flush=True)
  sharding = jax.sharding.SingleDeviceSharding(device)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  # Lowering rules that depend on the chip read it from the abstract mesh.
  abstract = jax.sharding.AbstractDevice(
    device_kind=device.device_kind, num_cores=getattr(device, "num_cores", 1) or 1, platform="tpu"
  )
  mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=abstract)
  jobs = [
    ("flash_fwd_causal_gqa_bf16_d128", lambda: _flash_fn("causal_gqa_bf16_d128", sds, grad=False))
  ]
  jobs += [(f"flash_grad_{n}", lambda n=n: _flash_fn(n, sds, grad=True)) for n in FLASH_CASES]
  jobs += [(f"{n}_grad", lambda n=n: _delta_fn(n, sds)) for n in DELTA_CASES]
  jobs += [(f"{n}_grad", lambda n=n: _linear_fn(n, sds)) for n in LINEAR_CASES]
  failed = 0
  for name, make in jobs:
    start = time.time()
    try:
      fn, args = make()
      with jax.sharding.use_abstract_mesh(mesh):
        lowered = jax.jit(fn).lower(*args)
      text = lowered.as_text()
      lowered.compile()
      kernels = text.count("@tpu_custom_call")
      assert kernels >= 3 if "grad" in name else kernels >= 1, f"{kernels} Mosaic kernels"
      print(f"OK   {name} ({kernels} kernels, {time.time() - start:.1f}s)", flush=True)
    except Exception as e:  # report every case, then fail
      failed += 1
      print(f"FAIL {name}: {type(e).__name__}: {str(e)[:3000]}", flush=True)
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(_compile_all(sys.argv[1]))
