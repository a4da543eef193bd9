"""attnzoo.ops.spatial_mix (gMLP / sMLP causal spatial projections): the masked einsum equals a
numpy loop (groups of channels, causal mask, packed segments counted from their start), and
the decoding window reproduces it token by token."""

import jax
import numpy as np

from attnzoo.ops import spatial_mix as sm
from tests.conftest import relative_error as rel

B, T, C, G, L = 2, 9, 6, 3, 12


def loop(v, w, bias, seg):
  y = np.zeros(v.shape)
  for b in range(B):
    for t in range(T):
      start = min(s for s in range(T) if seg[b, s] == seg[b, t])
      for c in range(C):
        g = c // (C // G)
        y[b, t, c] = bias[g, t - start] + sum(
          w[g, t - start, s - start] * v[b, s, c] for s in range(start, t + 1)
        )
  return y


def test_reference_matches_loop_and_decoding():
  rng = np.random.default_rng(0)
  v, w, bias = (rng.standard_normal(s).astype(np.float32) for s in ((B, T, C), (G, L, L), (G, L)))
  seg = np.array([[0] * 4 + [1] * 5, [0] * T])

  @jax.jit
  def run(v, w, bias):
    packed, plain = sm.reference(v, w, bias, segment_ids=seg), sm.reference(v, w, bias)
    state, outs = sm.init_state(B, T, C), []
    for start, stop in ((0, 3), *((t, t + 1) for t in range(3, T))):
      state, y = sm.decode_window(state, v[:, start:stop], w, bias)
      outs.append(y)
    return packed, plain, outs

  packed, plain, outs = run(v, w, bias)
  assert rel(packed, loop(v, w, bias, seg)) < 1e-6
  assert rel(plain, loop(v, w, bias, np.zeros((B, T)))) < 1e-6
  assert rel(np.concatenate(outs, axis=1), plain) < 1e-6
