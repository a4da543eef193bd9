"""The model of each task head kind, built from the config's `model` section."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from attnzoo.models.dual_encoder import DualEncoderClassifier
from attnzoo.models.encoder import EncoderClassifier
from attnzoo.models.lm import DecoderLM
from attnzoo.models.regressor import Regressor

MODELS: dict[str, type[nn.Module]] = {
  "causal_lm": DecoderLM,
  "classifier": EncoderClassifier,
  "regressor": Regressor,
  "dual_encoder": DualEncoderClassifier,
}


def build_model(kind: str, model_config, dtype: Any, **task_kwargs) -> nn.Module:
  """The `kind` model with the options of `model_config` (mixer as "a+b", mixer_kwargs,
  d_model, ...) and the task's own arguments (vocab_size, num_classes, input_dim, ...).
  An option the model does not have is an error naming it."""
  if kind not in MODELS:
    raise ValueError(f"no model for head kind {kind!r}; known: {', '.join(MODELS)}")
  cls = MODELS[kind]
  options = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  options["mixers"] = tuple(n.strip() for n in options.pop("mixer").split("+"))
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(options) - fields)
  if unknown:
    raise ValueError(f"model option(s) {', '.join(unknown)} do not apply to a {kind} model")
  return cls(**options, **task_kwargs, dtype=dtype)
