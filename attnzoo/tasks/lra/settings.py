"""The experiment settings of the LRA tasks, which `configs/lra/<task>.py` build from.

"lra": LRA's apples-to-apples setting (Tay et al. 2021, the released `configs/*_base.py`):
the same backbone size for every mixer, Adam(0.9, 0.98) with decoupled weight decay, linear
warm-up. Deviations: the schedule after warm-up is cosine for every task (LRA decays ListOps and
Text by rsqrt); the peak lr is the rsqrt schedule's value at the end of warm-up (ListOps:
0.05 / sqrt(1000) = 1.58e-3); positions are learned (LRA: sinusoidal for some tasks); the head
is one linear layer after pooling (LRA: Dense-ReLU-Dense).

"s4": an S4-style setting (Gu et al. 2022, the s4 repo's `experiment/lra/s4-lra-*` configs):
deeper and narrower, mean pooling, no dropout, weight decay 0.05, cosine, much longer training.
Deviations: one lr for every parameter (S4 trains its state matrices at 1e-3 and the rest at
1e-2; 1e-2 diverges for softmax attention), layer norm (S4: batch norm), pre-norm.
"""

from __future__ import annotations

import ml_collections

from attnzoo.config import ConfigError, mixer_defaults, parse_arg, set_typed

# task -> setting -> (model, train, data) overrides of the common defaults below
SETTINGS = {
  "listops": {
    "lra": (
      dict(d_model=512, num_layers=4, num_heads=8, mlp_ratio=2.0, pooling="cls", dropout=0.1),
      dict(lr=0.05 / 1000**0.5, weight_decay=0.1, warmup_steps=1000, num_steps=5000),
      dict(batch_size=32),
    ),
    "s4": (
      dict(d_model=128, num_layers=8, num_heads=4, mlp_ratio=2.0, pooling="mean", dropout=0.0),
      dict(lr=1e-3, weight_decay=0.05, warmup_steps=2000, num_steps=80_000),
      dict(batch_size=50),
    ),
  },
  "pathfinder": {
    "lra": (
      dict(d_model=32, num_layers=4, num_heads=4, mlp_ratio=1.0, pooling="mean", dropout=0.2),
      dict(lr=1e-3, weight_decay=0.0, warmup_steps=312, num_steps=62_400),
      dict(batch_size=512),
    ),
    "s4": (
      dict(d_model=256, num_layers=6, num_heads=8, mlp_ratio=2.0, pooling="mean", dropout=0.0),
      dict(lr=1e-3, weight_decay=0.05, warmup_steps=2500, num_steps=500_000),
      dict(batch_size=64),
    ),
  },
  "text": {
    "lra": (
      dict(d_model=256, num_layers=4, num_heads=4, mlp_ratio=4.0, pooling="cls", dropout=0.1),
      dict(lr=0.05 / 8000**0.5, weight_decay=0.1, warmup_steps=8000, num_steps=20_000),
      dict(batch_size=32),
    ),
    "s4": (
      dict(d_model=256, num_layers=6, num_heads=4, mlp_ratio=2.0, pooling="mean", dropout=0.0),
      dict(lr=1e-3, weight_decay=0.05, warmup_steps=2000, num_steps=50_000),
      dict(batch_size=16),
    ),
  },
  "image": {
    "lra": (
      dict(d_model=128, num_layers=1, num_heads=8, mlp_ratio=1.0, pooling="mean", dropout=0.3),
      dict(lr=5e-4, weight_decay=0.0, warmup_steps=175, num_steps=35_000),
      dict(batch_size=256),
    ),
    "s4": (
      dict(d_model=512, num_layers=6, num_heads=8, mlp_ratio=2.0, pooling="mean", dropout=0.1),
      dict(lr=1e-3, weight_decay=0.05, warmup_steps=2000, num_steps=180_000),
      dict(batch_size=50),
    ),
  },
  "retrieval": {
    "lra": (  # as released: the 8000-step warm-up never ends within the 5000 steps
      dict(d_model=128, num_layers=4, num_heads=4, mlp_ratio=4.0, pooling="cls", dropout=0.1),
      dict(lr=0.05 / 8000**0.5, weight_decay=0.1, warmup_steps=8000, num_steps=5000),
      dict(batch_size=32),
    ),
    "s4": (
      dict(d_model=256, num_layers=6, num_heads=4, mlp_ratio=2.0, pooling="mean", dropout=0.0),
      dict(lr=1e-3, weight_decay=0.05, warmup_steps=2000, num_steps=46_000),
      dict(batch_size=64),
    ),
  },
  "pathx": {
    "lra": (
      dict(d_model=32, num_layers=1, num_heads=2, mlp_ratio=1.0, pooling="mean", dropout=0.0),
      dict(lr=1e-3, weight_decay=0.0, warmup_steps=1000, num_steps=500_000),
      dict(batch_size=64),
    ),
    "s4": (
      dict(d_model=256, num_layers=6, num_heads=8, mlp_ratio=2.0, pooling="mean", dropout=0.0),
      dict(lr=5e-4, weight_decay=0.05, warmup_steps=10_000, num_steps=500_000),
      dict(batch_size=32),
    ),
  },
}

DATA = {
  "listops": dict(
    task="lra/listops",
    data=dict(min_length=500, max_length=2000, max_depth=10, max_args=10, source=""),
    counts=(96_000, 2_000, 2_000),
  ),
  "pathfinder": dict(
    task="lra/pathfinder",
    data=dict(resolution=32, difficulty="hard"),
    counts=(160_000, 20_000, 20_000),
  ),
  "text": dict(
    task="lra/text", data=dict(source="", tfds_data_dir="", max_length=4096), counts=(0, 0, 0)
  ),
  "image": dict(task="lra/image", data=dict(source="", tfds_data_dir=""), counts=(0, 0, 0)),
  "retrieval": dict(task="lra/retrieval", data=dict(source="", max_length=4000), counts=(0, 0, 0)),
  "pathx": dict(
    task="lra/pathfinder",
    data=dict(resolution=128, difficulty="hard"),
    counts=(160_000, 20_000, 20_000),
  ),
}

MAX_POSITIONS = {
  "listops": 2000,
  "pathfinder": 1024,
  "pathx": 16384,
  "text": 4096,
  "image": 1024,
  "retrieval": 4000,
}

KNOBS = {
  "mixer": "model.mixer",
  "d_model": "model.d_model",
  "num_layers": "model.num_layers",
  "lr": "train.lr",
  "num_steps": "train.num_steps",
  "warmup_steps": "train.warmup_steps",
  "seed": "seed",
  "dtype": "train.compute_dtype",
  "batch_size": "data.batch_size",
  "data_dir": "data.dir",
  "source": "data.source",
  "num_train": "data.num_train",
  "num_val": "data.num_val",
  "num_test": "data.num_test",
}


def lra_config(task: str, arg: str | None) -> ml_collections.ConfigDict:
  """The config of one LRA task; knobs in `arg`: setting (lra | s4), the KNOBS above,
  num_heads, the task's data options by name (min_length, resolution, ...) and any option of
  the mixer by name."""
  knobs = parse_arg(arg)
  setting = knobs.pop("setting", "lra")
  if setting not in SETTINGS[task]:
    raise ConfigError(f"unknown setting {setting!r} for lra/{task}; use lra or s4")
  model, train, data = SETTINGS[task][setting]
  mixer = str(knobs.pop("mixer", "attention"))
  spec = DATA[task]
  c = ml_collections.ConfigDict()
  c.task = spec["task"]
  c.seed = 0
  num_train, num_val, num_test = spec["counts"]
  c.data = ml_collections.ConfigDict(
    dict(
      dir="",
      seed=0,
      num_train=num_train,
      num_val=num_val,
      num_test=num_test,
      shard_size=2000,
      eval_batch_size=max(data["batch_size"], 64),
      **data,
      **spec["data"],
    )
  )
  mixer_kwargs = mixer_defaults(mixer)
  if "num_heads" in mixer_kwargs:
    mixer_kwargs.num_heads = model["num_heads"]
  for key in ("dropout", "attention_dropout"):
    if "+" not in mixer and key in mixer_kwargs:
      mixer_kwargs[key] = model["dropout"]
  c.model = ml_collections.ConfigDict(
    dict(
      mixer=mixer,
      mixer_kwargs=mixer_kwargs,
      d_model=model["d_model"],
      num_layers=model["num_layers"],
      state_mixer="mlp",
      mlp_ratio=model["mlp_ratio"],
      norm="layernorm",
      position_embedding="learned",
      max_positions=MAX_POSITIONS[task],
      embedding_dropout=model["dropout"],
      residual_dropout=model["dropout"],
      pooling=model["pooling"],
    )
  )
  c.train = ml_collections.ConfigDict(
    dict(
      num_steps=train["num_steps"],
      lr=train["lr"],
      warmup_steps=train["warmup_steps"],
      min_lr_ratio=0.0,
      weight_decay=train["weight_decay"],
      decay_all_params=False,
      b1=0.9,
      b2=0.98,
      grad_clip=1.0 if task == "pathx" else 0.0,
      compute_dtype="auto",
      log_every=50,
      eval_every=500,
      checkpoint_every=500,
      early_stop_at=None,
      max_checkpoints=2,
    )
  )
  for key, value in knobs.items():
    if key in KNOBS:
      set_typed(c, KNOBS[key], value)
    elif key == "num_heads" and "num_heads" in c.model.mixer_kwargs:
      set_typed(c, "model.mixer_kwargs.num_heads", value)
    elif key in c.data:
      set_typed(c, f"data.{key}", value)
    elif "+" not in mixer and key in c.model.mixer_kwargs:
      set_typed(c, f"model.mixer_kwargs.{key}", value)
    else:
      raise ConfigError(
        f"unknown knob {key!r} in configs/lra/{task}.py argument; knobs: setting, "
        f"{', '.join(sorted(KNOBS))}, num_heads, a data option or an option of the mixer"
      )
  return c
