"""MQAR (Zoology): `attnzoo train --config configs/mqar.py:mixer=attention,d_model=64`.

Knobs in the argument: mixer (a name, or 'a+b' for a hybrid cycled over layers), d_model,
num_layers, num_heads (when the mixer has heads), seq_len, num_kv_pairs, lr, batch_size,
num_steps, seed, state_mixer, dtype, train_examples, and any option of the mixer itself by name
(e.g. window=32). With seq_len/num_kv_pairs the model trains on that one setting and is
tested on it; without them it trains on Zoology's mix of lengths and is tested on each and on
longer contexts.

`preset=zoology` is the protocol of Zoology's Figure 2 (Arora et al. 2023, "Zoology: Measuring
and Improving Recall in Efficient Language Models"; HazyResearch/zoology
`experiments/paper_configs/iclr24_zoology_figure2/configs.py`, `train.py`, `model.py`):
`configs/mqar.py:preset=zoology,mixer=h3,seq_len=256,d_model=128,lr=1e-3`. One (L, K) per run
(K from Figure 2's pairs (64, 4), (128, 8), (256, 16), (512, 64) unless num_kv_pairs is given),
filler token 0, 100,000 train / 3,000 test examples in fixed order, batch 512 (L <= 128), 256
(L = 256), 128 (L = 512), 64 (longer); AdamW(0.9, 0.999, eps 1e-8) with weight decay 0.1 on
every parameter, no clipping, no warm-up, cosine stepped once per epoch to 0 over `epochs`
(64), evaluated every epoch, stopping once accuracy > 0.99; float32; embedding dropout 0.1;
attention with 1 head, attention dropout 0.1 and learned positions (max L); each layer adds
its normed output back (state_mixer=identity_norm, Zoology's Identity state mixer). Mixers as
Figure 2 builds them: base_conv has kernel sizes [3, -1] (short, then long), h3 d_state = L and
head_dim 2, based feature_dim 8 with 1 head (Figure 2's "based" is `base_conv+based`), mamba
in Zoology's MambaBlock (RMSNorm, no dropout, no state mixer). Extra knobs: epochs,
test_examples. Deviations: the last partial batch of an epoch is dropped (195 steps of 512,
not 196); mamba's final norm is RMSNorm like its blocks (Zoology: LayerNorm); the lr when not
given is Zoology's TrainConfig default 1e-3.

`preset=based` is the same training protocol on the Based paper's Figure 2 data (Arora et al.
2024, "Simple linear attention language models balance the recall-throughput tradeoff";
`arxiv24_based_figure2/configs.py`): train on (64, 4) x train_examples (100k) and (128, 8),
(256, 16), (256, 32), (256, 64) x train_examples / 5, batch 256; test 1,000 (test_examples) of
each of (64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256) at batch 32;
random filler tokens; 32 epochs; mixers at Zoology's defaults except H3 (d_state = d_model / 4,
head_dim 2). Models there are [base_conv, X] hybrids for attention-like X: give
mixer=base_conv+X.
"""

import ml_collections
import numpy as np

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
SEGMENT_KNOBS = ("seq_len", "num_kv_pairs", "batch_size", "train_examples", "test_examples")

# Zoology Figure 2: seq_len -> num_kv_pairs
ZOOLOGY_KV = {64: 4, 128: 8, 256: 16, 512: 64}
# Based Figure 2 (HazyResearch/zoology arxiv24_based_figure2/configs.py): (L, K, share of
# train_examples) trained with batch 256; every test segment has test_examples at batch 32.
BASED_TRAIN = ((64, 4, 1.0), (128, 8, 0.2), (256, 16, 0.2), (256, 32, 0.2), (256, 64, 0.2))
BASED_TEST = ((64, 4), (64, 8), (64, 16), (128, 32), (256, 64), (512, 128), (1024, 256))


def zoology_batch_size(seq_len: int) -> int:
  """Figure 2's batch size by sequence length (train and test)."""
  return 512 if seq_len <= 128 else 256 if seq_len <= 256 else 128 if seq_len <= 512 else 64


def _set_mixer_option(c, mixer: str, name: str, option: str, value):
  """Sets option of mixer `name` in the (possibly hybrid) spec, if the spec has it."""
  names = mixer.split("+")
  if name in names:
    kwargs = c.model.mixer_kwargs[name] if len(names) > 1 else c.model.mixer_kwargs
    with kwargs.ignore_type():
      kwargs[option] = value


def zoology_preset(c, mixer: str, epochs: int, figure2: bool = True) -> None:
  """Zoology's training protocol (see the module docstring); figure2: Figure 2's data and
  mixer options (else the Based paper's Figure 2: random filler, Zoology's default mixers)."""
  L = c.data.train_segments[0][0]
  steps_per_epoch = sum(n // b for _, _, n, b in c.data.train_segments)
  c.data.random_non_queries = not figure2
  c.data.shuffle = False
  mamba = mixer == "mamba"
  c.model.state_mixer = "identity" if mamba else "identity_norm"
  c.model.norm = "rmsnorm" if mamba else "layernorm"
  c.model.embedding_dropout = 0.0 if mamba else 0.1
  _set_mixer_option(c, mixer, "attention", "num_heads", 1)
  _set_mixer_option(c, mixer, "attention", "attention_dropout", 0.1)
  if mixer == "base_conv" and figure2:
    _set_mixer_option(c, mixer, "base_conv", "layer_kernel_sizes", (3, -1))
  if figure2:
    _set_mixer_option(c, mixer, "h3", "d_state", L)
  _set_mixer_option(c, mixer, "h3", "head_dim", 2)
  _set_mixer_option(c, mixer, "based", "feature_dim", 8)
  _set_mixer_option(c, mixer, "based", "num_heads", 1)
  c.train.update(
    num_steps=epochs * steps_per_epoch,
    lr=1e-3,
    warmup_steps=0,
    lr_step_every=steps_per_epoch,
    min_lr_ratio=0.0,
    weight_decay=0.1,
    decay_all_params=True,
    b1=0.9,
    b2=0.999,
    grad_clip=0.0,
    compute_dtype="float32",
    log_every=steps_per_epoch,
    eval_every=steps_per_epoch,
    checkpoint_every=8 * steps_per_epoch,
    early_stop_at=float(np.nextafter(0.99, 1.0)),  # Zoology stops when accuracy > 0.99
  )


def get_config(arg=None):
  knobs = parse_arg(arg)
  mixer = str(knobs.pop("mixer", "attention"))
  c = ml_collections.ConfigDict()
  c.task = "mqar"
  c.seed = 0

  preset = knobs.pop("preset", None)
  if preset not in (None, "zoology", "based"):
    raise ConfigError(f"unknown preset {preset!r} in configs/mqar.py; use zoology or based")
  seq_len = knobs.pop("seq_len", None)
  num_kv_pairs = knobs.pop("num_kv_pairs", None)
  if preset == "zoology":
    if seq_len is None:
      raise ConfigError("preset=zoology trains one length per run: give seq_len (64, 128, ...)")
    if num_kv_pairs is None and seq_len not in ZOOLOGY_KV:
      raise ConfigError(f"preset=zoology has no num_kv_pairs for seq_len={seq_len}; give it")
    num_kv_pairs = num_kv_pairs or ZOOLOGY_KV[seq_len]
  zoology = preset == "zoology"
  default_batch = zoology_batch_size(seq_len) if zoology else 256 if preset == "based" else 64
  batch_size = knobs.pop("batch_size", default_batch)
  train_examples = knobs.pop("train_examples", 100_000)
  test_examples = knobs.pop("test_examples", 3_000 if zoology else 1_000)
  epochs = knobs.pop("epochs", 64) if zoology else None
  if (seq_len is None) != (num_kv_pairs is None):
    raise ConfigError("give both seq_len and num_kv_pairs, or neither")
  if preset == "based":
    if seq_len is not None:
      raise ConfigError("preset=based trains on its mix of lengths; leave out seq_len")
    epochs = knobs.pop("epochs", 32)
    train = tuple((L, K, int(share * train_examples), batch_size) for L, K, share in BASED_TRAIN)
    test = tuple((L, K, test_examples, min(32, test_examples)) for L, K in BASED_TEST)
  elif seq_len is None:
    train = tuple(
      (L, K, n if L != 64 else train_examples, batch_size) for L, K, n, _ in DEFAULT_TRAIN
    )
    test = DEFAULT_TEST
  else:
    train = ((seq_len, num_kv_pairs, train_examples, batch_size),)
    test_batch = min(batch_size, test_examples) if zoology else 250
    test = ((seq_len, num_kv_pairs, test_examples, test_batch),)
  c.data = ml_collections.ConfigDict(
    dict(
      vocab_size=8192,
      power_a=0.01,
      random_non_queries=True,
      shuffle=True,
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
  if preset is not None:
    zoology_preset(c, mixer, epochs, figure2=zoology)
  given = dict(knobs)  # before apply_knobs
  apply_knobs(c, knobs, KNOBS, mixer, "configs/mqar.py", listed=(*SEGMENT_KNOBS, "preset"))
  if preset == "based" and "d_state" not in given:  # Based Fig. 2: H3 with d_state = d / 4
    _set_mixer_option(c, mixer, "h3", "d_state", c.model.d_model // 4)
  return c
