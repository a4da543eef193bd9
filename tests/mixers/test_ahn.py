"""AHN beyond the generic mixer tests (which run it with the memory's output projection drawn,
zero_memory_out=False, so that causality and decode = forward cover the memory): with the
default zero-initialised projection it is sliding-window attention; switched on, tokens that
left the window still reach the output, and packed documents do not leak into each other's
memory."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer

B, T, D, WINDOW = 2, 13, 16, 3


def test_memory_reaches_past_the_window():
  mixer = build_mixer("ahn", d_model=D, num_heads=2, window=WINDOW, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = jax.jit(mixer.init)(jax.random.key(1), x)["params"]
  zero = params
  params = dict(params, memory_out={"kernel": jax.random.normal(jax.random.key(2), (2, 8, 2, 8))})

  @jax.jit
  def seen(params, x, segment_ids=None):  # which inputs out[:, 10] depends on
    out = lambda x: mixer.apply({"params": params}, x, segment_ids=segment_ids)[:, 10].sum()
    g = jnp.abs(jax.grad(out)(x)).sum(axis=(0, 2))
    # (the chunked delta rule passes ~1e-12 of gradient across a segment reset)
    return g > 1e-6 * g.max()

  window = [t > 10 - WINDOW for t in range(11)] + [False] * 2
  assert np.asarray(seen(zero, x)).tolist() == window  # zero memory output: sliding window
  assert np.asarray(seen(params, x)).tolist() == [True] * 11 + [False] * 2
  documents = jnp.array([[0] * 5 + [1] * 8] * B)  # token 10's document starts at 5
  assert np.asarray(seen(params, x, documents)).tolist() == [False] * 5 + [True] * 6 + [False] * 2
