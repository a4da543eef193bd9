"""Name -> mixer class registry and the initialisers every mixer shares."""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn

MIXERS: dict[str, type[nn.Module]] = {}

# Zoology's initialisation: every projection and embedding N(0, 0.02), biases 0, and the
# projections that write into the residual stream N(0, 0.02 / sqrt(2 L)).
dense_init = nn.initializers.normal(0.02)


def output_init(num_layers: int):
  return nn.initializers.normal(0.02 / math.sqrt(2 * num_layers))


def per_head(width: int, num_heads: int) -> int:
  """width // num_heads; a one-line error naming both when num_heads does not divide it."""
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"d_model ({width}) must be divisible by num_heads ({num_heads})")
  return width // num_heads


def register(name: str):
  """Class decorator: `@register("gla")` makes the mixer buildable from a config."""
  def decorator(cls):
    if name in MIXERS:
      raise ValueError(f"mixer {name!r} is registered twice")
    MIXERS[name] = cls
    cls.mixer_name = name
    return cls
  return decorator


def build_mixer(mixer_name: str, /, **kwargs) -> nn.Module:
  """Builds a registered mixer; unknown names and unknown keyword arguments are errors."""
  if mixer_name not in MIXERS:
    raise ValueError(f"unknown mixer {mixer_name!r}; registered: {', '.join(sorted(MIXERS))}")
  cls = MIXERS[mixer_name]
  fields = {f.name for f in dataclasses.fields(cls)} | {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(f"mixer {mixer_name!r} has no option(s) {', '.join(unknown)}; "
                     f"options: {', '.join(sorted(fields))}")
  return cls(**kwargs)
