"""Models built from subquad's token mixers."""

from .hybrid import Block, HybridLM, sample

__all__ = ["HybridLM", "Block", "sample"]
