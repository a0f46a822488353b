"""Data: the standard-library byte corpus and synthetic recall tasks."""

from .corpus import VOCAB_SIZE, Corpus, decode, encode, load_corpus, random_windows, stdlib_files, stdlib_root
from .synthetic import IGNORE, mqar, needle

__all__ = ["VOCAB_SIZE", "Corpus", "load_corpus", "random_windows", "stdlib_files", "stdlib_root", "encode",
           "decode", "mqar", "needle", "IGNORE"]
