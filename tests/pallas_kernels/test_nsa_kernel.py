"""NSA selected-attention kernels (pallas_kernels.nsa) and their pure-jnp twin vs the float32
gather reference (attnzoo.ops.nsa.selected_reference): o, lse and gradients (dq, dk, dv, with
an lse cotangent), on T=37 (not a multiple of the block or the dk/dv tile), 3 query heads per
kv head (padded to 4 rows), head dim 12, n=3 selected blocks (padded to 4 slots).

On CPU the kernels run in interpret mode; on a GPU ATTNZOO_KERNEL_IMPL=pallas compiles them
(the selection block is then 16, the smallest Triton tile).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.ops import nsa as ops
from attnzoo.ops import softmax_attention
from pallas_kernels.nsa import dkv_schedule
from tests.conftest import relative_error, slow

IMPL = os.environ.get("ATTNZOO_KERNEL_IMPL", "interpret")
BLOCK = 8 if IMPL == "interpret" else 16
F32_TOL = 1e-5 if IMPL == "interpret" else 1e-4
# a further case (bf16, explicit positions): opt-in in interpret mode, always run compiled
slow_here = slow if IMPL == "interpret" else lambda f: f


def make_case(seed, batch=2, t=37, heads=6, kv_heads=2, d=12, n=3, dtype=jnp.float32):
  ks = jax.random.split(jax.random.key(seed), 6)
  q = jax.random.normal(ks[0], (batch, t, heads, d))
  k = jax.random.normal(ks[1], (batch, t, kv_heads, d))
  v = jax.random.normal(ks[2], (batch, t, kv_heads, d))
  do = jax.random.normal(ks[3], (batch, t, heads, d))
  dlse = jax.random.normal(ks[4], (batch, t, heads))
  ns = -(-t // BLOCK)
  scores = jax.random.uniform(ks[5], (batch, t, kv_heads, ns))
  positions = jnp.broadcast_to(jnp.arange(t), (batch, t))
  cfg = ops.Config(block_cmp=BLOCK, stride=BLOCK, block_slc=BLOCK, num_selected=n, num_local=1)
  idx = ops.select_blocks(scores, positions, cfg)
  cast = lambda x: x.astype(dtype)
  return cast(q), cast(k), cast(v), idx, do, dlse


def outputs_and_grads(fn, q, k, v, idx, do, dlse):
  def loss(q, k, v):
    o, lse = fn(q, k, v, idx)
    finite = jnp.isfinite(lse)
    total = jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(jnp.where(finite, lse, 0.0) * dlse)
    return total, (o, lse)

  (_, (o, lse)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
  return o, lse, grads


def test_selected_attention_matches_reference(impl=IMPL):
  """(The pure-jnp twin, "xla", is checked with gradients by tests/ops/test_nsa.py.)"""
  q, k, v, idx, do, dlse = make_case(0)
  fn = lambda q, k, v, idx: ops.selected_attention(
    q, k, v, idx, scale=0.3, block=BLOCK, implementation=impl
  )
  ref = lambda q, k, v, idx: ops.selected_reference(q, k, v, idx, scale=0.3, block=BLOCK)
  o, lse, grads = outputs_and_grads(fn, q, k, v, idx, do, dlse)
  with jax.default_matmul_precision("highest"):
    ro, rlse, rgrads = outputs_and_grads(ref, q, k, v, idx, do, dlse)
  assert relative_error(o, ro) <= F32_TOL
  np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(rlse))
  finite = np.isfinite(np.asarray(rlse))
  assert relative_error(np.asarray(lse)[finite], np.asarray(rlse)[finite]) <= F32_TOL
  for name, g, r in zip("qkv", grads, rgrads):
    assert relative_error(g, r) <= F32_TOL, name


@slow_here
def test_bf16_and_explicit_positions():
  """Decoding shape: a few queries at positions past the start attend into a longer cache."""
  q, k, v, idx, do, dlse = make_case(1, t=40, dtype=jnp.bfloat16)
  q, idx, do, dlse = q[:, -5:], idx[:, -5:], do[:, -5:], dlse[:, -5:]
  pos = jnp.broadcast_to(jnp.arange(35, 40), (2, 5))
  fn = lambda q, k, v, idx: ops.selected_attention(
    q, k, v, idx, scale=0.3, block=BLOCK, q_positions=pos, implementation=IMPL
  )
  ref = lambda q, k, v, idx: ops.selected_reference(
    q, k, v, idx, scale=0.3, block=BLOCK, q_positions=pos
  )
  o, _, grads = outputs_and_grads(fn, q, k, v, idx, do, dlse)
  ro, _, rgrads = outputs_and_grads(ref, *(x.astype(jnp.float32) for x in (q, k, v)), idx, do, dlse)
  assert o.dtype == jnp.bfloat16 and relative_error(o, ro) <= 1e-2
  for name, g, r in zip("qkv", grads, rgrads):
    assert relative_error(g, r) <= 1e-2, name


def test_dkv_schedule_lists_the_selecting_tiles():
  idx = jnp.array([[[[0, 2], [1, -1], [2, -1], [-1, -1]]]], jnp.int32)  # [1, 1, 4 tokens, 2]
  rows = np.asarray(dkv_schedule(idx, 4, 2))[0, 0]  # tiles of 2 tokens
  assert rows[:, 1].tolist() == [1, 1, 2, 0]  # tiles per block
  assert rows[0, 2] == 0 and rows[1, 2] == 0 and rows[2, 2:4].tolist() == [0, 1]


def test_selection_scores_kernel_matches_xla():
  """Block importance, the forward-only kernel against the chunked jnp form: several tiles of
  compressed blocks (their overlap spilling into the next tile's selection blocks), padded
  group rows and tokens, rows that see no compressed block."""
  cfg = ops.Config(block_cmp=2 * BLOCK, stride=BLOCK // 2, block_slc=BLOCK, num_selected=3)
  batch, t, heads, kv_heads, d = 1, 160 if IMPL == "interpret" else 1100, 6, 2, 12
  ks = jax.random.split(jax.random.key(3), 3)
  nc = ops.num_compressed(t, cfg)
  q = jax.random.normal(ks[0], (batch, t, heads, d))
  kc = jax.random.normal(ks[1], (batch, nc, kv_heads, d))
  pos = jnp.broadcast_to(jnp.arange(t), (batch, t))
  ends = jnp.broadcast_to(jnp.asarray(ops.compressed_ends(nc, cfg)), (batch, nc))
  ns = -(-t // cfg.block_slc)

  @jax.jit
  def scores(q, kc):
    _, lse = softmax_attention(
      q, kc, kc, scale=0.3, causal=True, q_positions=pos, kv_positions=ends, return_lse=True
    )
    return [
      ops.selection_scores(q, kc, lse, pos, ends, scale=0.3, ns=ns, config=cfg, implementation=i)
      for i in ("xla", IMPL)
    ]

  with jax.default_matmul_precision("highest"):  # the xla form's dots in float32 on GPU too
    want, got = scores(q, kc)
  assert float(want[:, : cfg.block_cmp - 1].max()) == 0.0  # nothing compressed yet
  assert relative_error(got, want) <= F32_TOL
