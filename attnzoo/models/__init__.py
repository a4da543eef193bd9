"""Backbones built from registered mixers, and `build_model` for the head a task needs."""
from attnzoo.models.build import MODELS, build_model
from attnzoo.models.generate import generate
from attnzoo.models.lm import DecoderLM, init_cache

__all__ = ["MODELS", "build_model", "generate", "DecoderLM", "init_cache"]
