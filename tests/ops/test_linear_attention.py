"""attnzoo.ops.linear_attention: reference == recurrent == chunked ("xla") == step decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import linear_attention as la
from attnzoo.ops.dispatch import Unsupported
from tests.conftest import slow

B, T, H, K, V = 2, 37, 3, 12, 20
SCALE = 0.4
VARIANTS = ["none", "scalar", "vector", "bonus", "normalized", "retnet"]


def rel(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def make_inputs(variant, seed=0, t=T, segments=True):
  ks = jax.random.split(jax.random.key(seed), 8)
  q = jax.random.normal(ks[0], (B, t, H, K)) * 0.5
  k = jax.random.normal(ks[1], (B, t, H, K)) * 0.5
  v = jax.random.normal(ks[2], (B, t, H, V))
  kw = dict(scale=SCALE)
  vd = V
  if variant == "scalar":
    kw["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, t, H)) + 2.0)
  elif variant in ("vector", "bonus"):
    kw["log_decay"] = jax.nn.log_sigmoid(jax.random.normal(ks[3], (B, t, H, K)) + 2.0)
  elif variant == "retnet":
    kw["log_decay"] = jnp.log(1.0 - 2.0 ** (-5.0 - jnp.arange(H, dtype=jnp.float32)))
  if variant == "bonus":
    kw["bonus"] = jax.random.normal(ks[4], (H, K)) * 0.5
  if variant == "normalized":
    q, k = jax.nn.elu(q) + 1, jax.nn.elu(k) + 1  # positive feature maps
    kw["normalize"] = True
    vd = V + 1
  h0 = jax.random.normal(ks[5], (B, H, K, vd)) * 0.5
  if variant == "normalized":
    h0 = jnp.abs(h0)
  kw["initial_state"] = h0
  if segments:
    seg = np.zeros((B, t), np.int32)
    seg[0, 10:] = 1
    seg[0, 29:] = 7
    seg[1, :] = 3
    seg[1, 20:] = 4
    kw["segment_ids"] = jnp.asarray(seg)
  return q, k, v, kw


DIFF_KEYS = ("log_decay", "initial_state", "bonus")


def loss_and_grads(fn, q, k, v, kw, seed=1):
  """Gradient of <o, do> + <h_T, dh> w.r.t. q, k, v and every float keyword argument."""
  extra = {n: kw[n] for n in DIFF_KEYS if n in kw and kw[n] is not None}
  rest = {n: x for n, x in kw.items() if n not in extra}
  ks = jax.random.split(jax.random.key(seed), 2)

  def loss(q, k, v, extra):
    o, hT = fn(q, k, v, **extra, **rest, return_final_state=True)
    do = jax.random.normal(ks[0], o.shape)
    dh = jax.random.normal(ks[1], hT.shape)
    return jnp.sum(o.astype(jnp.float32) * do) + jnp.sum(hT * dh), (o, hT)

  (_, (o, hT)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
    q, k, v, extra
  )
  return o, hT, grads


def assert_all_close(got, want, tol, what=""):
  o, hT, (dq, dk, dv, dext) = got
  o_r, hT_r, (dq_r, dk_r, dv_r, dext_r) = want
  checks = {"o": (o, o_r), "h_T": (hT, hT_r), "dq": (dq, dq_r), "dk": (dk, dk_r), "dv": (dv, dv_r)}
  for name in dext_r:
    checks["d" + name] = (dext[name], dext_r[name])
  for name, (a, b) in checks.items():
    err = rel(a, b)
    assert err <= tol, f"{what}{name}: relative error {err:.2e} > {tol:.0e}"


# vector decay, the bonus and the normaliser by default; the simpler decays (none, scalar, fixed
# per head) are further opt-in cases of the same paths
@pytest.mark.parametrize(
  "variant",
  [v if v in ("vector", "bonus", "normalized") else pytest.param(v, marks=slow) for v in VARIANTS],
)
def test_recurrent_and_chunked_match_reference(variant):
  q, k, v, kw = make_inputs(variant)
  want = loss_and_grads(la.reference, q, k, v, kw)
  assert_all_close(loss_and_grads(la.recurrent, q, k, v, kw), want, 1e-5, "recurrent ")
  chunked16 = functools.partial(la.chunked, chunk_size=16)
  assert_all_close(loss_and_grads(chunked16, q, k, v, kw), want, 1e-5, "chunked ")


def test_extreme_decays_are_floored_and_exact():
  """RWKV-6's log decay -exp(w) reached -4e10 in training (F1 ICL, rwkv6), where the chunked
  form's float32 cumulative sums lost every digit and the loss went NaN: every form floors the
  log decay at LOG_DECAY_FLOOR, and the chunked form then equals the reference exactly."""
  q, k, v, kw = make_inputs("bonus", seed=4)
  w = jax.random.normal(jax.random.key(5), kw["log_decay"].shape) * 8.0
  kw["log_decay"] = -jnp.exp(w)  # per step from ~-e^-30 to ~-e^30
  assert float(kw["log_decay"].min()) < 1e4 * la.LOG_DECAY_FLOOR
  want = loss_and_grads(la.reference, q, k, v, kw)
  got = loss_and_grads(functools.partial(la.chunked, chunk_size=64), q, k, v, kw)
  assert all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(got))
  assert_all_close(got, want, 1e-5, "extreme decays ")
  floored = dict(kw, log_decay=jnp.maximum(kw["log_decay"], la.LOG_DECAY_FLOOR))
  np.testing.assert_array_equal(la.reference(q, k, v, **kw), la.reference(q, k, v, **floored))


@pytest.mark.parametrize("variant", ["scalar", "bonus", "normalized"])
def test_chunked_bf16(variant):
  q, k, v, kw = make_inputs(variant, seed=2)
  bf = lambda x: x.astype(jnp.bfloat16)
  q, k, v = bf(q), bf(k), bf(v)
  up = lambda x: x.astype(jnp.float32)
  want = loss_and_grads(la.reference, up(q), up(k), up(v), kw)
  got = loss_and_grads(functools.partial(la.chunked, chunk_size=16), q, k, v, kw)
  assert got[0].dtype == jnp.bfloat16
  assert_all_close(got, want, 1e-2, "bf16 ")


@pytest.mark.parametrize("variant", ["scalar", "bonus", "normalized"])
def test_step_decoding_equals_forward(variant):
  q, k, v, kw = make_inputs(variant, seed=3, segments=False)
  o_ref, hT_ref = la.reference(q, k, v, **kw, return_final_state=True)
  state = kw["initial_state"]
  g = kw.get("log_decay")
  step = jax.jit(
    functools.partial(
      la.step, scale=SCALE, bonus=kw.get("bonus"), normalize=kw.get("normalize", False)
    )
  )
  outs = []
  for t in range(T):
    gt = None if g is None else g[:, t]
    state, o = step(state, q[:, t], k[:, t], v[:, t], gt)
    outs.append(o)
  assert rel(jnp.stack(outs, 1), o_ref) <= 1e-5
  assert rel(state, hT_ref) <= 1e-5


def test_decode_continues_a_prefill():
  q, k, v, kw = make_inputs("vector", seed=4, segments=False)
  o_ref = la.reference(q, k, v, **kw)
  o1, s = la.linear_attention(
    q[:, :20],
    k[:, :20],
    v[:, :20],
    scale=SCALE,
    log_decay=kw["log_decay"][:, :20],
    return_final_state=True,
    initial_state=kw["initial_state"],
    implementation="xla",
  )
  outs = []
  for t in range(20, T):
    s, o = la.step(s, q[:, t], k[:, t], v[:, t], kw["log_decay"][:, t], scale=SCALE)
    outs.append(o)
  assert rel(jnp.concatenate([o1, jnp.stack(outs, 1)], 1), o_ref) <= 1e-5


def test_normalizer_is_the_running_key_sum():
  q, k, v, kw = make_inputs("normalized", seed=5, segments=False)
  del kw["initial_state"]
  o = la.linear_attention(q, k, v, **kw, implementation="xla")
  kv = jnp.cumsum(jnp.einsum("bthk,bthv->bthkv", k, v), axis=1)
  z = jnp.cumsum(k, axis=1)
  num = jnp.einsum("bthk,bthkv->bthv", q, kv) * SCALE
  den = jnp.einsum("bthk,bthk->bth", q, z)[..., None] * SCALE
  assert rel(o, num / (den + 1e-6)) <= 1e-5


def test_segments_equal_separate_sequences():
  q, k, v, kw = make_inputs("scalar", seed=6, segments=False)
  del kw["initial_state"]
  seg = jnp.asarray(np.repeat([[0, 1]], B, 0).repeat([15, T - 15], axis=1))
  packed = la.linear_attention(q, k, v, **kw, segment_ids=seg, implementation="xla")
  first = la.reference(
    q[:, :15], k[:, :15], v[:, :15], scale=SCALE, log_decay=kw["log_decay"][:, :15]
  )
  second = la.reference(
    q[:, 15:], k[:, 15:], v[:, 15:], scale=SCALE, log_decay=kw["log_decay"][:, 15:]
  )
  assert rel(packed, jnp.concatenate([first, second], 1)) <= 1e-5


def test_dispatch():
  q, k, v, kw = make_inputs("scalar", seed=7)
  if jax.default_backend() != "gpu":
    with pytest.raises(Unsupported, match="only on GPU"):
      la.linear_attention(q, k, v, **kw, implementation="pallas")
  assert la.dispatcher.choose(
    "auto",
    **la._canonical(q, k, v, **kw, bonus=None, normalize=False, return_final_state=False, eps=1e-6),
  ) in ("pallas", "xla")
  with pytest.raises(ValueError, match="scale"):
    la.linear_attention(q, k, v, scale=None)
  with pytest.raises(ValueError, match="log_decay"):
    la.linear_attention(q, k, v, scale=1.0, log_decay=jnp.zeros((B, T)))
