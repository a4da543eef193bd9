"""Induction heads on repeated random tokens (Olsson et al. 2022, seed #96).

A sequence is BOS (token 0) followed by a pattern of uniform random tokens from [1, vocab)
repeated to fill span · repeats tokens; the causal LM predicts every next token. The first
repeat cannot be predicted (loss ≈ log(vocab − 1)); later repeats can, by an induction head:
attend to the token after the previous occurrence of the current token and copy it. Training
patterns are `min_span` (default a third of `span`) to `span` tokens long, drawn per sequence:
with one fixed length a single layer copies from a fixed offset by position alone (measured: a
1-layer transformer then solves the repeats), which is not induction. Evaluation uses Olsson's
probe, a fixed `span` (25 tokens × 4 by default). Metrics per example: `loss` (all positions),
`loss_first` (targets in the first repeat), `loss_repeat` (targets in later repeats) and
`accuracy_repeat`.

Head scores from attention maps [B, H, T, T] (softmax maps, or the hidden attention of
recurrent mixers, `attention_maps`; each row is taken as |a| / Σ|a|, so the scores of the two
compare):
  prefix_matching_score  mean attention from each token of repeat ≥ 2 to the positions right
                         after its earlier occurrences (Olsson's recipe: 25 tokens × 4).
  previous_token_score   mean attention from i to i − 1.
The copying score (the OV circuit's direct-path logits) is not implemented.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnzoo.tasks.base import Batch, Task, register_task


def generate(
  rng: np.random.Generator, n: int, vocab_size: int, span: int, repeats: int, min_span: int = 0
):
  """(tokens [n, 1 + span·repeats] int32, spans [n] int32): BOS then a random pattern repeated;
  each row's pattern length is drawn from [min_span, span] (min_span 0: always span)."""
  pattern = rng.integers(1, vocab_size, (n, span))
  spans = np.full(n, span) if not min_span else rng.integers(min_span, span + 1, n)
  body = np.take_along_axis(pattern, np.arange(span * repeats)[None] % spans[:, None], 1)
  bos = np.zeros((n, 1), np.int64)
  return np.concatenate([bos, body], 1).astype(np.int32), spans.astype(np.int32)


def earlier_successors(span: int, length: int) -> np.ndarray:
  """[T, T] 0/1 over the first T = length positions (BOS at 0): for a query t in repeat ≥ 2,
  the positions s = t − j·span + 1 (j ≥ 1, s ≥ 2) right after t's earlier occurrences."""
  t = np.arange(length)[:, None]
  s = np.arange(length)[None, :]
  successor = ((t - s + 1) % span == 0) & (s >= 2) & (s <= t + 1 - span)
  return (successor & (t >= 1 + span)).astype(np.float32)


def _rows(attn: jax.Array) -> jax.Array:
  """|attention| with each row summing to 1: softmax maps unchanged; the hidden attention of a
  recurrent mixer (neither positive nor normalised) made comparable."""
  attn = jnp.abs(attn)
  return attn / jnp.maximum(attn.sum(-1, keepdims=True), 1e-30)


def prefix_matching_score(attn: jax.Array, span: int) -> jax.Array:
  """[B, H, T, T] -> [H]: attention mass on earlier successors, averaged over repeat ≥ 2."""
  attn = _rows(attn)
  mask = jnp.asarray(earlier_successors(span, attn.shape[-1]))
  rows = mask.sum(-1) > 0
  mass = jnp.einsum("bhts,ts->bht", attn, mask)
  return (mass * rows).sum(-1).mean(0) / rows.sum()


def previous_token_score(attn: jax.Array) -> jax.Array:
  """[B, H, T, T] -> [H]: mean attention from position i to i − 1 (i ≥ 1)."""
  return jnp.diagonal(_rows(attn), offset=-1, axis1=2, axis2=3).mean((0, 2))


def attention_maps(model, params, tokens) -> list[jax.Array]:
  """Per layer of a DecoderLM, the mixer's attention [B, H, T, T] on that layer's input."""
  _, state = model.apply(
    {"params": params}, tokens, capture_intermediates=True, mutable=["intermediates"]
  )
  inter = state["intermediates"]
  out = []
  for i, mixer in enumerate(model.mixer_modules()):
    norm = {"layernorm": "LayerNorm_0", "rmsnorm": "RMSNorm_0"}[model.norm]
    x = inter[f"blocks_{i}"][norm]["__call__"][0]  # the block's first norm: the mixer's input
    mixer_params = {"params": params[f"blocks_{i}"]["mixer"]}
    out.append(mixer.apply(mixer_params, x, method="attention_matrix"))
  return out


@register_task("induction")
class InductionHeads(Task):
  """Repeated random tokens for a causal LM; fresh sequences every step from (seed, step)."""

  model_kind = "causal_lm"
  metric_names = ("loss", "loss_first", "loss_repeat", "accuracy_repeat")
  early_stop_metric = "eval/accuracy_repeat"

  def __init__(
    self,
    *,
    vocab_size: int,
    span: int,
    repeats: int,
    batch_size: int,
    seed: int,
    eval_examples: int = 256,
    min_span: int | None = None,
  ):
    for name, value, low in (
      ("vocab_size", vocab_size, 3),
      ("span", span, 2),
      ("repeats", repeats, 2),
      ("batch_size", batch_size, 1),
      ("eval_examples", eval_examples, 1),
    ):
      if not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if min_span is None:  # default: a third of the span (25 -> 8)
      min_span = max(2, span // 3)
    if not isinstance(min_span, int) or min_span and not 2 <= min_span <= span:
      raise ValueError(f"min_span must be 0 (fixed span) or in [2, span={span}], got {min_span!r}")
    self.vocab_size, self.span, self.repeats, self.min_span = vocab_size, span, repeats, min_span
    self.batch_size, self.seed, self.eval_examples = batch_size, seed, eval_examples

  @classmethod
  def from_config(cls, config) -> InductionHeads:
    d = config.data
    return cls(
      vocab_size=d.vocab_size,
      span=d.span,
      repeats=d.repeats,
      batch_size=d.batch_size,
      seed=config.seed,
      eval_examples=d.eval_examples,
      min_span=d.get("min_span"),
    )

  @property
  def max_seq_len(self) -> int:
    return self.span * self.repeats  # inputs drop the last token

  def _batch(self, tokens: np.ndarray, spans: np.ndarray) -> Batch:
    return {"inputs": tokens[:, :-1], "labels": tokens[:, 1:], "span": spans}

  def train_batch(self, step: int) -> Batch:
    rng = np.random.default_rng([self.seed, 0, step])
    args = (self.batch_size, self.vocab_size, self.span, self.repeats, self.min_span)
    return self._batch(*generate(rng, *args))

  def eval_sets(self) -> dict[str, list[Batch]]:
    rng = np.random.default_rng([self.seed, 1])
    tokens, spans = generate(rng, self.eval_examples, self.vocab_size, self.span, self.repeats)
    size = self.batch_size
    name = f"span{self.span}_x{self.repeats}"
    rows = range(0, len(tokens), size)
    return {name: [self._batch(tokens[i : i + size], spans[i : i + size]) for i in rows]}

  def model_kwargs(self) -> dict:
    return {"vocab_size": self.vocab_size}

  def model_inputs(self, batch: Batch) -> dict:
    return {"tokens": batch["inputs"]}

  @staticmethod
  def _repeat_mask(shape, spans):
    """1 where the target (label at input position i, token i + 1) is in repeat ≥ 2 of its
    row's pattern (spans [B])."""
    return jnp.arange(shape[1])[None] + 1 >= 1 + spans[:, None]

  def loss(self, outputs: jax.Array, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["labels"])
    repeat = self._repeat_mask(ce.shape, batch["span"])
    return ce.mean(), {"loss_repeat": jnp.sum(ce * repeat) / jnp.sum(repeat)}

  def example_metrics(self, outputs: jax.Array, batch: Batch) -> dict[str, jax.Array]:
    ce = optax.softmax_cross_entropy_with_integer_labels(outputs, batch["labels"])
    repeat = self._repeat_mask(ce.shape, batch["span"])
    first = ~repeat
    right = jnp.argmax(outputs, -1) == batch["labels"]
    return {
      "loss": ce.mean(-1),
      "loss_first": jnp.sum(ce * first, -1) / jnp.sum(first, -1),
      "loss_repeat": jnp.sum(ce * repeat, -1) / jnp.sum(repeat, -1),
      "accuracy_repeat": jnp.sum(right * repeat, -1) / jnp.sum(repeat, -1),
    }
