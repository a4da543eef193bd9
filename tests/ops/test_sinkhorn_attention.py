"""sinkhorn_attention: rows and columns of the Sinkhorn matrix sum to 1 (whole matrix, each
causal prefix block), one iteration is softmax, and the per-query "xla" form equals the
all-at-once reference, forward and gradients, causal with packed segments and grouped heads."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.ops import sinkhorn_attention as S
from attnzoo.ops import softmax_attention
from tests.conftest import relative_error, slow

B, T, H, D = 2, 11, 3, 4


def qkv():
  keys = jax.random.split(jax.random.key(0), 3)
  q = 2 * jax.random.normal(keys[0], (B, T, H, D))
  return q, 2 * jax.random.normal(keys[1], (B, T, 1, D)), jax.random.normal(keys[2], (B, T, 1, D))


def test_doubly_stochastic_and_one_iteration_is_softmax():
  seg = jnp.array([[0] * 4 + [1] * 7, [0] * T])
  t = 6

  @jax.jit
  def run(q, k, v):
    p = S.attention_matrix(q, k, scale=0.2, n_iter=301, segment_ids=seg)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, jnp.repeat(k, H, 2)) * 0.2
    block = S.sinkhorn(logits[..., : t + 1, : t + 1], jnp.ones((), bool), 301)
    rows = S.attention_matrix(q, k, scale=0.2, n_iter=301, causal=True)
    softmax = [
      (
        S.sinkhorn_attention(q, k, v, scale=0.5, n_iter=1, causal=causal),
        softmax_attention(q, k, v, scale=0.5, causal=causal),
      )
      for causal in (False, True)
    ]
    # the per-query ("xla") form against the all-at-once reference, with packed segments
    forms = [
      S.sinkhorn_attention(
        q, k, v, scale=0.5, causal=True, segment_ids=seg, implementation=implementation
      )
      for implementation in ("xla", "reference")
    ]
    return p, block, rows, softmax + [forms]

  p, block, rows, softmax = run(*qkv())
  np.testing.assert_allclose(np.asarray(p.sum(-1)), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(p.sum(-2)), 1.0, atol=1e-4)
  assert (np.asarray(p[0, :, :4, 4:]) == 0).all()  # nothing crosses segments
  # causal: each query's prefix block is doubly stochastic; its row is the query's output row
  np.testing.assert_allclose(np.asarray(block.sum(-1)), 1.0, atol=1e-4)
  np.testing.assert_allclose(np.asarray(block.sum(-2)), 1.0, atol=1e-4)
  assert relative_error(rows[:, :, t, : t + 1], block[:, :, t]) < 1e-5
  assert (np.asarray(rows[:, :, t, t + 1 :]) == 0).all()
  for one, soft in softmax:
    assert relative_error(one, soft) < 1e-5


@slow
def test_per_query_form_equals_the_reference():
  """Forward and gradients (the default suite compares the forwards)."""
  q, k, v = qkv()
  seg = jnp.array([[0] * 4 + [1] * 7, [0] * T])
  kw = dict(scale=0.5, n_iter=3, causal=True, segment_ids=seg)

  def loss(implementation):
    return lambda q, k, v: jnp.sum(
      jnp.sin(S.sinkhorn_attention(q, k, v, implementation=implementation, **kw))
    )

  run = lambda name: jax.jit(jax.value_and_grad(loss(name), argnums=(0, 1, 2)))(q, k, v)
  (l1, g1), (l2, g2) = run("xla"), run("reference")
  assert abs(float(l1 - l2)) < 1e-5 * abs(float(l2))
  for a, b in zip(g1, g2):
    assert np.isfinite(np.asarray(a)).all() and relative_error(a, b) < 1e-5
