"""Flash-attention kernel vs the float32 reference: forward, LSE and gradients (dq, dk, dv).

On CPU the kernel runs in Pallas interpret mode (implementation "interpret"); dots there are
exact float32, so float32 must match to 1e-5 relative. To run the same tests on a GPU with the
compiled kernel: ATTNZOO_KERNEL_IMPL=pallas pytest tests/pallas_kernels/test_flash_attention.py
(add --noconftest where tests/conftest.py needs packages the GPU machine lacks).
On GPU the kernel's float32 dots are IEEE (precision HIGHEST, no TF32) and the reference runs
under default_matmul_precision("highest"); the GPU float32 tolerance is 1e-4 to leave room for
the device's exp2/log2/tanh approximations. bf16 is 1e-2 everywhere.
The mask tests also run the kernels' pure-jnp blockwise twin (`chunked`, in key blocks of 32
that no T here is a multiple of) against the same reference.
"""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import Unsupported
from attnzoo.ops.softmax_attention import EMPTY, reference, softmax_attention
from pallas_kernels.flash_attention import chunked, schedule

IMPL = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret")
F32_TOL = 1e-5 if IMPL == "interpret" else 1e-4
BF16_TOL = 1e-2
# `check`'s kernel: the one IMPL names, or the pure-jnp twin
KERNELS = {"kernel": None, "chunked": functools.partial(chunked, block_k=32)}
twin_too = pytest.mark.parametrize("impl", sorted(KERNELS))


def rel_err(x, ref):
  x = np.asarray(x, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-30))


def inputs(seed, batch, tq, tk, heads, kv_heads, dim, dtype, dim_v=None):
  ks = jax.random.split(jax.random.key(seed), 5)
  dim_v = dim_v or dim
  q = jax.random.normal(ks[0], (batch, tq, heads, dim), jnp.float32)
  k = jax.random.normal(ks[1], (batch, tk, kv_heads, dim), jnp.float32)
  v = jax.random.normal(ks[2], (batch, tk, kv_heads, dim_v), jnp.float32)
  do = jax.random.normal(ks[3], (batch, tq, heads, dim_v), jnp.float32)
  dlse = jax.random.normal(ks[4], (batch, tq, heads), jnp.float32)
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), do, dlse


def check(q, k, v, do, dlse, *, tol, use_lse=True, grad_scale=False, kernel=None, **kw):
  """Compares o, lse and d(q,k,v[,scale]) of the kernel (default: softmax_attention with
  IMPL) against the f32 reference."""
  scale = kw.pop("scale", q.shape[-1] ** -0.5)

  static_scale = None if grad_scale else scale  # a Python float stays a static constant

  def loss(fn, q, k, v, scale_arg, do, dlse):
    scale = static_scale if static_scale is not None else scale_arg
    o, lse = fn(q, k, v, scale=scale, return_lse=True, **kw)
    total = jnp.sum(o.astype(jnp.float32) * do)
    if use_lse:
      total += jnp.sum(lse * dlse)
    return total, (o, lse)

  if kernel is None:
    kernel = lambda *a, **k2: softmax_attention(*a, implementation=IMPL, **k2)
  argnums = (0, 1, 2, 3) if grad_scale else (0, 1, 2)
  (_, (o, lse)), grads = jax.jit(
    jax.value_and_grad(lambda *a: loss(kernel, *a), argnums=argnums, has_aux=True)
  )(q, k, v, scale, do, dlse)
  f32 = lambda x: x.astype(jnp.float32)
  with jax.default_matmul_precision("highest"):
    (_, (ro, rlse)), rgrads = jax.jit(
      jax.value_and_grad(lambda *a: loss(reference, *a), argnums=argnums, has_aux=True)
    )(f32(q), f32(k), f32(v), scale, do, dlse)
  assert o.shape == ro.shape and o.dtype == q.dtype
  assert rel_err(o, ro) <= tol, ("out", rel_err(o, ro))
  finite = np.isfinite(np.asarray(rlse))
  np.testing.assert_array_equal(np.isfinite(np.asarray(lse)), finite)
  assert rel_err(np.where(finite, lse, 0), np.where(finite, rlse, 0)) <= tol
  for name, g, rg in zip(("dq", "dk", "dv", "dscale"), grads, rgrads):
    assert g.shape == jnp.shape(rg), name
    assert np.all(np.isfinite(np.asarray(g, np.float32))), name
    assert rel_err(g, rg) <= tol, (name, rel_err(g, rg))
  return o, lse


# Each case: (batch, Tq, Tk, H, Hkv, D) and mask keywords. T is never a multiple of the tile.
CASES = {
  "causal_gqa": ((2, 100, 100, 4, 2, 64), dict(causal=True)),
  "noncausal_mqa_cross": ((1, 72, 130, 3, 1, 40), dict()),
  "window_left_right": ((1, 150, 150, 2, 2, 32), dict(window=(17, 9))),
  "window_causal": ((2, 200, 200, 2, 1, 32), dict(causal=True, window=37)),
  "softcap_causal": ((1, 90, 90, 4, 4, 64), dict(causal=True, softcap=3.0)),
}


@twin_too
@pytest.mark.parametrize("name", sorted(CASES))
def test_masks_f32(name, impl):
  (b, tq, tk, h, hkv, d), kw = CASES[name]
  q, k, v, do, dlse = inputs(0, b, tq, tk, h, hkv, d, jnp.float32)
  check(q, k, v, do, dlse, tol=F32_TOL, kernel=KERNELS[impl], **kw)


@twin_too
def test_segment_ids_packed_documents(impl):
  b, t = 2, 160
  q, k, v, do, dlse = inputs(1, b, t, t, 4, 2, 32, jnp.float32)
  rng = np.random.default_rng(0)
  seg = np.stack([np.sort(rng.integers(0, 5, t)) for _ in range(b)]).astype(np.int32)
  check(
    q, k, v, do, dlse, tol=F32_TOL, causal=True, segment_ids=jnp.asarray(seg), kernel=KERNELS[impl]
  )
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=F32_TOL,
    causal=False,
    window=(40, 40),
    segment_ids=jnp.asarray(seg),
    kernel=KERNELS[impl],
  )


@twin_too
def test_block_sparse_map(impl):
  b, tq, tk = 2, 120, 136
  q, k, v, do, dlse = inputs(2, b, tq, tk, 2, 2, 32, jnp.float32)
  rng = np.random.default_rng(1)
  bm = rng.random((b, 4, 5)) < 0.6
  bm[:, :, 0] = True  # every query row sees something
  check(
    q,
    k,
    v,
    do,
    dlse,
    tol=F32_TOL,
    block_mask=jnp.asarray(bm),
    block_mask_size=(32, 32),
    causal=True,
    kernel=KERNELS[impl],
  )


@twin_too
def test_per_head_temperature_grad(impl):
  q, k, v, do, dlse = inputs(3, 1, 80, 80, 4, 2, 32, jnp.float32)
  scale = jnp.asarray([0.1, 0.2, 0.3, 0.05], jnp.float32)
  check(
    q, k, v, do, dlse, tol=F32_TOL, causal=True, scale=scale, grad_scale=True, kernel=KERNELS[impl]
  )


@twin_too
def test_kv_cache_positions_and_empty_rows(impl):
  # decoding-style: 20 queries at positions 40..59 against a 96-slot cache with empty slots;
  # segment ids leave some queries with no visible key (output 0, lse -inf, finite grads).
  b, tq, tk = 2, 20, 96
  q, k, v, do, dlse = inputs(4, b, tq, tk, 2, 1, 32, jnp.float32)
  q_pos = jnp.broadcast_to(jnp.arange(40, 60, dtype=jnp.int32), (b, tq))
  kv_pos = np.tile(np.arange(tk, dtype=np.int32), (b, 1))
  kv_pos[:, 60:] = EMPTY
  kv_pos[1, 10:30] = EMPTY
  q_seg = np.zeros((b, tq), np.int32)
  q_seg[:, :3] = 7  # no key carries segment 7
  kv_seg = np.zeros((b, tk), np.int32)
  o, lse = check(
    q,
    k,
    v,
    do,
    dlse,
    tol=F32_TOL,
    use_lse=False,
    causal=True,
    q_positions=q_pos,
    kv_positions=jnp.asarray(kv_pos),
    segment_ids=jnp.asarray(q_seg),
    kv_segment_ids=jnp.asarray(kv_seg),
    kernel=KERNELS[impl],
  )
  assert np.all(np.asarray(o)[:, :3] == 0) and np.all(np.asarray(lse)[:, :3] == -np.inf)


@pytest.mark.parametrize("causal", [True, False])
def test_bf16(causal):
  q, k, v, do, dlse = inputs(5, 2, 144, 144, 4, 2, 128, jnp.bfloat16)
  check(q, k, v, do, dlse, tol=BF16_TOL, causal=causal)


def test_head_dim_256_f16():
  q, k, v, do, dlse = inputs(6, 1, 48, 48, 2, 1, 256, jnp.float16)
  check(q, k, v, do, dlse, tol=BF16_TOL, causal=True, window=(16, 0))


def test_block_skipping_schedule():
  # window 64 at T=1024 with 64-wide tiles visits ~2 tiles per row instead of ~8.5 (causal).
  t, blk = 1024, 64
  pos = jnp.arange(t, dtype=jnp.int32)[None]
  causal = schedule.tile_kinds(
    pos, pos, None, None, block_q=blk, block_k=blk, causal=True, window=None
  )
  window = schedule.tile_kinds(
    pos, pos, None, None, block_q=blk, block_k=blk, causal=True, window=(64, 0)
  )
  assert int((causal > 0).sum()) == 16 * 17 // 2
  assert int((window > 0).sum()) == 16 + 15 and int((window == 2).sum()) == 0
  rows = schedule.schedule_rows(causal)
  np.testing.assert_array_equal(rows[0, 5, :2], [5, 6])  # 5 full tiles, then the diagonal


def _call(q, k, v, implementation, **kw):
  return softmax_attention(q, k, v, scale=0.1, implementation=implementation, **kw)


def test_unsupported_raise_before_tracing(monkeypatch):
  from pallas_kernels.flash_attention import calls

  def traced(*_, **__):
    raise AssertionError("kernel traced")

  monkeypatch.setattr(calls, "forward", traced)
  q = jnp.zeros((1, 32, 2, 32), jnp.float32)
  bias = jnp.zeros((1, 2, 32, 32), jnp.float32)
  with pytest.raises(Unsupported, match="bias"):
    _call(q, q, q, IMPL, bias=bias)
  with pytest.raises(Unsupported, match="dtype"):
    _call(q, q.astype(jnp.bfloat16), q, IMPL)
  with pytest.raises(Unsupported, match="head_dim"):
    big = jnp.zeros((1, 32, 2, 512), jnp.float32)
    _call(big, big, big, IMPL)
  with pytest.raises(Unsupported, match="per-head"):
    softmax_attention(q, q, q, scale=jnp.ones((3,)), implementation=IMPL)
  with pytest.raises(Unsupported, match="multiples of 16"):
    _call(q, q, q, IMPL, block_mask=jnp.ones((1, 4, 4), bool), block_mask_size=(8, 8))
  if jax.default_backend() not in ("gpu", "tpu"):
    with pytest.raises(Unsupported, match="GPU"):
      _call(q, q, q, "pallas")


def _flash_value_and_grads(q, k, v, **kw):
  from pallas_kernels.flash_attention import flash_attention

  def loss(q, k, v):
    o = flash_attention(q, k, v, scale=0.2, interpret=IMPL == "interpret", **kw)
    return jnp.sum(o * jnp.cos(jnp.arange(o.size, dtype=o.dtype).reshape(o.shape))), o

  (_, o), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, grads


def test_launch_order_head_groups():
  # Programs are decoded from (head in group, tile, group x batch) ids, the query tiles
  # heaviest first; every head_group (dividing H or not) must give the same result.
  from pallas_kernels.flash_attention import Tuning

  q, k, v, _, _ = inputs(7, 2, 100, 100, 6, 3, 32, jnp.float32)
  seg = jnp.asarray(np.repeat([[0, 1], [2, 2]], 50, axis=1).astype(np.int32))
  small = dict(block_q=32, block_k=16, block_q_dq=16, block_k_dq=32, block_q_dkv=16, block_k_dkv=32)
  results = []
  for group in (1, 4):  # 1 divides H=6, 4 does not
    tuning = Tuning(**small, head_group=group)
    results.append(
      _flash_value_and_grads(q, k, v, causal=True, window=(40, 0), segment_ids=seg, tuning=tuning)
    )
  for other in results[1:]:
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(other)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with jax.default_matmul_precision("highest"):  # no TF32 in the reference on GPU
    ref = reference(q, k, v, scale=0.2, causal=True, window=(40, 0), segment_ids=seg)
  assert rel_err(results[0][0], ref) <= F32_TOL


def test_static_schedule_matches_traced(monkeypatch):
  # Default positions: numpy schedules embedded as constants; the same computed by XLA (a
  # schedule too large for a constant), and explicit positions (per-batch schedule, tiles
  # read from the list) give the same outputs and gradients.
  from pallas_kernels.flash_attention import op

  b, t = 2, 90
  q, k, v, _, _ = inputs(8, b, t, t, 2, 1, 32, jnp.float32)
  kw = dict(causal=True, window=(30, 0))
  static = _flash_value_and_grads(q, k, v, **kw)
  pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  explicit = _flash_value_and_grads(q, k, v, q_positions=pos, kv_positions=pos, **kw)
  monkeypatch.setattr(op, "MAX_STATIC_SCHEDULE", 0)
  traced = _flash_value_and_grads(q, k, v, **kw)
  for other in (explicit, traced):
    for a, c in zip(jax.tree.leaves(static), jax.tree.leaves(other)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-6, atol=1e-6)
  pos = np.arange(96, dtype=np.int32)[None]
  rows_np = schedule.schedule_rows(
    schedule.tile_kinds(pos, pos, None, None, block_q=32, block_k=16, xp=np, **kw), np
  )
  rows_jnp = schedule.schedule_rows(
    schedule.tile_kinds(
      jnp.asarray(pos), jnp.asarray(pos), None, None, block_q=32, block_k=16, **kw
    )
  )
  np.testing.assert_array_equal(rows_np, np.asarray(rows_jnp))
