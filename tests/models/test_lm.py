import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.models import DecoderLM, init_cache
from attnzoo.models.backbone import layer_mixers
from tests.conftest import relative_error


def hybrid_lm(**kw):
  return DecoderLM(
    vocab_size=40,
    d_model=16,
    num_layers=3,
    mixers=("attention", "sliding_window"),
    mixer_kwargs={"attention": dict(num_heads=2), "sliding_window": dict(window=3)},
    state_mixer="swiglu",
    position_embedding="learned",
    max_positions=32,
    **kw,
  )


def test_hybrid_cycles_mixers_and_decodes_like_forward():
  model = hybrid_lm()
  tokens = jax.random.randint(jax.random.key(0), (2, 12), 0, 40)
  params = model.init(jax.random.key(1), tokens)["params"]
  assert [n for n, _ in layer_mixers(model.mixers, model.mixer_kwargs, 3)] == [
    "attention",
    "sliding_window",
    "attention",
  ]
  full = model.apply({"params": params}, tokens)
  cache = init_cache(model, 2, 12)
  out, variables = model.apply(
    {"params": params, "cache": cache}, tokens[:, :5], decode=True, mutable=["cache"]
  )
  outs, cache = [out], variables["cache"]
  for t in range(5, 12):
    out, variables = model.apply(
      {"params": params, "cache": cache}, tokens[:, t : t + 1], decode=True, mutable=["cache"]
    )
    outs.append(out)
    cache = variables["cache"]
  assert relative_error(jnp.concatenate(outs, 1), full) < 1e-5
  at = jnp.array([[1, 7], [0, 11]])
  np.testing.assert_allclose(
    model.apply({"params": params}, tokens, logits_at=at),
    jnp.take_along_axis(full, at[..., None], 1),
    rtol=1e-5,
    atol=1e-6,
  )


def test_zoology_initialisation():
  model = DecoderLM(
    vocab_size=1000, d_model=64, num_layers=4, mixers=("attention",), state_mixer="mlp"
  )
  params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  std = lambda a: float(np.asarray(a).std())
  assert abs(std(params["embed"]["embedding"]) - 0.02) < 0.002
  assert abs(std(params["blocks_0"]["mixer"]["q"]["kernel"]) - 0.02) < 0.003
  out_std = 0.02 / np.sqrt(8)
  assert abs(std(params["blocks_0"]["mixer"]["out"]["kernel"]) - out_std) < 0.002
  assert abs(std(params["blocks_0"]["StateMixer_0"]["Dense_1"]["kernel"]) - out_std) < 0.001
  assert np.all(np.asarray(params["blocks_0"]["mixer"]["q"]["bias"]) == 0)


def test_state_size_sums_layers():
  model = hybrid_lm()
  assert model.state_size(100) == 2 * (2 * 100 * 16 * 4) + 2 * 3 * 16 * 4


def test_hybrid_kwargs_must_be_keyed_by_mixer():
  with pytest.raises(ValueError, match="keyed by mixer name"):
    layer_mixers(("attention", "sliding_window"), {"num_heads": 2}, 2)
