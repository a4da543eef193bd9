"""Backbones built from registered mixers."""
from attnzoo.models.lm import DecoderLM, init_cache
from attnzoo.models.generate import generate
