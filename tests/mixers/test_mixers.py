"""Contract tests run on every registered mixer: shapes, causality, decode ≡ full forward,
state_size equal to the bytes of the real decoding state, the declared capabilities
(bidirectional form or a one-line refusal, block_ids)."""

import dataclasses
import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers import MIXERS, build_mixer
from attnzoo.mixers.registry import causal_mixers
from tests.conftest import decode_in_chunks, relative_error

# Options that exercise each mixer's interesting paths at small sizes.
TEST_KWARGS = {
  "attention": dict(num_heads=4, num_kv_heads=2, rope=True, gist_tokens=1, gist_segment=3),
  "sliding_window": dict(num_heads=2, window=5, sink_tokens=2, sink_logit=True),
  "gla": dict(num_heads=2, implementation="xla"),
  "hgrn2": dict(num_heads=2, layer_idx=1, num_layers=2, implementation="xla"),
  "rwkv6": dict(num_heads=2, mix_lora_dim=4, decay_lora_dim=8, implementation="xla"),
  "deltanet": dict(num_heads=2, implementation="xla"),
  "gated_deltanet": dict(num_heads=2, expand_v=2.0, implementation="xla"),
  "lawcat": dict(num_heads=2, feature_dim=4, gate_low_rank_dim=4, implementation="xla"),
  "gated_attention": dict(num_heads=2, gate="headwise", memory=4, segment=5),
  "block_attention": dict(num_heads=2, num_kv_heads=1),
  "base_conv": dict(kernel_size=3),
  "linear_attention": dict(num_heads=2, feature_map="taylor", feature_dim=4, implementation="xla"),
  "lsa": dict(num_heads=2, implementation="xla"),
  "based": dict(num_heads=2, feature_dim=4, implementation="xla"),
  "retnet": dict(num_heads=2, implementation="xla"),
  "lightning": dict(num_heads=2, layer_idx=1, num_layers=3, implementation="xla"),
  "mamba2": dict(d_state=8, head_dim=8, ngroups=2, implementation="xla"),
  "mamba": dict(d_state=4, implementation="xla"),
  "s4d": dict(d_state=8, a_init="inv", discretization="bilinear"),
  "dss": dict(d_state=8, l_max=16),
  "h3": dict(d_state=4, head_dim=2),
  "hyena": dict(l_max=16, filter_order=8),
  "rwkv4": dict(layer_idx=1, num_layers=2),
  "ahn": dict(num_heads=2, window=3, zero_memory_out=False, implementation="xla"),
  "nsa": dict(
    num_heads=4,
    num_kv_heads=2,
    block_cmp=4,
    stride=2,
    block_slc=4,
    num_selected=2,
    window=3,
    compress_hidden=8,
    implementation="xla",
  ),
  "fftnet": dict(l_max=16, num_heads=2),
  "lightweight_conv": dict(num_heads=4, kernel_size=4),
  "dynamic_conv": dict(num_heads=4, kernel_size=4),
  "smlp": dict(l_max=16, num_experts=2),
  "rwkv7": dict(
    num_heads=2,
    decay_lora_dim=4,
    a_lora_dim=4,
    gate_lora_dim=4,
    layer_idx=1,
    num_layers=2,
  ),
  "aaren": dict(num_heads=2),
  "shaped": dict(num_heads=2, num_kv_heads=1),
  "sinkhorn": dict(num_heads=2, n_iter=4, implementation="reference"),  # xla: op tests
  "gaussian_adaptive": dict(num_heads=2, num_gaussians=3, implementation="reference"),
  "moh": dict(num_heads=3, head_dim=4, num_kv_heads=1, shared_heads=1, routed_heads=1),
  "routing": dict(num_heads=2, num_kv_heads=1, num_clusters=2),
  "hat": dict(num_heads=2, segment=4),
  "ran": dict(num_heads=2, window=4),
  "lte": dict(num_heads=2, window=4, sink_tokens=2, retained=2),
}
D, B, T = 16, 2, 13


def make(name):
  return build_mixer(name, d_model=D, **TEST_KWARGS.get(name, {}))


def x_input(seed=0):
  return jax.random.normal(jax.random.key(seed), (B, T, D))


def output_and_grad_at(mixer, x, t, seed=1):
  """The mixer's output and d out[:, t].sum() / d x, compiled (eager op-by-op dispatch of a
  whole mixer costs seconds per test on the CPU)."""

  @jax.jit
  def run(x):
    params = mixer.init(jax.random.key(seed), x)
    out = mixer.apply(params, x)
    return out, jax.grad(lambda x: mixer.apply(params, x)[:, t].sum())(x)

  return run(x)


@pytest.mark.parametrize("name", causal_mixers())
def test_shape_and_causality(name):
  t = 6  # d out[:, t] / d x[:, s] must vanish for s > t
  out, grad = output_and_grad_at(make(name), x_input(), t)
  assert out.shape == (B, T, D)
  assert np.abs(np.asarray(grad[:, t + 1 :])).max() == 0
  assert np.abs(np.asarray(grad[:, : t + 1])).max() > 0


@pytest.mark.parametrize("name", causal_mixers())
def test_decode_equals_forward(name):
  """Token by token from an empty cache; a multi-token prefill followed by single steps is
  tested for every mixer by tests/models/test_generate.py."""
  mixer = make(name)
  x = x_input(2)
  params = jax.jit(mixer.init)(jax.random.key(3), x)["params"]
  full = jax.jit(mixer.apply)({"params": params}, x)
  decoded, _ = decode_in_chunks(mixer, {"params": params}, x, range(1, T + 1), key=3)
  assert relative_error(decoded, full) < 1e-5


@pytest.mark.parametrize("name", causal_mixers())
def test_state_size_is_the_decoding_state(name):
  """state_size(T) = bytes (at float32) of the floating-point arrays decoding keeps."""
  mixer = make(name)
  cache = jax.eval_shape(functools.partial(mixer.init, decode=True), jax.random.key(0), x_input())
  cache = cache["cache"]
  floats = [a for a in jax.tree.leaves(cache) if jnp.issubdtype(a.dtype, jnp.floating)]
  assert mixer.state_size(T) * B == sum(a.size * 4 for a in floats)


def test_attention_state_sizes():
  assert build_mixer("attention", d_model=64, num_heads=1).state_size(64) == 2 * 64 * 64 * 4
  gqa = build_mixer("attention", d_model=64, num_heads=8, num_kv_heads=2)
  assert gqa.state_size(100) == 2 * 100 * 2 * 8 * 4
  window = build_mixer("sliding_window", d_model=64, num_heads=4, window=16)
  assert window.state_size(1000) == 2 * 16 * 64 * 4
  assert window.state_size(8) == 2 * 8 * 64 * 4


def test_sliding_window_sees_only_the_window():
  mixer = build_mixer("sliding_window", d_model=D, num_heads=2, window=4)
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: mixer.apply(params, x)[:, 10].sum())(x)
  seen = np.abs(np.asarray(grad)).sum(axis=(0, 2)) > 0
  assert seen.tolist() == [False] * 7 + [True] * 4 + [False] * 2


def test_attention_matrix_rows_are_distributions():
  mixer = make("attention")
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  weights = mixer.apply(params, x, method=mixer.attention_matrix)
  assert weights.shape == (B, 4, T, T)
  np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(jnp.triu(weights, 1))).max() == 0


def test_bad_options_are_errors():
  with pytest.raises(ValueError, match="divisible by num_heads"):
    build_mixer("attention", d_model=10, num_heads=3).init(jax.random.key(0), jnp.zeros((1, 4, 10)))
  with pytest.raises(ValueError, match="has no option"):
    build_mixer("attention", d_model=10, nonsense=1)
  with pytest.raises(ValueError, match="unknown mixer"):
    build_mixer("no_such_mixer", d_model=10)


def test_attention_options_reach_the_op():
  x = x_input()
  plain = build_mixer("attention", d_model=D, num_heads=2, head_dim=24)
  params = plain.init(jax.random.key(0), x)
  assert params["params"]["q"]["kernel"].shape == (D, 2, 24)  # head_dim independent of D/H
  params = jax.tree.map(lambda p: 30 * p, params)  # large logits, so the cap matters
  capped = build_mixer("attention", d_model=D, num_heads=2, head_dim=24, softcap=0.5)
  weights = capped.apply(params, x, method=capped.attention_matrix)
  assert (
    np.abs(np.asarray(weights - plain.apply(params, x, method=plain.attention_matrix))).max() > 1e-3
  )
  # with a cap of 0.5 every logit is in [-0.5, 0.5]: weights within a row differ by <= e^1
  w = np.asarray(weights[:, :, -1])
  assert w.max(-1).min() / w.min(-1).min() <= np.e + 1e-4


def test_gated_attention_gates_each_head():
  x = x_input()
  for gate, width in (("elementwise", 8), ("headwise", 1)):
    mixer = build_mixer("gated_attention", d_model=D, num_heads=2, gate=gate)
    params = mixer.init(jax.random.key(0), x)
    assert params["params"]["gate_proj"]["kernel"].shape == (D, 2, width)
    # a gate driven to zero silences the output
    shut = jax.tree_util.tree_map_with_path(
      lambda path, p: (
        jnp.full_like(p, -1e4) if "gate_proj" in str(path) and "bias" in str(path) else p
      ),
      params,
    )
    assert np.abs(np.asarray(mixer.apply(shut, x) - shut["params"]["out"]["bias"])).max() < 1e-6


def test_block_attention_mask_and_kv_reuse():
  mixer = build_mixer("block_attention", d_model=D, num_heads=2)
  x = x_input(5)
  blocks = jnp.array([[0] * 4 + [1] * 5 + [2] * 4] * B)
  params = mixer.init(jax.random.key(0), x)
  full = mixer.apply(params, x, block_ids=blocks)
  # a token of block 1 sees only block 1; a token of the last block sees everything before it
  grad = lambda t: np.abs(
    np.asarray(jax.grad(lambda x: mixer.apply(params, x, block_ids=blocks)[:, t].sum())(x))
  ).sum(axis=(0, 2))
  assert (grad(6)[:4] == 0).all() and (grad(6)[4:7] > 0).all() and (grad(6)[7:] == 0).all()
  assert (grad(10)[:11] > 0).all() and (grad(10)[11:] == 0).all()
  # blocks encoded on their own at local positions, re-encoded at their offsets, fill the KV
  # cache; decoding the last block from it equals the full forward
  cache = mixer.init(jax.random.key(0), x, decode=True)["cache"]
  keys, values = [], []
  for start, stop in ((0, 4), (4, 9)):
    k, v = mixer.apply(params, x[:, start:stop], method=mixer.encode_block)
    keys.append(mixer.apply(params, k, start, method=mixer.place_block))
    values.append(v)
  cache = dict(
    cache,
    keys=cache["keys"].at[:, :9].set(jnp.concatenate(keys, 1)),
    values=cache["values"].at[:, :9].set(jnp.concatenate(values, 1)),
    positions=cache["positions"].at[:, :9].set(jnp.arange(9)),
  )
  positions = jnp.broadcast_to(jnp.arange(9, 13), (B, 4))
  out, _ = mixer.apply(
    {**params, "cache": cache}, x[:, 9:], positions=positions, decode=True, mutable=["cache"]
  )
  assert relative_error(out, full[:, 9:]) < 1e-5


def test_block_attention_blocks_inside_documents():
  """segment_ids separate documents, block_ids blocks inside them: each document's last block
  sees its whole document, other blocks only themselves, nothing crosses documents."""
  mixer = build_mixer("block_attention", d_model=D, num_heads=2)
  x = x_input(6)
  documents = jnp.array([[0] * 7 + [1] * 6] * B)
  blocks = jnp.array([[0] * 3 + [1] * 4 + [1] * 2 + [2] * 4] * B)  # block 1 spans both
  params = mixer.init(jax.random.key(0), x)
  weights = np.asarray(
    mixer.apply(params, x, segment_ids=documents, block_ids=blocks, method=mixer.attention_matrix)
  )
  seen = (weights[0, 0] > 0).astype(int)
  visible = np.zeros((T, T), int)
  for lo, hi, last in ((0, 3, False), (3, 7, True), (7, 9, False), (9, 13, True)):
    start = (0 if lo < 7 else 7) if last else lo
    for t in range(lo, hi):
      visible[t, start : t + 1] = 1
  np.testing.assert_array_equal(seen, visible)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
  # the forward applies the same weights
  out = mixer.apply(params, x, segment_ids=documents, block_ids=blocks)
  v = mixer.apply(params, x, method=lambda m, x: m.v(x))
  o = jnp.einsum("bhts,bshd->bthd", weights, v)
  assert relative_error(out, mixer.apply(params, o, method=lambda m, o: m.out(o))) < 1e-5
  with pytest.raises(ValueError, match="decoding does not take block_ids"):
    mixer.init(jax.random.key(0), x, block_ids=blocks, decode=True)


def test_declared_capabilities():
  """Every mixer declares bidirectional and uses_block_ids; a bidirectional one has a `causal`
  field; block_ids are keywords of exactly the mixers that use them."""
  for name, cls in MIXERS.items():
    assert isinstance(cls.bidirectional, bool) and isinstance(cls.uses_block_ids, bool)
    fields = {f.name for f in dataclasses.fields(cls)}
    assert not cls.bidirectional or "causal" in fields, name
    for method in (cls.__call__, getattr(cls, "attention_matrix", None)):
      if method is not None:
        assert ("block_ids" in inspect.signature(method).parameters) == cls.uses_block_ids
  assert sorted(n for n, c in MIXERS.items() if c.uses_block_ids) == ["block_attention"]


BIDIRECTIONAL = sorted(name for name, cls in MIXERS.items() if cls.bidirectional)


@pytest.mark.parametrize("name", BIDIRECTIONAL)
def test_bidirectional_mixers_see_the_future(name):
  mixer = build_mixer(name, d_model=D, causal=False, **TEST_KWARGS.get(name, {}))
  t = 6  # with causal=False, d out[:, t] / d x[:, s] is nonzero for some s > t
  _, grad = output_and_grad_at(mixer, x_input(), t)
  assert np.abs(np.asarray(grad[:, t + 1 :])).max() > 0


@pytest.mark.parametrize("name", sorted(set(MIXERS) - set(causal_mixers())))
def test_bidirectional_only_mixers_refuse_causal_in_one_line(name):
  with pytest.raises(ValueError) as error:
    build_mixer(name, d_model=D, causal=True, **TEST_KWARGS.get(name, {}))
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"mixer {name!r} is bidirectional-only")


@pytest.mark.parametrize("name", sorted(set(MIXERS) - set(BIDIRECTIONAL)))
def test_causal_only_mixers_refuse_in_one_line(name):
  with pytest.raises(ValueError) as error:
    build_mixer(name, d_model=D, causal=False, **TEST_KWARGS.get(name, {}))
  message = str(error.value)
  assert "\n" not in message and message.startswith(f"mixer {name!r} is causal-only")
  assert f"bidirectional mixers: {', '.join(BIDIRECTIONAL)}" in message


def test_non_causal_sliding_window_is_symmetric():
  mixer = build_mixer("sliding_window", d_model=D, num_heads=2, window=3, causal=False)
  x = x_input()
  params = mixer.init(jax.random.key(0), x)
  grad = jax.grad(lambda x: mixer.apply(params, x)[:, 6].sum())(x)
  seen = np.abs(np.asarray(grad)).sum(axis=(0, 2)) > 0
  assert seen.tolist() == [False] * 4 + [True] * 5 + [False] * 4
  with pytest.raises(ValueError, match="decoding needs causal attention"):
    mixer.init(jax.random.key(0), x, decode=True)


def test_attention_dropout_only_with_a_dropout_rng():
  x = x_input()
  plain = build_mixer("gated_attention", d_model=D, num_heads=2)
  dropped = build_mixer("gated_attention", d_model=D, num_heads=2, attention_dropout=0.5)
  params = plain.init(jax.random.key(0), x)
  reference = plain.apply(params, x)
  # eval and decoding pass no "dropout" rng: deterministic, equal to the plain mixer
  np.testing.assert_array_equal(np.asarray(dropped.apply(params, x)), np.asarray(reference))
  train = lambda key: dropped.apply(params, x, rngs={"dropout": jax.random.key(key)})
  assert np.abs(np.asarray(train(1) - reference)).max() > 1e-3
  assert np.abs(np.asarray(train(1) - train(2))).max() > 1e-3
  np.testing.assert_array_equal(np.asarray(train(1)), np.asarray(train(1)))
