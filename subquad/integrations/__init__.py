"""Integrations with other libraries (optional imports): ``subquad.integrations.hf`` for transformers."""
