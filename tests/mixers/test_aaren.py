"""Aaren: the attention matrix is the forward's (rows are causal distributions). Opt-in (the
generic contract tests and the op's tests cover the mixer in the default suite)."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error, slow


@slow
def test_attention_matrix_is_the_forward():
  mixer = build_mixer("aaren", d_model=16, num_heads=2)
  x = jax.random.normal(jax.random.key(0), (2, 11, 16))
  seg = jnp.array([[0] * 4 + [1] * 7] * 2)
  params = mixer.init(jax.random.key(1), x)

  @jax.jit
  def run(params, x):
    a = mixer.apply(params, x, segment_ids=seg, method=mixer.attention_matrix)
    v = mixer.apply(params, x, method=lambda m, x: m.v(x))
    o = mixer.apply(params, jnp.einsum("bhts,bshd->bthd", a, v), method=lambda m, o: m.out(o))
    return a, o, mixer.apply(params, x, segment_ids=seg)

  a, o, out = run(params, x)
  np.testing.assert_allclose(np.asarray(a.sum(-1)), 1.0, rtol=1e-5)
  visible = np.tril(np.ones((11, 11))) * (np.asarray(seg[0])[:, None] == np.asarray(seg[0]))
  assert ((np.asarray(a) > 0) == visible.astype(bool)).all()
  assert relative_error(o, out) < 1e-5
