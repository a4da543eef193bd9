"""Dynamic convolution (Wu et al. 2019): the whole layer (GLU input projection, kernels predicted
per step and softmax-normalised over the window, shared by each head's channels, output
projection) equals a float64 numpy loop; DropConnect acts only with a "dropout" rng."""

import jax
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

B, T, D, H, K = 2, 11, 8, 2, 3


def naive_dynamic_conv(p, x):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  a = x @ p["in_proj"]["kernel"] + p["in_proj"]["bias"]
  h = a[..., :D] / (1 + np.exp(-a[..., D:]))  # GLU
  logits = (h @ p["weight_linear"]["kernel"]).reshape(B, T, H, K)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  y = np.zeros(h.shape)
  for t in range(T):
    for j in range(K):
      s = t - K + 1 + j
      if s >= 0:
        y[:, t] += np.repeat(w[:, t, :, j], D // H, axis=-1) * h[:, s]
  return y @ p["out_proj"]["kernel"] + p["out_proj"]["bias"]


def test_dynamic_conv_equals_naive_loop_and_drops_weights_only_when_training():
  mixer = build_mixer("dynamic_conv", d_model=D, num_heads=H, kernel_size=K, weight_dropout=0.5)
  x = np.random.default_rng(0).standard_normal((B, T, D)).astype(np.float32)
  shapes = jax.eval_shape(mixer.init, jax.random.key(0), x)["params"]
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(np.float32), shapes)

  @jax.jit
  def run(params, x):
    train = lambda key: mixer.apply({"params": params}, x, rngs={"dropout": jax.random.key(key)})
    return mixer.apply({"params": params}, x), train(1), train(2)

  out, drop1, drop2 = run(params, x)
  assert relative_error(out, naive_dynamic_conv(params, x)) < 1e-5
  assert np.abs(np.asarray(drop1 - out)).max() > 1e-3
  assert np.abs(np.asarray(drop1 - drop2)).max() > 1e-3
