"""Autoregressive generation through the decoding cache: one prefill call for the prompt,
then one jitted call per new token (O(1) per token for recurrent mixers)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from attnzoo.models.lm import DecoderLM, init_cache


def generate(
  model: DecoderLM, params, prompt, num_tokens: int, *, rng=None, temperature: float = 0.0
):
  """Continues prompt [B, P] by num_tokens tokens; temperature 0 is greedy. Returns [B, P+N]."""
  batch, prompt_len = prompt.shape
  cache = init_cache(model, batch, prompt_len + num_tokens)
  rng = jax.random.key(0) if rng is None else rng

  @functools.partial(jax.jit, donate_argnums=1)
  def advance(tokens, cache, rng):
    logits, variables = model.apply(
      {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
    )
    last = logits[:, -1].astype(jnp.float32)
    if temperature > 0:
      token = jax.random.categorical(rng, last / temperature)
    else:
      token = jnp.argmax(last, axis=-1)
    return token[:, None].astype(prompt.dtype), variables["cache"]

  out = [prompt]
  token, cache = advance(prompt, cache, rng)
  for i in range(num_tokens):
    out.append(token)
    if i + 1 < num_tokens:
      token, cache = advance(token, cache, jax.random.fold_in(rng, i + 1))
  return jnp.concatenate(out, axis=1)
