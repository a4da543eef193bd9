"""Backbones built from registered mixers."""
from attnzoo.models.lm import DecoderLM, init_cache
