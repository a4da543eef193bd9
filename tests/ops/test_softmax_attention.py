"""The softmax_attention op: mask semantics against a per-element loop, the xla path against
the float32 reference, and dispatch errors."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import Unsupported, softmax_attention
from attnzoo.ops.softmax_attention import (
  EMPTY,
  decode_splits,
  dispatcher,
  reference,
  split_kv_attention,
)
from tests.conftest import relative_error


def naive(q, k, v, scale, allowed):
  """Loops over (b, h, i): softmax over the allowed keys, zeros where none is allowed."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  B, Tq, H, _ = q.shape
  groups = H // k.shape[2]
  out = np.zeros((B, Tq, H, v.shape[-1]))
  for b, h, i in itertools.product(range(B), range(H), range(Tq)):
    keys = [j for j in range(k.shape[1]) if allowed(b, i, j)]
    if keys:
      s = np.array([q[b, i, h] @ k[b, j, h // groups] * scale for j in keys])
      w = np.exp(s - s.max())
      out[b, i, h] = (w / w.sum()) @ v[b, keys, h // groups]
  return out


def inputs(key, B=2, Tq=11, Tk=11, H=4, Hkv=2, D=8, dtype=jnp.float32):
  kq, kk, kv = jax.random.split(jax.random.key(key), 3)
  return (
    jax.random.normal(kq, (B, Tq, H, D), dtype),
    jax.random.normal(kk, (B, Tk, Hkv, D), dtype),
    jax.random.normal(kv, (B, Tk, Hkv, D), dtype),
  )


@pytest.mark.parametrize(
  "causal,window,segments",
  [
    (False, None, False),
    (True, None, False),
    (True, 3, False),
    (False, (2, 1), False),
    (True, None, True),
    (False, (4, 4), True),
  ],
)
def test_masks_match_naive(causal, window, segments):
  q, k, v = inputs(0)
  seg = jnp.array([[0] * 4 + [1] * 7, [0] * 9 + [2] * 2])
  left, right = (window, 0) if isinstance(window, int) else (window or (None, None))

  def allowed(b, i, j):
    ok = not causal or j <= i
    if window is not None:
      ok = ok and i - left <= j <= i + right
    return ok and (not segments or seg[b, i] == seg[b, j])

  out = softmax_attention(
    q,
    k,
    v,
    scale=0.3,
    causal=causal,
    window=window,
    segment_ids=seg if segments else None,
    implementation="xla",
  )
  assert relative_error(out, naive(q, k, v, 0.3, allowed)) < 1e-5


def test_explicit_positions_and_empty_slots():
  q, k, v = inputs(1, Tq=3, Tk=6)
  q_pos = jnp.array([[5, 6, 7]] * 2)
  kv_pos = jnp.array([[0, 1, EMPTY, 3, 4, 6]] * 2)  # slot 2 empty
  out = softmax_attention(
    q,
    k,
    v,
    scale=0.5,
    causal=True,
    window=3,
    q_positions=q_pos,
    kv_positions=kv_pos,
    implementation="xla",
  )
  pos = np.asarray(kv_pos[0])
  allowed = lambda b, i, j: pos[j] != EMPTY and q_pos[0, i] - 3 <= pos[j] <= q_pos[0, i]
  assert relative_error(out, naive(q, k, v, 0.5, allowed)) < 1e-5


@pytest.mark.parametrize("window,splits", [(None, 4), (5, 3), (None, 12)])
def test_split_kv_decoding_equals_one_pass_over_the_cache(window, splits):
  """A decode step over a ring cache with empty slots (chunk 4 of 12 holds none: its weight
  must vanish), the keys split into chunks merged by log-sum-exp."""
  q, k, v = inputs(2, Tq=1, Tk=12, H=6, Hkv=2)
  kv_pos = jnp.array([[12, 13, 2, 3, 4, 5, 6, 7, 8, 9, EMPTY, EMPTY]] * 2)
  q_pos = jnp.array([[13], [11]])
  masks = dict(causal=True, window=window, q_positions=q_pos, kv_positions=kv_pos)
  whole = softmax_attention(q, k, v, scale=0.4, implementation="xla", **masks)
  split = split_kv_attention(q, k, v, scale=0.4, num_splits=splits, implementation="xla", **masks)
  assert relative_error(split, whole) < 1e-6
  assert [decode_splits(n, 512) for n in (100, 1040, 32784, 4099)] == [1, 2, 48, 1]


def test_fully_masked_rows_are_zero_with_lse_minus_inf():
  q, k, v = inputs(2, Tq=2, Tk=4)
  out, lse = softmax_attention(
    q,
    k,
    v,
    scale=1.0,
    causal=True,
    return_lse=True,
    q_positions=jnp.array([[-1, 2]] * 2),
    implementation="xla",
  )
  assert np.all(np.asarray(out[:, 0]) == 0) and np.all(np.isneginf(np.asarray(lse[:, 0])))
  assert np.all(np.isfinite(np.asarray(lse[:, 1])))


def test_lse_softcap_and_per_head_scale():
  q, k, v = inputs(3)
  scale = jnp.array([0.1, 0.2, 0.3, 0.4])
  out, lse = softmax_attention(
    q, k, v, scale=scale, causal=True, softcap=2.0, return_lse=True, implementation="xla"
  )
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, 2, axis=2)) * scale[:, None, None]
  logits = 2.0 * jnp.tanh(logits / 2.0)
  logits = jnp.where(jnp.tril(jnp.ones((11, 11), bool)), logits, -jnp.inf)
  assert relative_error(lse, jnp.transpose(jax.nn.logsumexp(logits, -1), (0, 2, 1))) < 1e-6
  probs = jax.nn.softmax(logits, -1)
  assert relative_error(out, jnp.einsum("bhqk,bkhd->bqhd", probs, jnp.repeat(v, 2, axis=2))) < 1e-5


def test_xla_matches_reference_in_bf16_with_gradients():
  q, k, v = inputs(4, Tq=33, Tk=33, H=6, Hkv=3, D=16)
  f = lambda impl, dt: (
    lambda q, k, v: (
      softmax_attention(
        q.astype(dt), k.astype(dt), v.astype(dt), scale=0.25, causal=True, implementation=impl
      ).astype(jnp.float32)
      ** 2
    ).sum()
  )
  ref = jax.grad(f("xla", jnp.float32), argnums=(0, 1, 2))(q, k, v)
  got = jax.grad(f("xla", jnp.bfloat16), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(got, ref):
    assert relative_error(a, b) < 1e-2
  out = softmax_attention(
    q.astype(jnp.bfloat16),
    k.astype(jnp.bfloat16),
    v.astype(jnp.bfloat16),
    scale=0.25,
    causal=True,
    implementation="xla",
  )
  assert relative_error(out, reference(q, k, v, scale=0.25, causal=True)) < 1e-2


@pytest.mark.parametrize("mask", [dict(causal=True), dict(window=(40, 17), softcap=5.0)])
def test_chunked_matches_reference_with_gradients(mask):
  """The flash forward's pure-jnp twin: T=300 in key blocks of 128 (the last one partial),
  GQA 6/2; o, lse and the gradients of both."""
  q, k, v = inputs(7, Tq=300, Tk=300, H=6, Hkv=2, D=16)

  def loss(impl):
    def f(q, k, v):
      o, lse = softmax_attention(q, k, v, scale=0.25, return_lse=True, implementation=impl, **mask)
      return (o**2).sum() + lse.sum(), (o, lse)

    return jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  (_, got), got_grads = loss("chunked")
  (_, want), want_grads = loss("xla")
  for a, b in zip(got + got_grads, want + want_grads):
    assert relative_error(a, b) < 1e-5
  assert all("chunked" not in order for order in dispatcher.auto_order.values())
  with pytest.raises(Unsupported, match="bias"):
    softmax_attention(
      q, k, v, scale=1.0, bias=jnp.zeros((2, 6, 300, 300)), implementation="chunked"
    )


def test_dispatch_errors_name_the_problem():
  q, k, v = inputs(5)
  with pytest.raises(Unsupported, match="cudnn"):
    softmax_attention(q, k, v, scale=1.0, implementation="cudnn")
  with pytest.raises(Unsupported, match="unknown implementation 'nope'"):
    softmax_attention(q, k, v, scale=1.0, implementation="nope")
  with pytest.raises(ValueError, match="kv heads"):
    softmax_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), scale=1.0)
  with pytest.raises(ValueError, match="scale"):
    softmax_attention(q, k, v, scale=None)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN runs only on GPU")
@pytest.mark.parametrize(
  "causal,window,kv_heads", [(True, None, 4), (False, None, 2), (True, 15, 4), (True, 100, 1)]
)
def test_cudnn_matches_xla_on_gpu(causal, window, kv_heads):
  q, k, v = inputs(6, B=2, Tq=256, Tk=256, H=4, Hkv=kv_heads, D=64, dtype=jnp.bfloat16)
  args = dict(scale=0.125, causal=causal, window=window)
  got = softmax_attention(q, k, v, implementation="cudnn", **args)
  want = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), **args)
  assert relative_error(got, want) < 1e-2


def test_dropout_is_off_at_rate_zero_or_without_rng():
  q, k, v = inputs(7)
  plain = np.asarray(softmax_attention(q, k, v, scale=0.3, causal=True, implementation="xla"))
  for rate, rng in ((0.0, jax.random.key(0)), (0.3, None)):
    out = softmax_attention(q, k, v, scale=0.3, causal=True, dropout_rate=rate, dropout_rng=rng)
    np.testing.assert_array_equal(np.asarray(out), plain)


def test_dropout_keeps_the_expected_value_and_gradients():
  """Dropped probabilities are zero at the rate, kept ones scaled by 1 / (1 - rate): the mean
  over many rngs is the undropped output; gradients flow through the kept ones."""
  q, k, v = inputs(8, B=1, Tq=6, Tk=6, H=2, Hkv=2, D=4)
  rate = 0.3
  attend = lambda key, v: softmax_attention(
    q, k, v, scale=0.5, causal=True, dropout_rate=rate, dropout_rng=key
  )
  keys = jax.random.split(jax.random.key(0), 4000)
  probs = jax.vmap(attend, (0, None))(keys, jnp.eye(6)[None, :, None].repeat(2, 2))
  visible = np.tril(np.ones((6, 6), bool))[:, None, :]  # [Tq, H, Tk]
  dropped = np.asarray(probs[:, 0] == 0)[:, visible.repeat(2, 1)]
  assert abs(dropped.mean() - rate) < 0.01
  plain = softmax_attention(q, k, v, scale=0.5, causal=True)
  assert relative_error(jax.vmap(attend, (0, None))(keys, v).mean(0), plain) < 0.03
  loss = lambda q, k, v, key: (
    softmax_attention(q, k, v, scale=0.5, causal=True, dropout_rate=rate, dropout_rng=key) ** 2
  ).sum()
  grads = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, keys[0])
  undropped = jax.grad(loss, argnums=(0, 1, 2))(q, k, v, None)
  for g, u in zip(grads, undropped):
    assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
    assert relative_error(g, u) > 1e-3


def test_only_xla_serves_dropout():
  q, k, v = inputs(9)
  with pytest.raises(Unsupported, match="dropout"):
    softmax_attention(
      q,
      k,
      v,
      scale=1.0,
      dropout_rate=0.1,
      dropout_rng=jax.random.key(0),
      implementation="interpret",
    )
  with pytest.raises(ValueError, match="dropout_rate"):
    softmax_attention(q, k, v, scale=1.0, dropout_rate=1.0, dropout_rng=jax.random.key(0))
