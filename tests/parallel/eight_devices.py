"""Context parallelism on 8 forced CPU devices: run by tests/parallel/test_parallel.py in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax starts).

Every family x strategy equals the single-device float32 reference, forward and gradients
(mesh data=2 x context=4, 3 heads, T=32: 8 tokens per shard)."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from attnzoo.ops import context_parallel as cp
from attnzoo.ops import delta_rule as dr
from attnzoo.ops import linear_attention as la
from attnzoo.ops import long_conv as lc
from attnzoo.ops import selective_scan as ss
from attnzoo.ops import short_conv as sc
from tests.conftest import relative_error

sa = importlib.import_module("attnzoo.ops.softmax_attention")

pytestmark = pytest.mark.skipif(jax.device_count() != 8, reason="needs 8 (forced) devices")

B, T, H = 2, 32, 3
TOL = 2e-5
BATCH = ("data",)  # the batch is split over data inside the shard_map too


def make_mesh(data=2, context=4):
  devices = np.array(jax.devices()).reshape(data, 1, context, 1)
  return Mesh(devices, ("data", "fsdp", "context", "tensor"))


def place(mesh, x):
  """Batch over data, time over context (the trainer's layout of a batch)."""
  spec = P("data", "context") if x.ndim >= 2 and x.shape[:2] == (B, T) else P()
  return jax.device_put(x, NamedSharding(mesh, spec))


def check(plan, call, op, reference, *args):
  """call(op, *args) under the plan == call(reference, *args) on one device: the outputs and
  the gradients of a fixed projection of them with respect to every float argument."""
  floats = [i for i, a in enumerate(args) if a is not None and a.dtype == jnp.float32]

  def grads(fn, *a):
    def loss(*chosen):
      full = list(a)
      for i, x in zip(floats, chosen):
        full[i] = x
      outs = jax.tree.leaves(call(fn, *full))
      weights = [jnp.cos(jnp.arange(o.size).reshape(o.shape)) for o in outs]
      return sum(jnp.sum(o * w) for o, w in zip(outs, weights)), outs

    argnums = tuple(range(len(floats)))
    return jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*[a[i] for i in floats])

  def both(*a):
    with cp.use(plan):
      got = grads(op, *a)
    return got, grads(reference, *a)

  placed = [None if a is None else place(plan.mesh, a) for a in args]
  ((_, got), g_got), ((_, want), g_want) = jax.jit(both)(*placed)
  for x, y in zip(got, want):
    assert relative_error(x, y) < TOL
  for i, (x, y) in enumerate(zip(g_got, g_want)):
    assert relative_error(x, y) < TOL, f"gradient of argument {floats[i]}"


# packed documents: boundaries inside shards (5, 20, 25) and on a shard boundary (16)
SEGMENTS = jnp.array([[0] * 5 + [1] * 11 + [2] * 9 + [3] * 7, [4] * 20 + [5] * 12], jnp.int32)


def normal(rng, *shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


SOFTMAX = [
  ("ring", True, True, None, 1),  # causal, zig-zag, multi-query
  ("allgather_kv", False, False, None, 3),  # bidirectional
  ("ring", False, True, 5, 3),  # a causal window: only the halo moves
  ("ring", False, True, None, 3),  # contiguous shards
  ("allgather_kv", True, True, None, 1),
]


@pytest.mark.parametrize("attention,zigzag,causal,window,kv_heads", SOFTMAX)
def test_softmax_attention(rng, attention, zigzag, causal, window, kv_heads):
  """(The zig-zag cases with packed documents.)"""
  plan = cp.Plan(make_mesh(), batch_axes=BATCH, attention=attention, zigzag=zigzag)
  q = normal(rng, B, T, H, 8)
  k, v = normal(rng, B, T, kv_heads, 8), normal(rng, B, T, kv_heads, 8)
  seg = SEGMENTS if zigzag else None
  call = lambda op, q, k, v, seg: op(
    q, k, v, scale=8**-0.5, causal=causal, window=window, segment_ids=seg
  )
  check(plan, call, sa.softmax_attention, sa.reference, q, k, v, seg)


LINEAR = [
  ("gla", "allgather"),  # per-key-channel decay, packed documents
  ("rwkv6_normalized", "logscan"),  # per-head decay, bonus readout, normaliser
  ("gla", "logscan"),
  ("normalized", "allgather"),
  ("rwkv6", "allgather"),
]


@pytest.mark.parametrize("form,state", LINEAR)
def test_linear_attention(rng, form, state):
  plan = cp.Plan(make_mesh(), batch_axes=BATCH, state=state)
  q, k, v = normal(rng, B, T, H, 4), normal(rng, B, T, H, 4), normal(rng, B, T, H, 5)
  g = -jnp.abs(normal(rng, B, T, H, 4, scale=0.3))
  h0 = normal(rng, B, H, 4, 5)
  kw = dict(scale=0.5, return_final_state=True)
  if form.endswith("normalized"):
    q, k = jnp.abs(q), jnp.abs(k)
    g, h0 = g[..., 0], jnp.abs(normal(rng, B, H, 4, 6))
    kw["normalize"] = True
  if form.startswith("rwkv6"):
    kw["bonus"] = normal(rng, H, 4)
  seg = SEGMENTS if form == "gla" else None
  call = lambda op, q, k, v, g, h0, seg: op(
    q, k, v, log_decay=g, initial_state=h0, segment_ids=seg, **kw
  )
  check(plan, call, la.linear_attention, la.reference, q, k, v, g, h0, seg)


@pytest.mark.parametrize("state", ["logscan", "allgather"])
def test_gated_delta_rule(rng, state):
  plan = cp.Plan(make_mesh(), batch_axes=BATCH, state=state)
  q, k, v = normal(rng, B, T, H, 4), normal(rng, B, T, H, 4), normal(rng, B, T, H, 5)
  k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
  beta = jax.nn.sigmoid(normal(rng, B, T, H))
  g = -jnp.abs(normal(rng, B, T, H, scale=0.2))
  h0 = normal(rng, B, H, 4, 5)
  call = lambda op, q, k, v, beta, g, h0, seg: op(
    q, k, v, beta, scale=0.5, log_decay=g, initial_state=h0, return_final_state=True,
    segment_ids=seg,
  )  # fmt: skip
  check(plan, call, dr.delta_rule, dr.reference, q, k, v, beta, g, h0, SEGMENTS)


@pytest.mark.parametrize("state", ["allgather", "logscan"])
def test_selective_scan(rng, state):
  plan = cp.Plan(make_mesh(), batch_axes=BATCH, state=state)
  d, n = 6, 4
  x, delta = normal(rng, B, T, d), normal(rng, B, T, d)
  A = -jnp.exp(normal(rng, d, n, scale=0.5))
  Bm, Cm = normal(rng, B, T, n), normal(rng, B, T, n)
  D, bias, h0 = normal(rng, d), normal(rng, d), normal(rng, B, d, n)
  op = functools.partial(ss.selective_scan, implementation="scan")  # CPU: the quick compile

  def call(op, x, delta, A, Bm, Cm, D, bias, h0, seg):
    return op(
      x, delta, A, Bm, Cm, D, delta_bias=bias, initial_state=h0, return_final_state=True,
      segment_ids=seg,
    )  # fmt: skip

  check(plan, call, op, ss.recurrent, x, delta, A, Bm, Cm, D, bias, h0, SEGMENTS)


@pytest.mark.parametrize("taps", [4, 12, 3])  # halo; all-gather; per-token halo
def test_short_conv(rng, taps):
  """(taps 3: per-token weights [B,T,K,C], the dynamic convolution's, split with x.)"""
  plan = cp.Plan(make_mesh(), batch_axes=BATCH)
  x, b = normal(rng, B, T, 6), normal(rng, 6)
  w = normal(rng, B, T, taps, 6) if taps == 3 else normal(rng, taps, 6)
  h0 = normal(rng, B, taps - 1, 6)
  call = lambda op, x, w, b, h0, seg: op(
    x, w, b, initial_state=h0, return_final_state=True, segment_ids=seg
  )
  check(plan, call, sc.short_conv, sc.reference, x, w, b, h0, SEGMENTS)


@pytest.mark.parametrize("taps", [32, 5])  # all-gather; halo
def test_long_conv(rng, taps):
  plan = cp.Plan(make_mesh(), batch_axes=BATCH)
  u, kernel = normal(rng, B, T, 6), normal(rng, taps, 6)
  call = lambda op, u, kernel, seg: op(u, kernel, segment_ids=seg)
  check(plan, call, lc.long_conv, lc.reference, u, kernel, SEGMENTS)


def collectives(fn, *args) -> dict:
  """Collective ops in the compiled HLO of fn(*args) (per kind)."""
  text = jax.jit(fn).lower(*args).compile().as_text()
  kinds = ("all-gather", "collective-permute", "all-reduce", "reduce-scatter", "all-to-all")
  return {k: text.count(f" {k}(") + text.count(f" {k}-start(") for k in kinds}


def test_compiled_collectives(rng):
  """The forward of each strategy holds the collectives it should, at W=4: ring: one ppermute
  per rotated array (k, v, positions, segment ids) in the scan body; all-gather KV: one
  all-gather of k, of v and of the positions (constant segment ids fold away); LASP-2: one
  all-gather of the decays and one of the states; log-step scan: log2(4) = 2 rounds of
  ppermutes of (decay, state) — the last round's decay is unused and removed — then one for the
  exclusive shift; a short conv's halo: one ppermute."""
  mesh = make_mesh()
  q, k, v = (place(mesh, normal(rng, B, T, H, 8)) for _ in range(3))
  x = place(mesh, normal(rng, B, T, 6))
  w = normal(rng, 4, 6)
  counts = {}
  for strategy in ("ring", "allgather_kv"):
    plan = cp.Plan(mesh, batch_axes=BATCH, attention=strategy, zigzag=False)
    with cp.use(plan):
      counts[strategy] = collectives(
        lambda q, k, v: sa.softmax_attention(q, k, v, scale=0.3, causal=True), q, k, v
      )
  for strategy in ("allgather", "logscan"):
    with cp.use(cp.Plan(mesh, batch_axes=BATCH, state=strategy)):
      counts[strategy] = collectives(
        lambda q, k, v: la.linear_attention(q, k, v, scale=0.3, log_decay=-jnp.abs(q)), q, k, v
      )
  with cp.use(cp.Plan(mesh, batch_axes=BATCH)):
    counts["short_conv"] = collectives(lambda x: sc.short_conv(x, w), x)
  only = lambda kind, n: {k: (n if k == kind else 0) for k in counts["ring"]}
  assert counts["ring"] == only("collective-permute", 4), counts
  assert counts["allgather_kv"] == only("all-gather", 3), counts
  assert counts["allgather"] == only("all-gather", 2), counts
  assert counts["logscan"] == only("collective-permute", 4), counts
  assert counts["short_conv"] == only("collective-permute", 1), counts


def test_per_device_memory_scales_as_one_over_w():
  """Compiled memory analysis of the forward on 1 and 4 context shards (T=512): arguments per
  device are exactly 1/4, temporaries at most 1.25/4 of one device's (ring: ~1/16, its score
  blocks are (T/W)^2); the ring's backward at most 1/8. `attnzoo bench sharding` prints every
  strategy at W = 1, 2, 4, 8."""
  x = jnp.ones((1, 512, 2, 16))
  softmax = lambda q: sa.softmax_attention(q, q, q, scale=0.25, causal=True)
  linear = lambda q: la.linear_attention(q, q, q, scale=0.25, log_decay=-jnp.abs(q))
  cases = {"ring": softmax, "allgather": linear}

  def memory(fn, w, strategy):
    mesh = Mesh(np.array(jax.devices()[:w]).reshape(1, 1, w, 1), make_mesh().axis_names)
    xs = jax.device_put(x, NamedSharding(mesh, P(None, "context")))
    attention = strategy if strategy != "allgather" else "ring"
    with cp.use(cp.Plan(mesh, attention=attention, zigzag=False)):
      m = jax.jit(fn).lower(xs).compile().memory_analysis()
    return m.argument_size_in_bytes, m.temp_size_in_bytes

  one = {"softmax": memory(softmax, 1, "ring"), "linear": memory(linear, 1, "ring")}
  for strategy, fn in cases.items():
    arguments, temp = memory(fn, 4, strategy)
    base = one["linear" if fn is linear else "softmax"]
    assert arguments * 4 == base[0]
    assert temp * 4 <= 1.25 * base[1], (strategy, temp, base)
  # the ring's backward (its custom VJP, a second ring pass) holds one block at a time: 1/10.5
  # of one device's temporaries at W = 4 (measured; autodiff through the forward scan, which
  # keeps every received block, gave 1/3.4)
  grad = jax.grad(lambda q: jnp.sum(softmax(q) ** 2))
  assert memory(grad, 4, "ring")[1] * 8 <= memory(grad, 1, "ring")[1]


@pytest.mark.parametrize("family", ["softmax", "linear", "delta_rule"])
def test_pallas_kernels_inside_the_shard_map(rng, family):
  """The Pallas kernels (interpret mode) as the local op: the flash kernel in the ring (its
  lse cotangent included), the linear-attention kernel from an entering state, the delta-rule
  kernel on values widened by the transition's K columns."""
  plan = cp.Plan(make_mesh(), batch_axes=BATCH, state="logscan")
  q, k, v = normal(rng, B, T, H, 16), normal(rng, B, T, H, 16), normal(rng, B, T, H, 16)
  if family == "softmax":
    call = lambda op, *a: op(*a, scale=0.25, causal=True)
    op = functools.partial(sa.softmax_attention, implementation="interpret")
    check(plan, call, op, sa.reference, q, k[:, :, :1], v[:, :, :1])
  elif family == "linear":
    g = -jnp.abs(normal(rng, B, T, H, 16, scale=0.3))
    call = lambda op, q, k, v, g: op(q, k, v, log_decay=g, scale=0.25)
    op = functools.partial(la.linear_attention, implementation="interpret")
    check(plan, call, op, la.reference, q, k, v, g)
  else:
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    beta = jax.nn.sigmoid(normal(rng, B, T, H))
    call = lambda op, q, k, v, beta: op(q, k, v, beta, scale=0.25)
    op = functools.partial(dr.delta_rule, implementation="interpret")
    check(plan, call, op, dr.reference, q, k, v, beta)
