"""Name -> mixer class registry, the declared capabilities every mixer carries, and the
initialisers every mixer shares.

Capabilities (class attributes): `bidirectional` (declared by every mixer: True when the family
has a non-causal form, selected by its dataclass field `causal`), `has_causal_form` (False for
a bidirectional-only mixer such as FNet, which refuses causal=True; True unless declared) and
`uses_block_ids` (True for a mixer whose `__call__` and `attention_matrix` take `block_ids`;
False unless declared).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import TypeVar

import flax.linen as nn

MIXERS: dict[str, type[nn.Module]] = {}
Mixer = TypeVar("Mixer", bound=nn.Module)

# Zoology's initialisation: every projection and embedding N(0, 0.02), biases 0, and the
# projections that write into the residual stream N(0, 0.02 / sqrt(2 L)).
dense_init = nn.initializers.normal(0.02)


def output_init(num_layers: int) -> Callable:
  return nn.initializers.normal(0.02 / math.sqrt(2 * num_layers))


def head_output(d_model: int, num_layers: int, dtype) -> nn.DenseGeneral:
  """The bias-free projection of [..., heads, head_dim] back to d_model that writes into the
  residual stream (Zoology's scaled initialisation)."""
  return nn.DenseGeneral(
    d_model, axis=(-2, -1), dtype=dtype, use_bias=False, kernel_init=output_init(num_layers)
  )


def per_head(width: int, num_heads: int) -> int:
  """width // num_heads; a one-line error naming both when num_heads does not divide it."""
  if num_heads < 1 or width % num_heads:
    raise ValueError(f"d_model ({width}) must be divisible by num_heads ({num_heads})")
  return width // num_heads


def register(name: str) -> Callable[[type[Mixer]], type[Mixer]]:
  """Class decorator: `@register("gla")` makes the mixer buildable from a config. The class
  must declare `bidirectional: ClassVar[bool]`; `uses_block_ids` defaults to False."""

  def decorator(cls: type[Mixer]) -> type[Mixer]:
    if name in MIXERS:
      raise ValueError(f"mixer {name!r} is registered twice")
    if not isinstance(getattr(cls, "bidirectional", None), bool):
      raise TypeError(f"mixer {name!r} must declare bidirectional: ClassVar[bool]")
    cls.has_causal_form = getattr(cls, "has_causal_form", True)
    if not (cls.bidirectional or cls.has_causal_form):
      raise TypeError(f"mixer {name!r} has neither a causal nor a bidirectional form")
    MIXERS[name] = cls
    cls.mixer_name = name
    cls.uses_block_ids = getattr(cls, "uses_block_ids", False)
    return cls

  return decorator


def bidirectional_mixers() -> list[str]:
  """Names of the registered mixers that have a non-causal form."""
  return sorted(name for name, cls in MIXERS.items() if cls.bidirectional)


def causal_mixers() -> list[str]:
  """Names of the registered mixers that have a causal form (all but the bidirectional-only)."""
  return sorted(name for name, cls in MIXERS.items() if cls.has_causal_form)


def build_mixer(mixer_name: str, /, *, causal: bool = True, **kwargs) -> nn.Module:
  """Builds a registered mixer; unknown names and unknown keyword arguments are errors.

  causal comes from the model (a decoder is causal, an encoder not): a bidirectional mixer
  gets it as its `causal` field; a causal-only one refuses causal=False, a bidirectional-only
  one causal=True.
  """
  if mixer_name not in MIXERS:
    raise ValueError(f"unknown mixer {mixer_name!r}; registered: {', '.join(sorted(MIXERS))}")
  cls = MIXERS[mixer_name]
  fields = ({f.name for f in dataclasses.fields(cls)} | {"parent", "name"}) - {"causal"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise ValueError(
      f"mixer {mixer_name!r} has no option(s) {', '.join(unknown)}; "
      f"options: {', '.join(sorted(fields))}"
    )
  if causal and not cls.has_causal_form:
    raise ValueError(
      f"mixer {mixer_name!r} is bidirectional-only (no causal form): use it in an encoder "
      f"(causal=False); causal mixers: {', '.join(causal_mixers())}"
    )
  if cls.bidirectional:
    return cls(causal=causal, **kwargs)
  if not causal:
    raise ValueError(
      f"mixer {mixer_name!r} is causal-only (no bidirectional form); "
      f"bidirectional mixers: {', '.join(bidirectional_mixers())}"
    )
  return cls(**kwargs)
