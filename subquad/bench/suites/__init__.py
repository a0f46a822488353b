"""Benchmark suites: every module here registers its cases with ``@subquad.bench.suite``."""
