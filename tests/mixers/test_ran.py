"""RAN: the scan-plus-parallel forward equals the paper's window-by-window form (forward and
gradients), causality across and within windows, decoding in chunks that straddle windows,
bad options."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from attnzoo.mixers.ran import standardize
from attnzoo.ops.rotary import apply_rope
from tests.conftest import decode_in_chunks, relative_error

D, B, T, W = 16, 2, 13, 4  # T not a multiple of W


def make(**kw):
  return build_mixer("ran", d_model=D, **{"num_heads": 2, "window": W, **kw})


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def window_by_window(m, x):
  """The paper's form, one window at a time: masked softmax over [cell ; window] (the cell row
  sees the whole window, token rows are causal), the GPC update, then the memory review of the
  earlier windows' cell outputs; plain jnp."""
  batch, steps, width = x.shape
  w = m.window
  cell, previous = jnp.broadcast_to(m.initial_cell, (batch, width)), None
  hidden, cell_outs = [], []
  for i, start in enumerate(range(0, steps, w)):
    u = jnp.concatenate([cell[:, None], x[:, start : start + w]], axis=1)
    n = u.shape[1]
    z = m.input_norm(u)
    q, k, v = (jax.nn.silu(p(z)) for p in (m.q, m.k, m.v))
    offsets = jnp.broadcast_to(jnp.arange(n), (batch, n))
    q, k = apply_rope(q, offsets, base=m.rope_base), apply_rope(k, offsets, base=m.rope_base)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
    visible = np.tril(np.ones((n, n), bool)) | (np.arange(n)[:, None] == 0)
    probs = jax.nn.softmax(jnp.where(visible, logits, -jnp.inf), axis=-1)
    e = standardize(
      m.encode_norm(jax.nn.silu(m.o(jnp.einsum("bhqk,bkhd->bqhd", probs, v))) + m.encode_glu(z))
    )
    hidden.append(e[:, 1:])
    cell_outs.append(e[:, 0])
    cell = e[:, 0] if i == 0 else m.cell_norm(e[:, 0] + m.cell_glu(previous))
    previous = e[:, 0]
  h, c = jnp.concatenate(hidden, axis=1), jnp.stack(cell_outs, axis=1)
  rq, rk, rv = jax.nn.silu(m.review_q(h)), jax.nn.silu(m.review_k(c)), jax.nn.silu(m.review_v(c))
  earlier = np.arange(c.shape[1])[None, :] < (np.arange(steps) // w)[:, None]
  logits = jnp.where(earlier, jnp.einsum("btd,bjd->btj", rq, rk) * width**-0.5, -1e30)
  reviewed = jnp.einsum("btj,bjd->btd", jax.nn.softmax(logits, axis=-1) * earlier, rv)
  return m.out(m.review_norm(jax.nn.silu(m.review_o(reviewed)) + m.review_glu(rq)))


def test_forward_equals_the_window_by_window_form():
  mixer, x = make(), x_input()[:, :7]  # two windows, the second partial
  params = mixer.init(jax.random.key(1), x)
  # random parameters (at init the cell is a zero vector and the attention near uniform)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(5), len(leaves))
  noise = [0.3 * jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)]
  params = jax.tree.unflatten(tree, [p + n for p, n in zip(leaves, noise)])
  # gradients of a random projection of the output, w.r.t. the input and the parameters
  probe = jax.random.normal(jax.random.key(2), x.shape)

  @jax.jit
  def run(params, x):
    loss = lambda fn: lambda p, x: jnp.sum(probe * mixer.apply(p, x, method=fn))
    ours = lambda m, x: m(x)
    return [
      (mixer.apply(params, x, method=fn), jax.grad(loss(fn), argnums=(0, 1))(params, x))
      for fn in (ours, window_by_window)
    ]

  (out, grads), (ref, ref_grads) = run(params, x)
  assert relative_error(out, ref) < 1e-5
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert relative_error(g, r) < 1e-5


def test_causal_within_and_across_windows():
  mixer, x = make(), x_input()
  params = mixer.init(jax.random.key(1), x)
  seen = jax.jit(
    jax.vmap(
      lambda t: jnp.abs(jax.grad(lambda x: mixer.apply(params, x)[:, t].sum())(x)).sum((0, 2)),
    )
  )(jnp.arange(T))
  seen = np.asarray(seen) > 0
  # every output sees exactly its own past: earlier windows through the cell and the review
  np.testing.assert_array_equal(seen, np.tril(np.ones((T, T), bool)))


def test_decode_in_chunks_straddling_windows():
  mixer, x = make(), x_input(3)
  params = jax.jit(mixer.init)(jax.random.key(4), x)["params"]
  full = jax.jit(mixer.apply)({"params": params}, x)
  decoded, _ = decode_in_chunks(
    mixer, {"params": params}, x, (6, 7, 13), key=4
  )  # the last spans three windows
  assert relative_error(decoded, full) < 1e-5


def test_bad_options_are_errors():
  x = x_input()
  with pytest.raises(ValueError, match="window must be >= 1"):
    make(window=0).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="ran does not take segment_ids"):
    make().init(jax.random.key(0), x, segment_ids=jnp.zeros((B, T), jnp.int32))
