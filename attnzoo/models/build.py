"""The model of each task head kind, built from the config's `model` section."""
from __future__ import annotations

from typing import Any

import flax.linen as nn

from attnzoo.models.lm import DecoderLM

MODELS: dict[str, type[nn.Module]] = {"causal_lm": DecoderLM}


def build_model(kind: str, model_config, dtype: Any, **task_kwargs) -> nn.Module:
  """The `kind` model ("causal_lm", ...) with the backbone options of `model_config` (mixer,
  mixer_kwargs, d_model, ...) and the task's own arguments (vocab_size, num_classes, ...)."""
  if kind not in MODELS:
    raise ValueError(f"no model for head kind {kind!r}; known: {', '.join(MODELS)}")
  m = model_config
  kwargs = m.mixer_kwargs.to_dict() if hasattr(m.mixer_kwargs, "to_dict") else dict(m.mixer_kwargs)
  return DecoderLM(d_model=m.d_model, num_layers=m.num_layers,
                   mixers=tuple(n.strip() for n in m.mixer.split("+")), mixer_kwargs=kwargs,
                   state_mixer=m.state_mixer, mlp_ratio=m.mlp_ratio, norm=m.norm,
                   position_embedding=m.position_embedding, max_positions=m.max_positions,
                   dtype=dtype, **task_kwargs)
