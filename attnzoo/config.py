"""Config helpers: `get_config(arg)` argument parsing and strict, typed overrides.

Configs are ml_collections ConfigDicts. A config file's `arg` is a comma-separated `key=value`
list of that file's common knobs (`configs/mqar.py:mixer=based,d_model=128`); every field can
also be overridden with `--config.a.b=value`. Unknown keys and values of the wrong type are
errors that name the key.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import pathlib

import ml_collections

from attnzoo.mixers import MIXERS


class ConfigError(ValueError):
  """A user mistake in a config or its overrides."""


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text  # a bare word is a string


def parse_arg(arg: str | None) -> dict:
  """'a=1,b=x' -> {'a': 1, 'b': 'x'}. Values are Python literals or bare strings."""
  out = {}
  for item in filter(None, (arg or "").split(",")):
    if "=" not in item:
      raise ConfigError(f"config argument {item!r} is not of the form key=value")
    key, value = item.split("=", 1)
    out[key.strip()] = parse_value(value.strip())
  return out


def set_typed(config: ml_collections.ConfigDict, path: str, value):
  """config[path] = value, where path is 'a.b.c'; unknown keys and wrong types are errors."""
  *parents, leaf = path.split(".")
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise ConfigError(f"unknown config key {'.'.join(parents[: i + 1])!r}")
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
    raise ConfigError(f"unknown config key {path!r}")
  current = node[leaf]
  if current is not None and value is not None:
    if isinstance(current, bool) != isinstance(value, bool):
      raise ConfigError(f"config key {path!r} wants {type(current).__name__}, got {value!r}")
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
      value = type(current)(value)
    if not isinstance(value, type(current)):
      raise ConfigError(f"config key {path!r} wants {type(current).__name__}, got {value!r}")
  with node.ignore_type():
    node[leaf] = value


def mixer_defaults(mixers: str) -> ml_collections.ConfigDict:
  """The options of each mixer with their defaults, so overrides are checked by name.

  One mixer: its options directly. A hybrid ("a+b"): one sub-dict per mixer name.
  """
  names = [n.strip() for n in mixers.split("+")]
  shared = {"parent", "name", "d_model", "layer_idx", "num_layers", "dtype", "causal"}
  per_mixer = {}
  for name in names:
    if name not in MIXERS:
      raise ConfigError(f"unknown mixer {name!r}; registered: {', '.join(sorted(MIXERS))}")
    per_mixer[name] = {
      f.name: f.default
      for f in dataclasses.fields(MIXERS[name])
      if f.name not in shared and f.default is not dataclasses.MISSING
    }
  if len(names) == 1:
    return ml_collections.ConfigDict(per_mixer[names[0]])
  return ml_collections.ConfigDict(per_mixer)


# Logical axis -> mesh axes (MaxText's names); see attnzoo.train.sharding.
DEFAULT_RULES = (
  ("batch", ("data", "fsdp")),
  ("length", "context"),
  ("embed", "fsdp"),
  ("heads", "tensor"),
  ("mlp", "tensor"),
  ("vocab", "tensor"),
)


def mesh_section(**changes) -> ml_collections.ConfigDict:
  """A `mesh` config section: axis sizes (-1: the devices left over), logical-axis rules,
  context-parallel strategies (attention "ring" | "allgather_kv", zigzag, state "allgather" |
  "logscan"), and `distributed` (start jax.distributed on every host)."""
  c = dict(
    data=-1,
    fsdp=1,
    context=1,
    tensor=1,
    rules=DEFAULT_RULES,
    context_parallel=ml_collections.ConfigDict(
      dict(attention="ring", zigzag=True, state="allgather")
    ),
    distributed=False,
  )
  unknown = set(changes) - set(c)
  if unknown:
    raise ConfigError(f"unknown mesh option(s) {', '.join(sorted(unknown))}")
  return ml_collections.ConfigDict({**c, **changes})


def with_defaults(config):
  """Adds what every trainable config has whether or not its file sets it: the `mesh`
  section and train.grad_accum (1). Other configs (and lists of them) pass through."""
  if isinstance(config, (list, tuple)):
    return type(config)(with_defaults(c) for c in config)
  if isinstance(config, ml_collections.ConfigDict) and "train" in config:
    if "mesh" not in config:
      config.mesh = mesh_section()
    if "grad_accum" not in config.train:
      config.train.grad_accum = 1
  return config


def load_config_file(spec: str):
  """'path/to/file.py:arg' -> whatever the file's get_config(arg) returns."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_attnzoo_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(arg)")
  return with_defaults(module.get_config(arg or None))


def needs_positions(mixers: str) -> bool:
  """Every softmax-family mixer gets a position encoding: learned positions (Zoology's choice
  for attention) unless the mixer rotates its own (RoPE on by default). Otherwise comparisons
  of gated and plain softmax attention would be confounded with position-free attention."""
  softmax = [
    MIXERS[n.strip()]
    for n in mixers.split("+")
    if n.strip() in MIXERS and issubclass(MIXERS[n.strip()], MIXERS["attention"])
  ]
  return any(not cls.rope for cls in softmax)


def train_section(**changes) -> ml_collections.ConfigDict:
  """A `train` config section: AdamW with warmup and cosine decay, float32, no early stop;
  `changes` replace defaults (unknown keys are errors)."""
  c = dict(
    num_steps=3_000,
    lr=1e-3,
    warmup_steps=100,
    lr_step_every=1,
    min_lr_ratio=0.0,
    weight_decay=0.0,
    decay_all_params=False,
    b1=0.9,
    b2=0.98,
    grad_clip=1.0,
    compute_dtype="float32",
    log_every=50,
    eval_every=250,
    checkpoint_every=500,
    early_stop_at=None,
    max_checkpoints=2,
    grad_accum=1,
  )
  unknown = set(changes) - set(c)
  if unknown:
    raise ConfigError(f"unknown train option(s) {', '.join(sorted(unknown))}")
  return ml_collections.ConfigDict({**c, **changes})


def apply_knobs(
  config, knobs: dict, table: dict, mixer: str, where: str, extra=(), listed=()
) -> None:
  """Sets each `knob=value` of a config file's argument: `table` maps knob -> config path;
  `extra` names data options set as `data.<knob>`; num_heads and options of a single mixer go
  to model.mixer_kwargs. Anything else is a ConfigError listing the knobs of `where` (with
  `listed`: knobs the file consumed itself)."""
  for key, value in knobs.items():
    if key in table:
      set_typed(config, table[key], value)
    elif key in extra:
      set_typed(config, f"data.{key}", value)
    elif key == "num_heads" and "num_heads" in config.model.mixer_kwargs:
      set_typed(config, "model.mixer_kwargs.num_heads", value)
    elif "+" not in mixer and key in config.model.mixer_kwargs:
      set_typed(config, f"model.mixer_kwargs.{key}", value)
    else:
      raise ConfigError(
        f"unknown knob {key!r} in {where} argument; knobs: "
        f"{', '.join(sorted([*table, *extra, *listed]))}, num_heads or an option of the mixer"
      )


def model_section(mixer: str, **changes) -> ml_collections.ConfigDict:
  """A `model` config section for `mixer` (its options as mixer_kwargs); `changes` replace
  defaults (unknown keys are errors)."""
  c = dict(
    mixer=mixer,
    mixer_kwargs=mixer_defaults(mixer),
    d_model=64,
    num_layers=2,
    state_mixer="identity",
    mlp_ratio=4.0,
    norm="layernorm",
    position_embedding="learned",
    max_positions=512,
    embedding_dropout=0.0,
    residual_dropout=0.0,
  )
  unknown = set(changes) - set(c)
  if unknown:
    raise ConfigError(f"unknown model option(s) {', '.join(sorted(unknown))}")
  return ml_collections.ConfigDict({**c, **changes})


# Knobs every config file takes in its argument: knob -> config path.
COMMON_KNOBS = {
  "d_model": "model.d_model",
  "num_layers": "model.num_layers",
  "state_mixer": "model.state_mixer",
  "lr": "train.lr",
  "num_steps": "train.num_steps",
  "seed": "seed",
  "dtype": "train.compute_dtype",
}
