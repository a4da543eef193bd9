"""MQAR (Zoology): `attnzoo train --config configs/mqar.py:mixer=attention,d_model=64`.

Knobs in the argument: mixer (a name, or 'a+b' for a hybrid cycled over layers), d_model,
num_layers, num_heads (when the mixer has heads), seq_len, num_kv_pairs, lr, batch_size,
num_steps, seed, state_mixer, dtype, train_examples, and any option of the mixer itself by name
(e.g. window=32). With seq_len/num_kv_pairs the model trains on that one setting and is
tested on it; without them it trains on Zoology's mix of lengths and is tested on each and on
longer contexts.
"""

import ml_collections

from attnzoo.config import (
  COMMON_KNOBS,
  ConfigError,
  apply_knobs,
  model_section,
  needs_positions,
  parse_arg,
  train_section,
)

# (seq_len, num_kv_pairs, num_examples, batch_size)
DEFAULT_TRAIN = ((64, 4, 100_000, 64), (128, 8, 20_000, 64), (256, 16, 20_000, 64))
DEFAULT_TEST = (
  (64, 4, 1_000, 250),
  (128, 8, 1_000, 250),
  (256, 16, 1_000, 250),
  (512, 64, 1_000, 125),
)

KNOBS = {"mixer": "model.mixer", **COMMON_KNOBS}
SEGMENT_KNOBS = ("seq_len", "num_kv_pairs", "batch_size", "train_examples")


def get_config(arg=None):
  knobs = parse_arg(arg)
  mixer = str(knobs.pop("mixer", "attention"))
  c = ml_collections.ConfigDict()
  c.task = "mqar"
  c.seed = 0

  seq_len = knobs.pop("seq_len", None)
  num_kv_pairs = knobs.pop("num_kv_pairs", None)
  batch_size = knobs.pop("batch_size", 64)
  train_examples = knobs.pop("train_examples", 100_000)
  if (seq_len is None) != (num_kv_pairs is None):
    raise ConfigError("give both seq_len and num_kv_pairs, or neither")
  if seq_len is None:
    train = tuple(
      (L, K, n if L != 64 else train_examples, batch_size) for L, K, n, _ in DEFAULT_TRAIN
    )
    test = DEFAULT_TEST
  else:
    train = ((seq_len, num_kv_pairs, train_examples, batch_size),)
    test = ((seq_len, num_kv_pairs, 1_000, 250),)
  c.data = ml_collections.ConfigDict(
    dict(
      vocab_size=8192,
      power_a=0.01,
      random_non_queries=True,
      train_segments=train,
      test_segments=test,
    )
  )
  c.model = model_section(
    mixer,
    position_embedding="learned" if needs_positions(mixer) else "none",
    max_positions=max(L for L, *_ in train + test),
  )

  # Long-convolution mixers (hyena, dss, long base_conv) size their filters to the longest
  # sequence, as Zoology passes l_max = L.
  hybrid = "+" in mixer
  for kwargs in c.model.mixer_kwargs.values() if hybrid else [c.model.mixer_kwargs]:
    if "l_max" in kwargs:
      kwargs.l_max = c.model.max_positions

  c.train = train_section(
    num_steps=6_000,
    lr=3e-3,
    warmup_steps=300,
    weight_decay=0.1,
    compute_dtype="auto",
    eval_every=250,
    checkpoint_every=500,
    early_stop_at=0.99,
  )
  apply_knobs(c, knobs, KNOBS, mixer, "configs/mqar.py", listed=SEGMENT_KNOBS)
  return c
