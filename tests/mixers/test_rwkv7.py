"""RWKV-7: the whole time-mixing layer (token-shift lerps, LoRA decay / in-context learning
rate / gate, the generalised delta rule in the paper's V x K layout, GroupNorm, bonus) equals a
naive float64 loop written from the paper's equations; its hidden attention reproduces the op's
output. Packed segments of the issue #17 mixers are independent."""

import jax
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from attnzoo.mixers.layers import token_shift
from tests.conftest import relative_error, slow

B, T, D, H = 2, 9, 16, 2


def naive_rwkv7(p, x, heads, eps=64e-5):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  n = d // heads
  prev = np.concatenate([np.zeros((b, 1, d)), x[:, :-1]], axis=1)
  xr, xw, xk, xv, xa, xg = [x + (prev - x) * p["mu"][i] for i in range(6)]
  proj = lambda z, name: np.einsum("btd,dhk->bthk", z, p[name]["kernel"]).reshape(b, t, d)
  sigmoid = lambda z: 1 / (1 + np.exp(-z))
  r, k, v = proj(xr, "r"), proj(xk, "k"), proj(xv, "v")
  w_raw = -np.log1p(np.exp(-(p["w0"] + np.tanh(xw @ p["w1"]) @ p["w2"]))) - 0.5
  w = np.exp(-np.exp(w_raw))
  alpha = sigmoid(p["a0"] + xa @ p["a1"] @ p["a2"])
  g = sigmoid(xg @ p["g1"]) @ p["g2"]
  kk = (k * p["k_k"]).reshape(b, t, heads, n)
  kk = (kk / np.linalg.norm(kk, axis=-1, keepdims=True)).reshape(b, t, d)
  k = k * (1 + (alpha - 1) * p["k_a"])
  o = np.zeros((b, t, d))
  for bi in range(b):
    for h in range(heads):
      c = slice(h * n, (h + 1) * n)
      s = np.zeros((n, n))  # [V, K]
      for ti in range(t):
        kap, a_t = kk[bi, ti, c], alpha[bi, ti, c]
        s = s @ (np.diag(w[bi, ti, c]) - np.outer(kap, kap * a_t)) + np.outer(
          v[bi, ti, c], k[bi, ti, c]
        )
        o[bi, ti, c] = s @ r[bi, ti, c]
  o = o.reshape(b, t, heads, n)
  mean = o.mean(-1, keepdims=True)
  var = ((o - mean) ** 2).mean(-1, keepdims=True)
  o = (o - mean) / np.sqrt(var + eps) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
  rk = (r.reshape(o.shape) * k.reshape(o.shape) * p["r_k"]).sum(-1, keepdims=True)
  o = (o + rk * v.reshape(o.shape)).reshape(b, t, d) * g
  return np.einsum("bthv,hvd->btd", o.reshape(b, t, heads, n), p["out"]["kernel"])


def test_rwkv7_equals_naive_loop():
  mixer = build_mixer(
    "rwkv7",
    d_model=D,
    num_heads=H,
    layer_idx=1,
    num_layers=3,
    decay_lora_dim=4,
    a_lora_dim=4,
    gate_lora_dim=4,
    implementation="xla",
  )
  x = jax.random.normal(jax.random.key(0), (B, T, D))

  # Random values for every parameter (numpy: nothing to compile), so every path matters.
  shapes = jax.eval_shape(mixer.init, jax.random.key(1), x)["params"]
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: 0.5 * rng.standard_normal(s.shape).astype(np.float32), shapes)

  def internals(m, x):
    """The op's output o, v and the hidden attention A (o = A v before GroupNorm)."""
    r, k, v, log_decay, a, b, _ = m._features(x, token_shift(x))
    return m.op(r, k, v, log_decay, a, b), v, m.attention_matrix(x)

  @jax.jit
  def run(params, x):
    variables = {"params": params}
    return mixer.apply(variables, x), mixer.apply(variables, x, method=internals)

  out, (o, v, weights) = run(params, x)
  assert relative_error(out, naive_rwkv7(params, x, H)) < 1e-5
  assert relative_error(np.einsum("bhts,bshd->bthd", weights, v), o) < 1e-5


@pytest.mark.parametrize(
  "name,kwargs",
  [
    ("rwkv7", dict(num_heads=2, decay_lora_dim=4, a_lora_dim=4, gate_lora_dim=4)),
    pytest.param("smlp", dict(l_max=13, num_experts=2), marks=slow),
    pytest.param("dynamic_conv", dict(num_heads=4, kernel_size=4), marks=slow),
    pytest.param("fnet", dict(causal=False), marks=slow),
  ],
)
def test_packed_segments_are_independent(name, kwargs):
  """The issue #17 mixers whose segment handling lives in the mixer (token shift, positions
  inside a segment, conv windows, per-segment DFT): packed == each segment alone."""
  mixer = build_mixer(name, d_model=D, **kwargs)
  x = np.random.default_rng(3).standard_normal((B, 13, D)).astype(np.float32)
  seg = np.array([[0] * 6 + [1] * 7] * B)

  @jax.jit
  def run(x):
    params = mixer.init(jax.random.key(0), x)
    packed = mixer.apply(params, x, segment_ids=seg)
    alone = [mixer.apply(params, x[:, :6]), mixer.apply(params, x[:, 6:])]
    return packed, alone

  packed, alone = run(x)
  assert relative_error(packed, np.concatenate(alone, axis=1)) < 1e-5
