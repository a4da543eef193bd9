"""Character-level LM on tiny Shakespeare at nanoGPT's shakespeare-char recipe:
`attnzoo train --config configs/lm.py:mixer=gated_deltanet --workdir W`.

The recipe (nanoGPT config/train_shakespeare_char.py): 6 layers, width 384, 6 heads where the
mixer has heads, context 256, batch 64, dropout 0.2 (embedding, residual and attention
probabilities), GELU MLP 4x, AdamW (b2 0.99, weight decay 0.1 on matrices and embeddings,
clip 1.0), lr 1e-3 with 100 warm-up steps and cosine to 1e-4, 5,000 steps; bf16 on GPU.
Softmax attention gets learned absolute positions as in nanoGPT (other families none).

Knobs in the argument: mixer (a name, or 'a+b' cycled over layers), d_model, num_layers,
num_heads (default 6 when d_model is a multiple of 6), seq_len, batch_size, lr, num_steps, seed,
dropout, state_mixer, dtype, source ('shakespeare', a text file, a directory, or a .npy/.bin
token file), tokenizer (char|byte), and any option of a single mixer by name. A CPU-sized run:
`configs/lm.py:mixer=attention,d_model=64,num_layers=2,seq_len=64,batch_size=16,num_steps=200`.
"""

import dataclasses

import ml_collections

from attnzoo.config import ConfigError, mixer_defaults, needs_positions, parse_arg, set_typed
from attnzoo.mixers import MIXERS

KNOBS = {
  "d_model": "model.d_model",
  "num_layers": "model.num_layers",
  "state_mixer": "model.state_mixer",
  "seq_len": "data.seq_len",
  "batch_size": "data.batch_size",
  "source": "data.source",
  "tokenizer": "data.tokenizer",
  "lr": "train.lr",
  "num_steps": "train.num_steps",
  "seed": "seed",
  "dtype": "train.compute_dtype",
}


def _has_field(name: str, field: str) -> bool:
  return field in {f.name for f in dataclasses.fields(MIXERS[name])}


def _set_per_mixer(c, mixer: str, field: str, value):
  """Sets a mixer option on every mixer of the (possibly hybrid) spec that has it."""
  names = [n.strip() for n in mixer.split("+")]
  for name in dict.fromkeys(names):
    if _has_field(name, field):
      path = (
        f"model.mixer_kwargs.{name}.{field}" if len(names) > 1 else f"model.mixer_kwargs.{field}"
      )
      set_typed(c, path, value)


def get_config(arg=None):
  knobs = parse_arg(arg)
  mixer = str(knobs.pop("mixer", "attention"))
  num_heads = knobs.pop("num_heads", None)
  dropout = float(knobs.pop("dropout", 0.2))
  c = ml_collections.ConfigDict()
  c.task = "lm"
  c.seed = 0
  c.data = ml_collections.ConfigDict(
    dict(
      source="shakespeare",
      tokenizer="char",
      token_dtype="uint16",
      tfds_data_dir="",  # for source="tfds:<name>": where it was prepared ("": TFDS default)
      max_documents=0,  # TFDS sources: the first examples of each split (0: all)
      vocab_size=0,  # 0: from the data (text) or the largest token + 1 (token files)
      seq_len=256,
      batch_size=64,
      val_fraction=0.1,
      eval_windows=0,  # 0: every non-overlapping window of the validation split
      eval_batch_size=64,
    )
  )
  c.model = ml_collections.ConfigDict(
    dict(
      mixer=mixer,
      mixer_kwargs=mixer_defaults(mixer),
      d_model=384,
      num_layers=6,
      state_mixer="mlp",
      mlp_ratio=4.0,
      norm="layernorm",
      position_embedding="learned" if needs_positions(mixer) else "none",
      max_positions=256,
      embedding_dropout=dropout,
      residual_dropout=dropout,
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      num_steps=5_000,
      lr=1e-3,
      warmup_steps=100,
      min_lr_ratio=0.1,
      weight_decay=0.1,
      decay_all_params=False,
      b1=0.9,
      b2=0.99,
      grad_clip=1.0,
      compute_dtype="auto",
      log_every=50,
      eval_every=250,
      checkpoint_every=500,
      early_stop_at=None,
      max_checkpoints=2,
    )
  )
  _set_per_mixer(c, mixer, "attention_dropout", dropout)
  for key, value in knobs.items():
    if key in KNOBS:
      set_typed(c, KNOBS[key], value)
    elif "+" not in mixer and key in c.model.mixer_kwargs:
      set_typed(c, f"model.mixer_kwargs.{key}", value)
    else:
      names = sorted([*KNOBS, "mixer", "num_heads", "dropout"])
      raise ConfigError(
        f"unknown knob {key!r} in configs/lm.py argument; knobs: {', '.join(names)} "
        "or an option of the mixer"
      )
  if num_heads is None and c.model.d_model % 6 == 0:
    num_heads = 6  # the recipe's; other widths keep each mixer's default unless given
  if num_heads is not None:
    _set_per_mixer(c, mixer, "num_heads", num_heads)
  c.model.max_positions = c.data.seq_len
  return c
