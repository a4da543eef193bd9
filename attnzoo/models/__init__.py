"""Models built from one Block of registered mixers (backbone.py): a decoder LM, an encoder
classifier, a dual encoder (document pairs) and a regressor over vectors; `build_model` makes
the one a task's head needs."""

from attnzoo.models.backbone import Backbone, Block
from attnzoo.models.build import MODELS, build_model
from attnzoo.models.dual_encoder import DualEncoderClassifier
from attnzoo.models.encoder import EncoderClassifier
from attnzoo.models.generate import generate
from attnzoo.models.lm import DecoderLM, init_cache
from attnzoo.models.regressor import Regressor

__all__ = [
  "Backbone",
  "Block",
  "MODELS",
  "build_model",
  "DualEncoderClassifier",
  "EncoderClassifier",
  "generate",
  "DecoderLM",
  "init_cache",
  "Regressor",
]
