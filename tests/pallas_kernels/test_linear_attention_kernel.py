"""Pallas linear-attention kernel against the ops reference: forward, final state, all grads.

Runs the kernel in interpret mode on CPU. On a GPU, ATTNZOO_KERNEL_IMPL=pallas runs the same
tests on the compiled (Triton) kernel.
"""

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import pytest

from attnzoo.ops import linear_attention as la
from pallas_kernels.linear_attention import Tuning, default_splits
from pallas_kernels.linear_attention import linear_attention as kernel
from tests.conftest import slow
from tests.ops.test_linear_attention import assert_all_close, loss_and_grads, make_inputs, rel

IMPL = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret")
INTERPRET = IMPL != "pallas"
# further cases of paths the default cases already cover: opt-in in interpret mode (minutes on
# the CPU), always run by the compiled kernel
slow_here = slow if INTERPRET else ()
if not INTERPRET and jax.default_backend() != "gpu":
  pytest.skip("ATTNZOO_KERNEL_IMPL=pallas needs a GPU", allow_module_level=True)
if not INTERPRET:  # float32 references without TF32
  jax.config.update("jax_default_matmul_precision", "highest")


def kernel_op(
  q,
  k,
  v,
  *,
  scale,
  log_decay=None,
  bonus=None,
  normalize=False,
  initial_state=None,
  return_final_state=False,
  segment_ids=None,
  tuning,
):
  """The op's semantics on top of the kernel package, with an explicit tuning."""
  assert not normalize
  o, hT = kernel(
    q,
    k,
    v,
    log_decay,
    scale=scale,
    bonus=bonus,
    initial_state=initial_state,
    segment_ids=segment_ids,
    tuning=tuning,
    interpret=INTERPRET,
  )
  return (o, hT) if return_final_state else o


# chunk 16 with 16-wide state tiles (V=20 -> two V tiles in every kernel; the gradient kernel
# in 16-wide K tiles without decay or with vector decay); chunk 32 (vector decay: one 32-row
# block where exact, else two 16-row sub-blocks; c32s16 forces the latter, in K tiles)
TUNINGS = {
  "c16": Tuning(chunk=16, block_k=16, block_v=16, block_v_out=16, block_k_grad=16),
  "c32": Tuning(chunk=32, block_k=16, block_v=32),
  "c32s16": Tuning(chunk=32, sub=16, block_k=16, block_v=32, block_k_grad=16),
}


@pytest.mark.parametrize(
  "variant,tuning",
  [
    pytest.param("none", "c16", marks=slow_here),
    pytest.param("scalar", "c16", marks=slow_here),
    ("vector", "c32"),
    ("vector", "c32s16"),
    pytest.param("bonus", "c16", marks=slow_here),
    ("bonus", "c32"),
    ("retnet", "c32"),
  ],
)
def test_kernel_float32(variant, tuning):
  q, k, v, kw = make_inputs(variant, seed=11)
  want = loss_and_grads(la.reference, q, k, v, kw)
  got = loss_and_grads(
    functools.partial(kernel_op, tuning=TUNINGS[tuning]),
    q,
    k,
    v,
    {**kw, "log_decay": _full_decay(kw, q)},
  )
  if variant == "retnet":  # the kernel took the fixed decay broadcast to [B,T,H]
    got[2][3]["log_decay"] = jnp.sum(got[2][3]["log_decay"], axis=(0, 1))
  assert_all_close(got, want, 1e-5, f"{variant} ")


@pytest.mark.parametrize(
  "variant",
  [pytest.param("none", marks=slow_here), pytest.param("scalar", marks=slow_here), "vector"],
)
def test_kernel_state_tiles_over_k(variant):
  """K=40 (padded to 64) in 16-wide K tiles of the state kernels and (no decay, vector decay)
  of the gradient kernel, V=20 in 16-wide V tiles."""
  ks = jax.random.split(jax.random.key(16), 5)
  b, t, h, kd, vd = 2, 37, 3, 40, 20
  q = jax.random.normal(ks[0], (b, t, h, kd)) * 0.3
  k = jax.random.normal(ks[1], (b, t, h, kd)) * 0.3
  v = jax.random.normal(ks[2], (b, t, h, vd))
  shape = (b, t, h) if variant == "scalar" else (b, t, h, kd)
  log_decay = jax.nn.log_sigmoid(jax.random.normal(ks[3], shape) + 2.0)
  kw = dict(
    scale=0.2,
    log_decay=None if variant == "none" else log_decay,
    initial_state=jax.random.normal(ks[4], (b, h, kd, vd)) * 0.1,
    segment_ids=jnp.asarray((jnp.arange(t)[None] >= jnp.array([[20], [0]])), jnp.int32),
  )
  want = loss_and_grads(la.reference, q, k, v, kw)
  got = loss_and_grads(functools.partial(kernel_op, tuning=TUNINGS["c16"]), q, k, v, kw)
  assert_all_close(got, want, 1e-5, f"{variant} K tiles ")


@pytest.mark.parametrize(
  "variant,splits",
  [
    pytest.param("none", 4, marks=slow_here),
    ("scalar", 2),
    ("vector", 4),
    pytest.param("bonus", 2, marks=slow_here),
  ],
)
def test_kernel_split_sequence(variant, splits):
  """The sequential kernels walking 2 or 4 pieces of the sequence in parallel (chunk 16,
  T=61: 4 chunks), chained in XLA: same values, final state and gradients (initial state
  included) as the reference, with segment resets inside a piece and at a piece boundary."""
  q, k, v, kw = make_inputs(variant, seed=18, t=61, segments=False)
  starts = jnp.array([32, 21] + [61] * (q.shape[0] - 2))[:, None]
  kw["segment_ids"] = (jnp.arange(61)[None] >= starts).astype(jnp.int32)
  kw["log_decay"] = _full_decay(kw, q)
  want = loss_and_grads(la.reference, q, k, v, kw)
  tuning = dataclasses.replace(TUNINGS["c16"], state_splits=splits)
  got = loss_and_grads(functools.partial(kernel_op, tuning=tuning), q, k, v, kw)
  assert_all_close(got, want, 1e-5, f"{variant} split in {splits} ")


def test_split_count_default():
  """Sequences are split only where the sequential grid would be small: 1x16384x16 at K=V=128
  (64 state tiles of 64x64, 256 chunks) -> 4 pieces; 4x4096x16 (256 tiles) -> none; scalar
  decay at 1x16384 (32x32 tiles, 256 of them) -> none; 1x1000x16 (64 tiles, 16 chunks) -> 2
  pieces of 8 chunks; never pieces under 8 chunks or not dividing the chunks."""
  assert [
    default_splits(64, 256),
    default_splits(256, 64),
    default_splits(256, 256),
    default_splits(64, 16),
    default_splits(64, 8),
    default_splits(1, 24),
    default_splits(1, 17),
  ] == [4, 1, 1, 2, 1, 2, 1]


def test_kernel_strong_vector_decay_takes_sub_blocks():
  """About -6 per step: one 32-row block would clamp (wrong), so the default tuning takes
  16-row sub-blocks (chosen at run time: in the forward on GPU by the output kernel's two
  launches, else through lax.cond) and stays exact."""
  q, k, v, kw = make_inputs("vector", seed=17)
  kw["log_decay"] = -6.0 + 0.5 * jnp.tanh(kw["log_decay"])
  want = loss_and_grads(la.reference, q, k, v, kw)
  got = loss_and_grads(functools.partial(kernel_op, tuning=TUNINGS["c32"]), q, k, v, kw)
  # the decay gradient sums terms ~e^40 apart; the pure-jnp chunked form is 1.6e-4 off too
  assert rel(got[2][3].pop("log_decay"), want[2][3].pop("log_decay")) <= 1e-3
  assert_all_close(got, want, 1e-5, "strong decay ")
  wide = functools.partial(kernel_op, tuning=Tuning(chunk=32, sub=32, block_v=32))
  assert rel(wide(q, k, v, **kw), want[0]) > 1e-2  # the bound the default avoids is real


def _full_decay(kw, q):
  g = kw.get("log_decay")
  if g is not None and g.ndim == 1:
    g = jnp.broadcast_to(g, q.shape[:3])
  return g


@pytest.mark.parametrize("variant", [pytest.param("scalar", marks=slow_here), "bonus"])
def test_kernel_bf16(variant):
  q, k, v, kw = make_inputs(variant, seed=12)
  bf = lambda x: x.astype(jnp.bfloat16)
  up = lambda x: x.astype(jnp.float32)
  q, k, v = bf(q), bf(k), bf(v)
  want = loss_and_grads(la.reference, up(q), up(k), up(v), kw)
  got = loss_and_grads(functools.partial(kernel_op, tuning=TUNINGS["c16"]), q, k, v, kw)
  assert got[0].dtype == jnp.bfloat16
  assert_all_close(got, want, 1e-2, f"bf16 {variant} ")


@pytest.mark.parametrize("variant", ["normalized", pytest.param("vector", marks=slow_here)])
def test_op_dispatch_default_tuning(variant):
  """Through linear_attention(implementation=...), default blocks (chunk 64), T=150."""
  q, k, v, kw = make_inputs(variant, seed=13, t=150)
  want = loss_and_grads(la.reference, q, k, v, kw)
  op = functools.partial(la.linear_attention, implementation=IMPL)
  assert_all_close(loss_and_grads(op, q, k, v, kw), want, 1e-5, f"op {variant} ")


def test_kernel_bf16_long_decay_stability():
  """Strong vector decay over long T: outputs stay finite and match the chunked form."""
  q, k, v, kw = make_inputs("vector", seed=14, t=256, segments=False)
  kw["log_decay"] = kw["log_decay"] * 8.0  # about -1.6 per step, tails below -5
  bf = lambda x: x.astype(jnp.bfloat16)
  q, k, v = bf(q), bf(k), bf(v)
  o = la.linear_attention(q, k, v, **kw, implementation=IMPL)
  up = lambda x: x.astype(jnp.float32)
  ref = la.reference(up(q), up(k), up(v), **kw)
  assert bool(jnp.all(jnp.isfinite(o.astype(jnp.float32))))
  assert rel(o, ref) <= 1e-2


@pytest.mark.skipif(INTERPRET, reason="device shapes: compiled kernel only")
@pytest.mark.parametrize("variant", ["scalar", "vector", "bonus", "normalized"])
def test_kernel_device_shapes_bf16(variant):
  """Default blocks at K=V=128, T=1000 (not a multiple of 64), vs the float32 chunked form.
  The normalised case runs in float32 with the kernel's dots in TF32x3 (three tensor-core
  passes, ~2^-22 relative): IEEE float32 dots of 64x128 tiles kept ptxas busy for minutes."""
  b, t, h, d = 2, 1000, 4, 128
  ks = jax.random.split(jax.random.key(15), 6)
  q = jax.random.normal(ks[0], (b, t, h, d)) * d**-0.5
  k = jax.random.normal(ks[1], (b, t, h, d)) * d**-0.5
  v = jax.random.normal(ks[2], (b, t, h, d))
  kw = dict(scale=d**-0.5, initial_state=jax.random.normal(ks[3], (b, h, d, d)) * 0.1)
  if variant == "scalar":
    kw["log_decay"] = -jax.nn.softplus(jax.random.normal(ks[4], (b, t, h))) * 0.1
  elif variant in ("vector", "bonus"):
    kw["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[4], (b, t, h, d))) / 4
  if variant == "bonus":
    kw["bonus"] = jax.random.normal(ks[5], (h, d)) * 0.3
  if variant == "normalized":
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1
    kw["normalize"] = True
    kw["initial_state"] = jnp.abs(jnp.concatenate([kw["initial_state"]] * 2, -1)[..., : d + 1])
  seg = jnp.asarray((jnp.arange(t)[None] >= jnp.array([[400], [0]])).astype(jnp.int32))
  kw["segment_ids"] = seg
  # bf16, except the normalised form: its dq is a small difference of two large terms
  # (numerator and normaliser paths), about 3e-2 off in bf16 even for the pure-jnp form
  dtype, tol = (jnp.float32, 1e-5) if variant == "normalized" else (jnp.bfloat16, 1e-2)
  q, k, v = (x.astype(dtype) for x in (q, k, v))
  up = lambda x: x.astype(jnp.float32)
  want = loss_and_grads(functools.partial(la.chunked, chunk_size=64), up(q), up(k), up(v), kw)
  op = functools.partial(la.linear_attention, implementation=IMPL)
  with jax.default_matmul_precision("TF32_TF32_F32_X3" if dtype == jnp.float32 else None):
    got = loss_and_grads(op, q, k, v, kw)
  assert_all_close(got, want, tol, f"device {variant} ")


def test_gpu_sub_block_choice_without_host_wait():
  """Vector decay lowered for an H200 (no device needed): the forward launches the output
  kernel in both sub-block forms, the second writing in place of the first's o, and has no
  conditional (XLA's GPU conditional waits on the host for its predicate); the backward keeps
  one lax.cond around its dv and dq/dk/dg kernels (cheaper there than two idle launches)."""
  from tests.pallas_kernels.test_flash_attention_hopper import export_cuda

  q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.bfloat16)
  g = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)

  def forward(q, k, v, g):
    return kernel(q, k, v, g, scale=0.125, platform="gpu")[0]

  def loss(q, k, v, g):
    return jnp.sum(forward(q, k, v, g).astype(jnp.float32))

  text = export_cuda(forward, q, q, q, g)
  assert text.count('name = "output_kernel"') == 2, text.count('name = "output_kernel"')
  assert "output_operand_aliases" in text and "stablehlo.case" not in text
  text = export_cuda(jax.grad(loss, argnums=(0, 1, 2, 3)), q, q, q, g)
  assert text.count("stablehlo.case") == 1
