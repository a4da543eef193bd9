"""Attention options that are not mixer families: DAM masks (inference), SSA alignment
(training, on nsa), NAMM-style KV-cache eviction (decoding)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from attnzoo.mixers import build_mixer
from attnzoo.mixers.layers import default_positions
from attnzoo.ops import dam
from attnzoo.ops.softmax_attention import reference as attention_reference
from tests.conftest import relative_error

D, B = 16, 2


def decode_one_by_one(mixer, variables, x):
  """Outputs of decoding x one token at a time from an empty cache, and the caches after each
  step."""
  cache = jax.jit(functools.partial(mixer.init, decode=True))(jax.random.key(0), x)["cache"]
  step = jax.jit(functools.partial(mixer.apply, decode=True, mutable=["cache"]))
  outs, caches = [], []
  for t in range(x.shape[1]):
    positions = jnp.full((x.shape[0], 1), t, jnp.int32)
    out, new = step({**variables, "cache": cache}, x[:, t : t + 1], positions=positions)
    cache = new["cache"]
    outs.append(out)
    caches.append(cache)
  return jnp.concatenate(outs, axis=1), caches


def masked_attention_output(mixer, params, x, bias):
  """The mixer's output through the float32 reference attention with an additive bias."""

  def run(m, x):
    q, k, v = m._project(x, default_positions(x, None))
    o = attention_reference(q, k, v, scale=m._scale(), causal=True, bias=bias)
    return m.out(o)

  return mixer.apply({"params": params}, x, method=run)


# ----------------------------------------------------------------------------- DAM


def test_dam_extracts_diagonals_and_columns():
  """A head that attends to the previous token and to a sink at 0 keeps exactly offset 1 (and
  the main diagonal) and column 0; a uniform head below the threshold keeps only the main
  diagonal. The pattern holds at longer lengths."""
  t = 6
  prev = np.eye(t, k=-1)
  prev[:, 0] += 1.0
  prev[0, 0] = 1.0
  prev = prev / prev.sum(-1, keepdims=True)
  uniform = np.tril(np.ones((t, t))) * 0.01
  maps = jnp.asarray(np.stack([prev, uniform])[None], jnp.float32)  # [1, 2, t, t]
  pattern = dam.extract_pattern(maps, threshold=0.05, coverage=0.5)
  assert np.asarray(pattern.offsets[0]).nonzero()[0].tolist() == [0, 1]
  assert np.asarray(pattern.columns[0]).nonzero()[0].tolist() == [0]
  assert np.asarray(pattern.offsets[1]).nonzero()[0].tolist() == [0]
  assert not np.asarray(pattern.columns[1]).any()
  pos = jnp.arange(9)[None]
  mask = np.asarray(dam.pattern_mask(pattern, pos, pos))[0]  # [H, 9, 9]
  want = np.eye(9, dtype=bool) | np.eye(9, k=-1, dtype=bool)
  want[:, 0] = True
  np.testing.assert_array_equal(mask[0], want)
  np.testing.assert_array_equal(mask[1], np.eye(9, dtype=bool))


def test_dam_mask_forward_and_decode():
  """Patterns extracted from the mixer's own maps on a short calibration prompt; on a longer
  input the masked mixer equals the masked float32 reference (GQA heads), decoding with the
  mask equals the masked forward, and the mask removes keys (it differs from full attention)."""
  mixer = build_mixer("attention", d_model=D, num_heads=4, num_kv_heads=2, rope=True)
  calib = jax.random.normal(jax.random.key(0), (B, 7, D))
  x = jax.random.normal(jax.random.key(1), (B, 11, D))
  params = jax.jit(mixer.init)(jax.random.key(2), x)["params"]
  maps = jax.jit(functools.partial(mixer.apply, method=mixer.attention_matrix))(
    {"params": params}, calib
  )
  pattern = dam.extract_pattern(maps, threshold=0.2, coverage=0.5)
  variables = {"params": params, "dam": pattern._asdict()}
  out = jax.jit(mixer.apply)(variables, x)
  pos = jnp.broadcast_to(jnp.arange(11), (B, 11))
  ref = masked_attention_output(mixer, params, x, dam.pattern_bias(pattern, pos, pos))
  assert relative_error(out, ref) < 1e-5
  assert relative_error(out, jax.jit(mixer.apply)({"params": params}, x)) > 1e-2
  decoded, _ = decode_one_by_one(mixer, variables, x)
  assert relative_error(decoded, out) < 1e-5
