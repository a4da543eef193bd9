"""RWKV-6: the whole time-mixing layer (ddlerp token shift, LoRA decay, bonus readout, per-head
GroupNorm, gate) equals a naive float64 loop; token shift restarts at packed segments."""

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from attnzoo.mixers.rwkv6 import token_shift
from tests.conftest import relative_error

B, T, D, H = 2, 9, 16, 2


def naive_rwkv6(p, x, heads, eps=64e-5):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  x = np.asarray(x, np.float64)
  b, t, d = x.shape
  prev = np.concatenate([np.zeros((b, 1, d)), x[:, :-1]], axis=1)
  dx = prev - x
  lora = np.tanh((x + dx * p["mu_x"]) @ p["mix_a"]).reshape(b, t, 5, -1)
  m = np.einsum("btfl,fld->btfd", lora, p["mix_b"])
  xw, xk, xv, xr, xg = [x + dx * (p["mu"][i] + m[:, :, i]) for i in range(5)]
  proj = lambda z, name: np.einsum("btd,dhk->bthk", z, p[name]["kernel"])
  r, k, v, g = proj(xr, "r"), proj(xk, "k"), proj(xv, "v"), proj(xg, "g")
  g = g / (1 + np.exp(-g))
  w = np.exp(
    -np.exp(p["decay"] + np.einsum("btl,lhk->bthk", np.tanh(xw @ p["decay_a"]), p["decay_b"]))
  )
  u = p["bonus"]
  o = np.zeros(v.shape)
  for bi in range(b):
    for h in range(heads):
      s = np.zeros((k.shape[-1], v.shape[-1]))
      for ti in range(t):
        kv = np.outer(k[bi, ti, h], v[bi, ti, h])
        o[bi, ti, h] = r[bi, ti, h] @ (s + u[h][:, None] * kv)
        s = w[bi, ti, h][:, None] * s + kv
  mean = o.mean(-1, keepdims=True)
  var = ((o - mean) ** 2).mean(-1, keepdims=True)
  o = (o - mean) / np.sqrt(var + eps) * p["group_norm"]["scale"] + p["group_norm"]["bias"]
  return np.einsum("bthv,hvd->btd", o * g, p["out"]["kernel"])


def test_rwkv6_equals_naive_loop():
  mixer = build_mixer(
    "rwkv6",
    d_model=D,
    num_heads=H,
    layer_idx=1,
    num_layers=3,
    mix_lora_dim=4,
    decay_lora_dim=8,
    implementation="xla",
  )
  x = jax.random.normal(jax.random.key(0), (B, T, D))
  params = mixer.init(jax.random.key(1), x)["params"]
  # Make every learned path matter (zero-initialised LoRA A, unit norm affine, bonus).
  keys = iter(jax.random.split(jax.random.key(2), 32))
  params = jax.tree.map(lambda a: a + 0.3 * jax.random.normal(next(keys), a.shape), params)
  out = mixer.apply({"params": params}, x)
  assert relative_error(out, naive_rwkv6(params, x, H)) < 1e-5


def test_rwkv6_initial_schedules():
  mixer = build_mixer("rwkv6", d_model=D, num_heads=H, layer_idx=0, num_layers=2)
  params = mixer.init(jax.random.key(0), jnp.zeros((1, 3, D)))["params"]
  decay = np.asarray(params["decay"]).reshape(-1)
  np.testing.assert_allclose([decay[0], decay[-1]], [-6.0, -1.0], rtol=1e-6)
  assert np.all(np.diff(decay) > 0)
  assert np.asarray(params["mix_a"]).max() == 0 and np.abs(params["mix_b"]).max() <= 0.01


def test_token_shift_restarts_at_segments():
  x = jnp.arange(1.0, 7.0).reshape(1, 6, 1)
  seg = jnp.asarray([[0, 0, 0, 1, 1, 2]])
  np.testing.assert_array_equal(np.asarray(token_shift(x, seg))[0, :, 0], [0, 1, 2, 0, 4, 0])
  first = jnp.full((1, 1), 9.0)
  np.testing.assert_array_equal(
    np.asarray(token_shift(x, first=first))[0, :, 0], [9, 1, 2, 3, 4, 5]
  )


def test_rwkv6_packed_segments_are_independent():
  mixer = build_mixer(
    "rwkv6", d_model=D, num_heads=H, mix_lora_dim=4, decay_lora_dim=8, implementation="xla"
  )
  x = jax.random.normal(jax.random.key(0), (1, T, D))
  params = mixer.init(jax.random.key(1), x)
  seg = jnp.asarray([[0] * 4 + [1] * (T - 4)])
  packed = mixer.apply(params, x, segment_ids=seg)
  assert relative_error(packed[:, 4:], mixer.apply(params, x[:, 4:])) < 1e-5
