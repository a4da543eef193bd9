"""AHN beyond the generic mixer tests (whose zero-initialised memory output hides the memory):
with the memory's output projection switched on, tokens that left the window still reach the
output, decoding (a prefill, then token by token) equals the full forward, and packed
documents do not leak into each other's memory."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

B, T, D, WINDOW = 2, 13, 16, 3


def test_memory_reaches_past_the_window_and_decodes():
  mixer = build_mixer("ahn", d_model=D, num_heads=2, window=WINDOW, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
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

  full = jax.jit(mixer.apply)({"params": params}, x)
  cache = jax.jit(functools.partial(mixer.init, decode=True))(jax.random.key(1), x)["cache"]
  step = jax.jit(functools.partial(mixer.apply, decode=True, mutable=["cache"]))
  outs, start = [], 0
  for stop in [6, *range(7, T + 1)]:  # a 6-token prefill (longer than the window), then steps
    positions = jnp.broadcast_to(jnp.arange(start, stop), (B, stop - start))
    out, variables = step({"params": params, "cache": cache}, x[:, start:stop], positions=positions)
    outs.append(out)
    cache, start = variables["cache"], stop
  assert relative_error(jnp.concatenate(outs, axis=1), full) < 1e-5
