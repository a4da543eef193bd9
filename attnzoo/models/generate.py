"""Autoregressive generation through the decoding cache: one prefill call for the prompt, then a
`lax.scan` of one-token steps (O(1) per token for recurrent mixers), all in one jitted function.

The function is compiled once per (model, batch, prompt length, max_new_tokens, top_k, greedy or
not); params, prompt, rng, temperature and top_p are traced arguments, so calling again with
new values does not recompile.
"""

from __future__ import annotations

import functools
import weakref

import jax
import jax.numpy as jnp

from attnzoo.models.lm import DecoderLM

_COMPILED: dict[int, object] = {}  # id(model) -> its jitted generate (dropped with the model)


def sample_logits(
  logits: jax.Array, rng, *, temperature, top_k: int = 0, top_p=1.0, greedy: bool = False
) -> jax.Array:
  """One token per row of logits [B, V]: argmax when greedy, else a draw from
  softmax(logits / temperature) restricted to the top_k largest (0: all) and to the smallest
  set whose probability reaches top_p (nucleus sampling, Holtzman et al. 2020)."""
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1)
  logits = logits / temperature
  if top_k:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  order = jnp.argsort(-logits, axis=-1)
  sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)  # the first always stays
  choice = jax.random.categorical(rng, sorted_logits, axis=-1)
  return jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]


def _compiled(model: DecoderLM):
  key = id(model)
  if key not in _COMPILED:

    @functools.partial(jax.jit, static_argnames=("num_tokens", "top_k", "greedy"))
    def run(params, prompt, rng, temperature, top_p, *, num_tokens, top_k, greedy):
      batch, prompt_len = prompt.shape
      tokens = jnp.zeros((batch, prompt_len + num_tokens), jnp.int32)
      cache = model.init(jax.random.key(0), tokens, decode=True)["cache"]
      sample = functools.partial(
        sample_logits, temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy
      )

      def advance(cache, tokens):
        logits, variables = model.apply(
          {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
        )
        return variables["cache"], logits[:, -1].astype(jnp.float32)

      cache, logits = advance(cache, prompt)
      first = sample(logits, jax.random.fold_in(rng, 0))

      def step(carry, i):
        cache, token = carry
        cache, logits = advance(cache, token[:, None])
        return (cache, sample(logits, jax.random.fold_in(rng, i))), (token, logits)

      (_, last), (new, step_logits) = jax.lax.scan(step, (cache, first), jnp.arange(1, num_tokens))
      new = jnp.concatenate([new, last[None]], 0).T.astype(prompt.dtype)
      all_logits = jnp.concatenate([logits[None], step_logits], 0).transpose(1, 0, 2)
      return jnp.concatenate([prompt, new], axis=1), all_logits

    _COMPILED[key] = run
    weakref.finalize(model, _COMPILED.pop, key, None)
  return _COMPILED[key]


def generate(
  model: DecoderLM,
  params,
  prompt,
  num_tokens: int,
  *,
  rng=None,
  temperature: float = 0.0,
  top_k: int = 0,
  top_p: float = 1.0,
  return_logits: bool = False,
):
  """Continues prompt [B, P] by num_tokens tokens; temperature 0 is greedy. Returns [B, P+N]
  (and, with return_logits, the logits [B, N, V] each new token was drawn from)."""
  if num_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {num_tokens}")
  if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
    raise ValueError(
      f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0; got {temperature}, {top_p}, {top_k}"
    )
  prompt = jnp.asarray(prompt, jnp.int32)
  if prompt.ndim != 2 or prompt.shape[1] < 1:
    raise ValueError(f"the prompt must be [batch, length >= 1] tokens, got shape {prompt.shape}")
  if model.position_embedding == "learned" and prompt.shape[1] + num_tokens > model.max_positions:
    raise ValueError(
      f"prompt ({prompt.shape[1]}) + max_new_tokens ({num_tokens}) is longer than the "
      f"{model.max_positions} positions the model learns (max_positions)"
    )
  rng = jax.random.key(0) if rng is None else rng
  tokens, logits = _compiled(model)(
    params,
    prompt,
    rng,
    jnp.float32(max(temperature, 1e-6)),
    jnp.float32(top_p),
    num_tokens=num_tokens,
    top_k=min(top_k, model.vocab_size),
    greedy=temperature == 0,
  )
  return (tokens, logits) if return_logits else tokens
