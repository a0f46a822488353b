"""Benchmarks: ``subquad bench`` measures every mechanism beside its peers (see ``harness``)."""

from .harness import Case, attention_flops, run_cases, suite

__all__ = ["Case", "suite", "run_cases", "attention_flops"]
