"""The model variants built from the one Block: the encoder classifier (bidirectional mixers,
pooling over real tokens), the regressor over vectors (causal, decodes like its forward),
dropout (active only with a "dropout" rng) and block_ids reaching only the mixers that use
them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.models import DecoderLM, EncoderClassifier, Regressor, init_cache
from tests.conftest import relative_error

B, T = 2, 9


def tokens(seed=0, vocab=30):
  return jax.random.randint(jax.random.key(seed), (B, T), 1, vocab)


def encoder(**kw):
  return EncoderClassifier(
    vocab_size=30,
    num_classes=5,
    d_model=16,
    num_layers=2,
    mixers=("attention",),
    mixer_kwargs={"num_heads": 2},
    state_mixer="mlp",
    **kw,
  )


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_sees_the_whole_sequence(pooling):
  model = encoder(pooling=pooling)
  x = tokens()
  params = model.init(jax.random.key(1), x)
  assert model.apply(params, x).shape == (B, 5)
  # With "cls" the logits read the first token only: it must see the last one.
  changed = x.at[:, -1].set(x[:, -1] % 29 + 1)
  assert not np.allclose(model.apply(params, x), model.apply(params, changed))


def test_encoder_mean_pool_ignores_padding():
  model = encoder()
  x = tokens()
  mask = jnp.arange(T)[None, :] < jnp.array([[6], [9]])
  params = model.init(jax.random.key(1), x, mask=mask)
  other = x.at[0, 6:].set(7)  # change only the padding of example 0
  a, b = model.apply(params, x, mask=mask), model.apply(params, other, mask=mask)
  np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert not np.allclose(model.apply(params, x), model.apply(params, other))


def test_encoder_refuses_a_causal_only_mixer():
  model = EncoderClassifier(
    vocab_size=30,
    num_classes=2,
    d_model=16,
    num_layers=1,
    mixers=("deltanet",),
    mixer_kwargs={"num_heads": 2},
  )
  with pytest.raises(ValueError, match="mixer 'deltanet' is causal-only"):
    model.init(jax.random.key(0), tokens())


@pytest.mark.parametrize(
  "mixers,kwargs",
  [
    (("attention",), {"num_heads": 2}),
    (
      ("gated_deltanet", "attention"),
      {"gated_deltanet": {"num_heads": 2, "implementation": "xla"}, "attention": {"num_heads": 2}},
    ),
  ],
)
def test_regressor_is_causal_and_decodes_like_its_forward(mixers, kwargs):
  model = Regressor(
    input_dim=3,
    output_dim=2,
    d_model=16,
    num_layers=2,
    mixers=mixers,
    mixer_kwargs=kwargs,
    state_mixer="swiglu",
  )
  x = jax.random.normal(jax.random.key(0), (B, T, 3))
  params = model.init(jax.random.key(1), x)["params"]
  full = model.apply({"params": params}, x)
  assert full.shape == (B, T, 2)
  grad = jax.grad(lambda x: model.apply({"params": params}, x)[:, 4].sum())(x)
  assert np.abs(np.asarray(grad[:, 5:])).max() == 0 and np.abs(np.asarray(grad[:, :5])).max() > 0
  cache = jax.jit(lambda: model.init(jax.random.key(0), x, decode=True)["cache"])()
  outs = []
  for start, stop in [(0, 3), *[(t, t + 1) for t in range(3, T)]]:
    out, variables = model.apply(
      {"params": params, "cache": cache}, x[:, start:stop], decode=True, mutable=["cache"]
    )
    outs.append(out)
    cache = variables["cache"]
  assert relative_error(jnp.concatenate(outs, 1), full) < 1e-5
  at = jnp.array([[0, 8], [3, 4]])
  np.testing.assert_allclose(
    model.apply({"params": params}, x, outputs_at=at),
    jnp.take_along_axis(full, at[..., None], 1),
    rtol=1e-5,
    atol=1e-6,
  )


def test_dropout_only_with_a_dropout_rng():
  kw = dict(
    vocab_size=30,
    d_model=16,
    num_layers=2,
    mixers=("attention",),
    mixer_kwargs={"num_heads": 2},
    state_mixer="mlp",
  )
  plain, dropped = DecoderLM(**kw), DecoderLM(**kw, embedding_dropout=0.3, residual_dropout=0.3)
  x = tokens()
  params = plain.init(jax.random.key(1), x)
  assert jax.tree.structure(params) == jax.tree.structure(dropped.init(jax.random.key(1), x))
  np.testing.assert_array_equal(plain.apply(params, x), dropped.apply(params, x))
  rngs = lambda seed: {"dropout": jax.random.key(seed)}
  np.testing.assert_array_equal(plain.apply(params, x, rngs=rngs(0)), plain.apply(params, x))
  a, b = dropped.apply(params, x, rngs=rngs(0)), dropped.apply(params, x, rngs=rngs(1))
  assert not np.allclose(a, dropped.apply(params, x)) and not np.allclose(a, b)
  np.testing.assert_array_equal(a, dropped.apply(params, x, rngs=rngs(0)))


def test_block_ids_reach_only_the_mixers_that_use_them():
  model = DecoderLM(
    vocab_size=30,
    d_model=16,
    num_layers=2,
    mixers=("block_attention", "gated_deltanet"),
    mixer_kwargs={
      "block_attention": {"num_heads": 2},
      "gated_deltanet": {"num_heads": 2, "implementation": "xla"},
    },
  )
  x = tokens()
  blocks = jnp.array([[0, 0, 0, 1, 1, 1, 2, 2, 2]] * B)
  params = model.init(jax.random.key(1), x)
  with_blocks = model.apply(params, x, block_ids=blocks)
  assert with_blocks.shape == (B, T, 30)
  assert not np.allclose(with_blocks, model.apply(params, x))
  # block_ids do not reset the recurrent mixer: segment_ids would.
  assert not np.allclose(with_blocks, model.apply(params, x, segment_ids=blocks))


def test_decoder_lm_cache_and_positions():
  model = DecoderLM(
    vocab_size=30,
    d_model=16,
    num_layers=1,
    mixers=("attention",),
    position_embedding="learned",
    max_positions=T,
  )
  x = tokens()
  params = model.init(jax.random.key(1), x)["params"]
  full = model.apply({"params": params}, x)
  cache = init_cache(model, B, T)
  out, variables = model.apply(
    {"params": params, "cache": cache}, x[:, :4], decode=True, mutable=["cache"]
  )
  out2, _ = model.apply({"params": params, **variables}, x[:, 4:], decode=True, mutable=["cache"])
  assert relative_error(jnp.concatenate([out, out2], 1), full) < 1e-5
