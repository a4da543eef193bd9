"""Attention options that are not mixer families: DAM masks (inference), SSA alignment
(training, on nsa), NAMM-style KV-cache eviction (decoding)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import build_mixer
from attnzoo.mixers.layers import default_positions
from attnzoo.ops import dam, namm, ssa
from attnzoo.ops import nsa as nsa_ops
from attnzoo.ops.softmax_attention import reference as attention_reference
from tests.conftest import decode_in_chunks, relative_error
from tests.mixers.test_mixers import TEST_KWARGS

D, B = 16, 2


def decode_one_by_one(mixer, variables, x):
  """Outputs of decoding x one token at a time from an empty cache, and the caches after each
  step."""
  return decode_in_chunks(mixer, variables, x, range(1, x.shape[1] + 1))


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


# ----------------------------------------------------------------------------- SSA

NSA_KWARGS = dict(TEST_KWARGS["nsa"], num_initial=1, num_local=1)


def test_ssa_alignment_loss_and_its_stop_gradients():
  """SmoothL1 both ways: d/d o_full is the sparsity term's gradient alone, d/d o_sparse the
  commitment term's (each side stops the other's gradient)."""
  o_sparse = jnp.zeros((1, 2, 1, 2))
  o_full = jnp.asarray([0.5, -3.0, 0.2, 2.0]).reshape(1, 2, 1, 2)
  want = np.mean([0.125, 2.5, 0.02, 1.5])
  np.testing.assert_allclose(ssa.alignment_loss(o_sparse, o_full), 2 * want, rtol=1e-6)
  g_sparse, g_full = jax.grad(ssa.alignment_loss, argnums=(0, 1))(o_sparse, o_full)
  slope = np.clip(np.asarray(o_full), -1, 1) / 4
  np.testing.assert_allclose(g_full, slope, rtol=1e-6)
  np.testing.assert_allclose(g_sparse, -slope, rtol=1e-6)


def test_ssa_gives_gradient_to_unselected_keys():
  """The last query (block 3) selects the initial block and its own: the selection keys of
  blocks 1 and 2 get no gradient from the sparse output, and one from SSA's alignment."""
  t = 16
  ks = iter(jax.random.split(jax.random.key(0), 20))
  n = lambda shape, s=1.0: s * jax.random.normal(next(ks), shape, jnp.float32)
  q, gates = n((B, t, 4, 8)), jax.nn.sigmoid(n((B, t, 4, 3)))
  k, v = [n((B, t, 2, 8)) for _ in range(3)], tuple(n((B, t, 2, 8)) for _ in range(3))
  comp = nsa_ops.Compression(n((4, 8), 0.1), n((4, 8, 8), 0.1), n((8,)), n((8, 8)), n((8,)))
  cfg = nsa_ops.Config(**{k: NSA_KWARGS[k] for k in nsa_ops.Config.__dataclass_fields__})
  run = lambda k_slc, **kw: nsa_ops.nsa(
    q,
    (k[0], k_slc, k[2]),
    v,
    gates,
    compress_k=comp,
    compress_v=comp,
    scale=8**-0.5,
    config=cfg,
    implementation="xla",
    **kw,
  )

  @jax.jit
  def grads(k_slc):
    def sparse_loss(ks):
      o, idx = run(ks, return_indices=True)
      return o[:, -1].sum(), idx

    sparse, idx = jax.grad(sparse_loss, has_aux=True)(k_slc)
    align = lambda ks: ssa.alignment_loss(run(ks)[:, -1], run(ks, dense_selection=True)[:, -1])
    return idx, sparse, jax.grad(align)(k_slc)

  idx, sparse, aligned = grads(k[1])
  assert sorted(np.unique(np.asarray(idx[:, -1])).tolist()) == [0, 3]
  assert np.abs(np.asarray(sparse[:, 4:12])).max() == 0
  assert np.abs(np.asarray(sparse[:, 12:])).max() > 0
  assert np.abs(np.asarray(aligned[:, 4:12])).min(axis=(-1, -2)).min() > 0


def test_ssa_mixer_sows_the_alignment_and_picks_a_stream():
  """Training (a dropout rng): the output is the sparse or the full stream and the sown loss is
  alpha / num_layers x their alignment; without the rng the mixer is plain NSA."""
  x = jax.random.normal(jax.random.key(0), (B, 13, D))
  mixer = build_mixer("nsa", d_model=D, ssa_alpha=10.0, num_layers=2, **NSA_KWARGS)
  plain = build_mixer("nsa", d_model=D, **NSA_KWARGS)
  params = jax.jit(plain.init)(jax.random.key(1), x)

  def streams(m, x):
    q, k, v, gates = m._project(x, default_positions(x, None))
    ck, cv = m.compress_k(q.shape[-1]), m.compress_v(q.shape[-1])
    kw = dict(compress_k=ck, compress_v=cv, scale=q.shape[-1] ** -0.5, config=m._config())
    sparse = nsa_ops.nsa(q, k, v, gates, implementation="xla", **kw)
    full = nsa_ops.nsa(q, k, v, gates, implementation="xla", dense_selection=True, **kw)
    return m.out(sparse), m.out(full), ssa.alignment_loss(sparse, full) * 5.0

  sparse, full, loss = jax.jit(functools.partial(plain.apply, method=streams))(params, x)
  np.testing.assert_allclose(jax.jit(mixer.apply)(params, x), sparse, rtol=1e-5, atol=1e-6)
  train = jax.jit(lambda key: mixer.apply(params, x, rngs={"dropout": key}, mutable=["losses"]))
  picked = set()
  for seed in range(6):
    out, sown = train(jax.random.key(seed))
    np.testing.assert_allclose(sown["losses"]["ssa_alignment"][0], loss, rtol=1e-5)
    is_full = relative_error(out, full) < 1e-5
    assert is_full or relative_error(out, sparse) < 1e-5
    picked.add(is_full)
  assert picked == {True, False}


# ----------------------------------------------------------------------------- NAMM


def test_namm_spectrogram_and_backward_scorer():
  """The features are the gamma-weighted sum of the Hann-windowed frames' |rfft| (numpy), on
  top of the decayed previous average; a token's score depends on itself and later tokens
  only (the backward mask), never on empty slots."""
  rng = np.random.default_rng(0)
  history, previous = rng.random((3, 8)), rng.random((3, 3))
  features = jax.jit(functools.partial(namm.spectrogram_features, n_fft=4, hop=2, gamma=0.9))
  got = features(jnp.asarray(history, jnp.float32), jnp.asarray(previous, jnp.float32))
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(4) / 4)
  frames = [np.abs(np.fft.rfft(history[:, s : s + 4] * hann)) for s in (0, 2, 4)]
  want = 0.9**3 * previous + 0.9**2 * frames[0] + 0.9 * frames[1] + frames[2]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  params = namm.init_scorer(jax.random.key(0), n_fft=4, hidden=8)
  features = jax.random.normal(jax.random.key(1), (1, 6, 2, 3))  # the token at slot 2: pos 2
  positions = jnp.asarray([[4, 0, 2, namm.EMPTY, 1, 3]])
  grad = jax.jit(jax.grad(lambda f: namm.scores(params, f, positions)[0, 2].sum()))(features)
  touched = np.abs(np.asarray(grad[0])).sum((-1, -2)) > 0
  np.testing.assert_array_equal(touched, [True, False, True, False, False, True])


def namm_decode(mixer, params, scorer, x):
  """Decoded outputs and, per step t, which positions the query at t saw (the cache after the
  step: eviction runs before the step's write)."""
  out, caches = decode_one_by_one(mixer, {"params": params, "namm": {"scorer": scorer}}, x)
  t = x.shape[1]
  seen = np.zeros((x.shape[0], t, t), bool)
  for step, cache in enumerate(caches):
    for b, row in enumerate(np.asarray(cache["positions"])):
      seen[b, step, row[row < t]] = True
  return out, seen


def test_namm_decode_equals_attention_masked_by_the_evictions():
  """Decoding with eviction every 4 steps (and with a bounded cache of 9 slots) equals the
  float32 reference masked to the tokens each query's cache held; some tokens are evicted,
  not all, and the bounded cache never holds more than 9."""
  x = jax.random.normal(jax.random.key(0), (B, 21, D))
  kw = dict(d_model=D, num_heads=4, num_kv_heads=2, namm_interval=4, namm_n_fft=4, namm_hop=2)
  scorer = namm.init_scorer(jax.random.key(5), n_fft=4, hidden=8)
  scorer["readout_bias"] = jnp.asarray(-0.03)
  for cache in (None, 9):
    mixer = build_mixer("attention", namm_cache=cache, **kw)
    params = jax.jit(mixer.init)(jax.random.key(1), x)["params"]
    out, seen = namm_decode(mixer, params, scorer, x)
    ref = masked_attention_output(mixer, params, x, jnp.where(seen[:, None], 0.0, -jnp.inf))
    assert relative_error(out, ref) < 1e-5
    live = seen[:, -1].sum(-1)  # what the last query sees, of 21 tokens
    assert (live > 2).all() and (live < 21).all()
    if cache:
      assert seen.sum(-1).max() == 9
    cache_arrays = jax.eval_shape(functools.partial(mixer.init, decode=True), jax.random.key(0), x)
    floats = [a for a in jax.tree.leaves(cache_arrays["cache"]) if a.dtype == jnp.float32]
    assert mixer.state_size(21) * B == sum(a.size * 4 for a in floats)


def test_namm_refuses_what_it_does_not_serve():
  x = jnp.zeros((1, 3, D))
  with pytest.raises(ValueError, match="namm eviction takes plain attention"):
    build_mixer("attention", d_model=D, window=4, namm_interval=4).init(jax.random.key(0), x)
  mixer = build_mixer("attention", d_model=D, namm_interval=4, namm_n_fft=4)
  variables = jax.jit(functools.partial(mixer.init, decode=True))(jax.random.key(0), x)
  with pytest.raises(ValueError, match="'namm' collection"):
    mixer.apply(variables, x[:, :1], decode=True, positions=jnp.zeros((1, 1), int), mutable=True)
