"""Models built from subquad's token mixers."""

from .hybrid import Block, HybridLM, sample
from .speculative import SpeculativeStats, speculative_generate

__all__ = ["HybridLM", "Block", "sample", "speculative_generate", "SpeculativeStats"]
