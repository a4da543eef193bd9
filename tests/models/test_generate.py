"""Generation: the same logits as the full forward for every causal mixer, sampling options,
and one compilation per model and shape."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnzoo.mixers.registry import causal_mixers
from attnzoo.models import DecoderLM, generate
from attnzoo.models.generate import _compiled, sample_logits
from tests.conftest import relative_error
from tests.mixers.test_mixers import TEST_KWARGS

MODEL_GIVEN = ("layer_idx", "num_layers")


def every_mixer_lm():
  """One layer of every registered (causal) mixer, in one model."""
  names = tuple(causal_mixers())
  kwargs = {
    n: {k: v for k, v in TEST_KWARGS.get(n, {}).items() if k not in MODEL_GIVEN} for n in names
  }
  return DecoderLM(
    vocab_size=23,
    d_model=16,
    num_layers=len(names),
    mixers=names,
    mixer_kwargs=kwargs,
    position_embedding="learned",
    max_positions=16,
  )


def test_generated_logits_equal_the_full_forward_for_every_mixer():
  """A model with one layer of each mixer: prefill 5 tokens, decode 4, through each mixer's
  cache; the logits of every step equal the full forward's at the same positions."""
  model = every_mixer_lm()
  prompt = jax.random.randint(jax.random.key(0), (2, 5), 0, 23)
  params = jax.jit(model.init)(jax.random.key(1), prompt)["params"]
  out, logits = generate(model, params, prompt, 4, return_logits=True)
  full = jax.jit(model.apply)({"params": params}, out[:, :-1])
  assert relative_error(logits, full[:, 4:]) < 1e-4
  assert (out[:, 5:] == jnp.argmax(full[:, 4:], -1)).all()


def test_sampling_options():
  rng = jax.random.key(0)
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  draw = lambda **kw: np.asarray(sample_logits(logits, rng, **{"temperature": 1.0, **kw}))
  assert set(draw(top_k=2)) == {0, 1}
  assert set(draw(top_p=0.7)) == {0, 1}  # 0.5 < 0.7, 0.5 + 0.3 reaches it
  assert set(draw(top_p=0.1)) == {0}
  counts = np.bincount(draw(), minlength=4) / 4000
  np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05], atol=0.03)
  assert (draw(greedy=True) == 0).all()


def test_compiles_once_per_model_and_shape():
  model = DecoderLM(
    vocab_size=11,
    d_model=8,
    num_layers=1,
    mixers=("gla",),
    mixer_kwargs=dict(num_heads=2, implementation="xla"),
  )
  prompt = jnp.ones((3, 4), jnp.int32)
  params = model.init(jax.random.key(0), prompt)["params"]
  a = generate(model, params, prompt, 5, rng=jax.random.key(1), temperature=0.8, top_k=5)
  b = generate(
    model, params, prompt + 1, 5, rng=jax.random.key(2), temperature=0.5, top_p=0.9, top_k=5
  )
  assert _compiled(model)._cache_size() == 1
  assert a.shape == b.shape == (3, 9)
  same = generate(model, params, prompt, 5, rng=jax.random.key(1), temperature=0.8, top_k=5)
  np.testing.assert_array_equal(a, same)  # the seed decides


@pytest.mark.parametrize(
  "kwargs,message",
  [
    (dict(num_tokens=0), "max_new_tokens must be >= 1"),
    (dict(num_tokens=20), "longer than the 16 positions"),
    (dict(num_tokens=2, top_p=0.0), "0 < top_p <= 1"),
  ],
)
def test_bad_generation_arguments(kwargs, message):
  model = DecoderLM(
    vocab_size=5,
    d_model=8,
    num_layers=1,
    mixers=("attention",),
    position_embedding="learned",
    max_positions=16,
  )
  with pytest.raises(ValueError, match=message):
    generate(model, None, jnp.zeros((1, 3), jnp.int32), **kwargs)
