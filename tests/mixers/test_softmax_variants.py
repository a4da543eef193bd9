"""Softmax variants inside the attention family: shaped attention (identity-centred, rows sum
to 1, A = I at infinite temperature, width-dependent temperature), MoH's head gates, routing
attention's cluster mask and k-means centroid update."""

import math

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from attnzoo.ops.routing import assign, centroid_targets, unit
from tests.conftest import relative_error


def test_shaped_attention_is_centred_at_the_identity():
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  mixer = build_mixer("shaped", d_model=16, num_heads=2)
  assert math.isclose(mixer._scale(), 1 / math.sqrt(16 * 8))
  cold = build_mixer("shaped", d_model=16, num_heads=2, tau0=1e9)  # softmax = uniform: A = I

  @jax.jit
  def run(x):
    params = jax.tree.map(lambda p: 20 * p, mixer.init(jax.random.key(1), x))  # large logits
    return (
      mixer.apply(params, x, method=mixer.attention_matrix),
      cold.apply(params, x, method=cold.attention_matrix),
      cold.apply(params, x),
      cold.apply(params, x, method=lambda m, x: m.out(m.v(x))),
    )

  a, a_cold, out, v = run(x)
  a, a_cold = np.asarray(a), np.asarray(a_cold)
  np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
  assert np.abs(a - np.eye(9)).max() > 0.05 and (np.triu(a, 1) == 0).all()
  np.testing.assert_allclose(a_cold, np.broadcast_to(np.eye(9), a.shape), atol=1e-6)
  assert relative_error(out, v) < 1e-5


def test_moh_gates_heads():
  """Each token weights its shared head and exactly routed_heads of the routed ones; the
  weights follow the official scaling (shared h_s softmax, routed renormalised times k, mixed
  by 2 softmax), and a head's zero gate removes it from the output."""
  x = jax.random.normal(jax.random.key(0), (2, 7, 16))
  mixer = build_mixer("moh", d_model=16, num_heads=4, shared_heads=1, routed_heads=2)

  @jax.jit
  def run(x):
    params = mixer.init(jax.random.key(1), x)
    gates = mixer.apply(params, x, method=mixer.head_gates)
    o = mixer.apply(
      params, x, method=lambda m, x: m._attend(*m._project(x, None), implementation="xla")
    )
    manual = mixer.apply(params, o * gates[..., None], method=lambda m, o: m.out(o))
    return gates, manual, mixer.apply(params, x), mixer.apply(params, x, method=mixer.balance_loss)

  gates, manual, out, balance = run(x)
  g = np.asarray(gates)
  assert ((g[..., 1:] > 0).sum(-1) == 2).all() and (g[..., 0] > 0).all()
  alpha_routed = g[..., 1:].sum(-1) / 2  # routed gates sum to k · α_routed
  np.testing.assert_allclose(g[..., 0] + alpha_routed, 2.0, rtol=1e-5)  # α's sum to 2
  assert relative_error(out, manual) < 1e-5
  assert 1.0 < float(balance) <= 3.0  # E Σ P f: 2 when balanced, 3 when one head wins always


def test_routing_attends_within_clusters_and_moves_centroids_by_kmeans():
  x = jax.random.normal(jax.random.key(0), (2, 12, 16))
  mixer = build_mixer("routing", d_model=16, num_heads=2, num_clusters=3)

  @jax.jit
  def run(x):
    params = mixer.init(jax.random.key(1), x)
    a = mixer.apply(params, x, method=mixer.attention_matrix)
    cq, ck = mixer.apply(params, x, method=mixer.clusters)
    grad = jax.grad(lambda p: jnp.sum(jnp.sin(mixer.apply(p, x))))(params)
    q, k, _ = mixer.apply(params, x, method=lambda m, x: m._project(x, None))
    mu = params["params"]["centroids"]
    return a, cq, ck, grad["params"]["centroids"], mu, centroid_targets([q, k], mu)

  a, cq, ck, grad, mu, targets = run(x)
  same = np.asarray(cq)[:, :, None, :] == np.asarray(ck)[:, None, :, :]  # [B,Tq,Tk,H]
  allowed = np.transpose(same, (0, 3, 1, 2)) & np.tril(np.ones((12, 12), bool))
  assert ((np.asarray(a) > 0) == allowed).all()
  assert relative_error(grad, mu - targets) < 1e-6  # the k-means pull, whatever the loss
  ema = 0.999 * mu + 0.001 * targets  # one SGD step at lr 1 - λ is the paper's EMA
  assert relative_error(mu - 0.001 * grad, ema) < 1e-6
  q, k = (jax.random.normal(jax.random.key(s), (1, 40, 2, 8)) for s in (2, 3))
  hand = np.zeros((2, 3, 8))
  ids = [np.asarray(assign(z, mu)) for z in (q, k)]
  for h in range(2):
    for c in range(3):
      members = [np.asarray(unit(z))[0, i[0, :, h] == c, h] for z, i in zip((q, k), ids)]
      members = np.concatenate(members)
      hand[h, c] = members.mean(0) if len(members) else mu[h, c]
  assert relative_error(centroid_targets([q, k], mu), hand) < 1e-5


def test_attention_sinks():
  """sink_tokens: a query sees the first positions and its window; sink_logit: a learned
  zero-value logit that shrinks the output (−inf: plain attention)."""
  x = jax.random.normal(jax.random.key(0), (2, 13, 16))
  sinks = build_mixer("sliding_window", d_model=16, num_heads=2, window=3, sink_tokens=2)
  logit = build_mixer("attention", d_model=16, num_heads=2, sink_logit=True)
  plain = build_mixer("attention", d_model=16, num_heads=2)

  @jax.jit
  def run(x):
    params = sinks.init(jax.random.key(1), x)
    seen = jax.grad(lambda x: sinks.apply(params, x)[:, 10].sum())(x)
    lp = logit.init(jax.random.key(1), x)
    with_sink = lambda value: logit.apply(
      {"params": {**lp["params"], "sink_logit": jnp.full((2,), value)}}, x
    )
    bias = lp["params"]["out"]["bias"]
    return seen, with_sink(-1e9), plain.apply(lp, x), with_sink(1e9) - bias, with_sink(0.0)

  seen, off, reference, on, zero = run(x)
  assert (np.abs(np.asarray(seen)).sum((0, 2)) > 0).tolist() == [True] * 2 + [False] * 6 + [
    True
  ] * 3 + [False] * 2
  assert relative_error(off, reference) < 1e-6
  assert np.abs(np.asarray(on)).max() < 1e-6
  assert relative_error(zero, reference) > 1e-3


def seen(grad):
  """Which positions an output depended on, from its gradient [B,T,D]."""
  return (np.abs(np.asarray(grad)).sum((0, 2)) > 0).tolist()


def test_gist_tokens_and_memory_masks():
  x = jax.random.normal(jax.random.key(0), (2, 13, 16))
  # chunks of 3 tokens + 1 gist: [0 1 2 g3] [4 5 6 g7] [8 9 10 g11] [12]
  gist = build_mixer("attention", d_model=16, num_heads=2, gist_tokens=1, gist_segment=3)
  # segments of 4, memory 3: the output at 9 sees 5..7 (memory) and 8, 9 (its segment)
  xl = build_mixer("attention", d_model=16, num_heads=2, memory=3, segment=4)

  @jax.jit
  def run(x):
    pg, px = gist.init(jax.random.key(1), x), xl.init(jax.random.key(1), x)
    grad = lambda m, p, t: jax.grad(lambda x: m.apply(p, x)[:, t].sum())(x)
    weights = xl.apply(px, x, method=xl.attention_matrix)
    return grad(gist, pg, 9), grad(gist, pg, 7), grad(xl, px, 9), weights

  g9, g7, xl9, weights = run(x)
  assert seen(g9) == [i in (3, 7, 8, 9) for i in range(13)]
  assert seen(g7) == [i in (3, 4, 5, 6, 7) for i in range(13)]
  # the memory's keys and values pass no gradient (a cached segment), its weights are there
  assert seen(xl9) == [i in (8, 9) for i in range(13)]
  assert ((np.asarray(weights)[0, 0, 9] > 0) == np.isin(np.arange(13), (5, 6, 7, 8, 9))).all()
  assert xl.state_size(100) == 2 * 7 * 16 * 4  # memory + segment slots


def test_hat_cross_segment_reads_segment_summaries():
  """The cross-segment half reads only the last token of each complete earlier segment
  (causal), or of every segment (bidirectional, the last token closing the last one)."""
  x = jax.random.normal(jax.random.key(0), (2, 11, 16))
  ends = np.isin(np.arange(11), (3, 7))
  for causal in (True, False):
    mixer = build_mixer("hat", d_model=16, num_heads=2, segment=4, causal=causal)
    matrix = lambda x: mixer.apply(
      mixer.init(jax.random.key(1), x), x, method=lambda m, x: m.cse.attention_matrix(x)
    )
    a = np.asarray(jax.jit(matrix)(x))
    for t in range(11):
      want = ends & (np.arange(11) < t // 4 * 4) if causal else ends | (np.arange(11) == 10)
      assert ((a[:, :, t] > 0) == want).all(), (causal, t)
