"""Operators: the math contract of every sequence mixer (see DESIGN.md, Ops)."""

from attnzoo.ops.dispatch import Unsupported
from attnzoo.ops.softmax_attention import softmax_attention

__all__ = ["Unsupported", "softmax_attention"]
