"""GLA: the mixer equals a naive float64 loop of the paper's recurrence; gate range; the
hidden attention matrix reproduces the op's output."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from tests.conftest import relative_error

B, T, D, H = 2, 11, 16, 2


def silu(x):
  return x / (1 + np.exp(-x))


def naive_gla(p, x, normalizer=16.0, eps=1e-5):
  x = np.asarray(x, np.float64)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  proj = lambda name: np.einsum("btd,dhk->bthk", x, p[name]["kernel"])
  q, k, v, g = proj("q"), proj("k"), proj("v"), proj("g")
  logits = np.einsum("btr,rhk->bthk", x @ p["gate_down"]["kernel"], p["gate_up"]["kernel"])
  alpha = (1 / (1 + np.exp(-(logits + p["gate_up"]["bias"])))) ** (1 / normalizer)
  o = np.zeros(v.shape)
  scale = q.shape[-1] ** -0.5
  for b in range(x.shape[0]):
    for h in range(q.shape[2]):
      s = np.zeros((q.shape[-1], v.shape[-1]))
      for t in range(x.shape[1]):
        s = alpha[b, t, h][:, None] * s + np.outer(k[b, t, h], v[b, t, h])
        o[b, t, h] = scale * s.T @ q[b, t, h]
  o = o / np.sqrt(np.mean(o**2, -1, keepdims=True) + eps) * p["norm"]["scale"] * silu(g)
  return np.einsum("bthv,hvd->btd", o, p["out"]["kernel"])


def test_gla_equals_naive_recurrence():
  mixer = build_mixer("gla", d_model=D, num_heads=H, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  # Larger gate weights so the decay varies visibly over channels and time.
  params = jax.tree.map(lambda a: a * 10, params)
  out = mixer.apply({"params": params}, x)
  assert relative_error(out, naive_gla(params, x)) < 1e-5


def test_gla_gate_range():
  """log alpha = logsigmoid(logits) / 16: decays in (0, 1), never below sigmoid^(1/16)."""
  mixer = build_mixer("gla", d_model=D, num_heads=H)
  x = 3 * jax.random.normal(jax.random.key(0), (B, T, D))
  params = jax.tree.map(lambda a: a * 5, mixer.init(jax.random.key(1), x))
  _, _, _, log_decay = mixer.apply(params, x, method=mixer._features)
  decay = np.exp(np.asarray(log_decay, np.float64))
  assert log_decay.shape == (B, T, H, D // 2 // H)
  assert decay.min() > 0.5 and decay.max() < 1
  assert decay.std() > 1e-3


def test_gla_attention_matrix_reproduces_op_output():
  from attnzoo.ops.linear_attention import linear_attention

  mixer = build_mixer("gla", d_model=D, num_heads=H, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)
  q, k, v, log_decay = mixer.apply(params, x, method=mixer._features)
  weights = mixer.apply(params, x, method=mixer.attention_matrix)
  assert weights.shape == (B, H, T, T)
  assert np.abs(np.asarray(jnp.triu(weights, 1))).max() == 0
  o = linear_attention(
    q, k, v, scale=q.shape[-1] ** -0.5, log_decay=log_decay, implementation="xla"
  )
  assert relative_error(jnp.einsum("bhts,bshv->bthv", weights, v), o) < 1e-5


def test_gla_packed_segments_are_independent():
  mixer = build_mixer("gla", d_model=D, num_heads=H, implementation="xla")
  x = jax.random.normal(jax.random.key(0), (1, T, D))
  params = mixer.init(jax.random.key(1), x)
  seg = jnp.asarray([[0] * 5 + [1] * (T - 5)])
  packed = mixer.apply(params, x, segment_ids=seg)
  alone = mixer.apply(params, x[:, 5:])
  assert relative_error(packed[:, 5:], alone) < 1e-5
