"""NSA op (attnzoo.ops.nsa): the selection budget, the reference against a brute-force
masked-softmax form of each branch written with numpy loops, the fast path ("xla") against the
reference (forward and gradients). Causality by gradients: tests/mixers/test_mixers.py runs it
on the mixer (the same op path)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.ops import nsa as ops
from tests.conftest import relative_error, slow

# Small blocks so that T=37 has several of each (T not a multiple of any block).
CFG = ops.Config(block_cmp=8, stride=4, block_slc=8, num_selected=3, window=6)
B, T, H, HKV, D = 2, 37, 4, 2, 8


def make_inputs(seed=0, t=T, hidden=12):
  ks = iter(jax.random.split(jax.random.key(seed), 20))
  n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape, jnp.float32)
  q = n((B, t, H, D))
  k = tuple(n((B, t, HKV, D)) for _ in range(3))
  v = tuple(n((B, t, HKV, D)) for _ in range(3))
  gates = jax.nn.sigmoid(n((B, t, H, 3)))
  comp = lambda: ops.Compression(
    n((CFG.block_cmp, D), 0.1),
    n((CFG.block_cmp, D, hidden), 0.1),
    n((hidden,), 0.1),
    n((hidden, D), 0.3),
    n((D,), 0.1),
  )
  return q, k, v, gates, comp(), comp()


def test_selection_respects_its_budget():
  cfg = ops.Config(block_cmp=4, stride=2, block_slc=4, num_selected=5, window=4)
  t, ns = 45, 12
  scores = jax.random.uniform(jax.random.key(0), (B, t, HKV, ns))
  positions = jnp.broadcast_to(jnp.arange(t), (B, t))
  idx = np.asarray(jax.jit(ops.select_blocks, static_argnums=2)(scores, positions, cfg))
  assert idx.shape == (B, t, HKV, 5) and idx.dtype == np.int32
  s = np.asarray(scores)
  for b in range(B):
    for p in range(t):
      current = p // 4
      for g in range(HKV):
        chosen = idx[b, p, g]
        valid = chosen[chosen >= 0]
        assert (chosen[len(valid) :] == -1).all() and (np.diff(valid) > 0).all()
        assert len(valid) == min(5, current + 1)  # exactly n, or all available
        assert valid.max() <= current  # causal: only blocks that have started
        assert {0, current, max(current - 1, 0)} <= set(valid.tolist())
        rest = [j for j in range(current + 1) if j not in (0, current, current - 1)]
        picked = [j for j in valid if j in rest]
        if picked:  # the free slots hold the best-scoring remaining blocks
          others = [j for j in rest if j not in picked]
          assert not others or s[b, p, g, picked].min() >= s[b, p, g, others].max()


def _mlp(windows, c):
  """phi on one window [l, D] in numpy."""
  h = np.einsum("ld,ldh->h", windows + c.pos, c.w1) + c.b1
  h = h / (1 + np.exp(-h))
  return h @ c.w2 + c.b2


def _masked_softmax(logits, mask):
  """Attention probabilities over the keys allowed by mask (zeros where nothing is)."""
  if not mask.any():
    return np.zeros_like(logits)
  w = np.where(mask, np.exp(logits - logits[mask].max()), 0.0)
  return w / w.sum()


def brute_force(q, k, v, gates, ck, cv, cfg, scale):
  """Every branch, query by query, from its definition (float64 numpy)."""
  q, gates = np.asarray(q, np.float64), np.asarray(gates, np.float64)
  k = [np.asarray(a, np.float64) for a in k]
  v = [np.asarray(a, np.float64) for a in v]
  ck, cv = (ops.Compression(*(np.asarray(a, np.float64) for a in c)) for c in (ck, cv))
  batch, t, heads, _ = q.shape
  groups = heads // k[0].shape[2]
  nc = (t - cfg.block_cmp) // cfg.stride + 1
  ns = -(-t // cfg.block_slc)
  out = np.zeros(q.shape[:3] + (v[0].shape[-1],))
  chosen = np.full((batch, t, k[0].shape[2], cfg.num_selected), -1)
  for b in range(batch):
    span = lambda i: slice(i * cfg.stride, i * cfg.stride + cfg.block_cmp)
    kc = np.stack(
      [[_mlp(k[0][b, span(i), g], ck) for g in range(k[0].shape[2])] for i in range(nc)]
    )
    vc = np.stack(
      [[_mlp(v[0][b, span(i), g], cv) for g in range(v[0].shape[2])] for i in range(nc)]
    )
    for p in range(t):
      scores = np.zeros((k[0].shape[2], ns))
      o_cmp = np.zeros((heads, out.shape[-1]))
      for h in range(heads):
        g = h // groups
        complete = np.array([i * cfg.stride + cfg.block_cmp - 1 <= p for i in range(nc)])
        probs = _masked_softmax(scale * kc[:, g] @ q[b, p, h], complete)
        o_cmp[h] = probs @ vc[:, g]
        for i in range(nc):  # block i's tokens, in stride units, that lie in selection block j
          for u in range(cfg.block_cmp // cfg.stride):
            j = (i * cfg.stride + u * cfg.stride) // cfg.block_slc
            if j < ns:
              scores[g, j] += probs[i]
      current = p // cfg.block_slc
      for g in range(k[0].shape[2]):
        s = scores[g].copy()
        s[current + 1 :] = -np.inf
        for j in [*range(cfg.num_initial), *range(current - cfg.num_local + 1, current + 1)]:
          if 0 <= j <= current:
            s[j] = np.inf
        order = np.lexsort((np.arange(ns), -s))[: cfg.num_selected]
        picked = np.sort([j for j in order if s[j] > -np.inf])
        chosen[b, p, g, : len(picked)] = picked
      for h in range(heads):
        g = h // groups
        keys = np.arange(t)
        in_blocks = np.isin(keys // cfg.block_slc, chosen[b, p, g]) & (keys <= p)
        probs = _masked_softmax(scale * k[1][b, :, g] @ q[b, p, h], in_blocks)
        o_slc = probs @ v[1][b, :, g]
        window = (keys <= p) & (keys > p - cfg.window)
        probs = _masked_softmax(scale * k[2][b, :, g] @ q[b, p, h], window)
        o_win = probs @ v[2][b, :, g]
        out[b, p, h] = gates[b, p, h] @ np.stack([o_cmp[h], o_slc, o_win])
  return out, chosen


def _nsa(implementation, cfg=CFG):
  return functools.partial(ops.nsa, implementation=implementation, config=cfg, scale=D**-0.5)


def outputs_and_grads(fn, q, k, v, gates, ck, cv):
  """(o, indices), and the gradients of sum(o * do) with respect to every input, compiled."""
  do = jax.random.normal(jax.random.key(9), q.shape)

  def loss(*args):
    o, idx = fn(*args[:4], compress_k=args[4], compress_v=args[5], return_indices=True)
    return jnp.sum(o * do), (o, idx)

  (_, outs), grads = jax.jit(jax.value_and_grad(loss, argnums=range(6), has_aux=True))(
    q, k, v, gates, ck, cv
  )
  return outs, grads


def test_reference_equals_brute_force_and_fast_path():
  """The reference against the brute-force form (outputs and selected blocks), and the fast
  path ("xla": lse-reusing chunked scores, the kernel's jnp twin) against the reference,
  forward and gradients."""
  args = make_inputs()
  (out, idx), grads = outputs_and_grads(
    functools.partial(ops.reference, scale=D**-0.5, config=CFG), *args
  )
  want, want_idx = brute_force(*args, CFG, D**-0.5)
  np.testing.assert_array_equal(np.asarray(idx), want_idx)
  assert relative_error(out, want) < 1e-5
  (fast, fast_idx), fast_grads = outputs_and_grads(_nsa("xla"), *args)
  np.testing.assert_array_equal(np.asarray(fast_idx), want_idx)
  assert relative_error(fast, out) < 1e-5
  for g, w in zip(jax.tree.leaves(fast_grads), jax.tree.leaves(grads)):
    # the keys' output bias b2 shifts every compressed logit of a row alike: gradient ~0
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)


@slow
def test_short_sequences_and_bad_configs():
  """Fewer tokens than one compressed block: the compressed branch is empty (output 0)."""
  q, k, v, gates, ck, cv = make_inputs(3, t=5)
  got = jax.jit(_nsa("xla"))(q, k, v, gates, compress_k=ck, compress_v=cv)
  ref = jax.jit(functools.partial(ops.reference, scale=D**-0.5, config=CFG))
  want = ref(q, k, v, gates, compress_k=ck, compress_v=cv)
  assert np.isfinite(np.asarray(got)).all() and relative_error(got, want) < 1e-5


def test_bad_configs():
  with pytest.raises(ValueError, match="stride"):
    ops.Config(block_cmp=8, stride=3)
