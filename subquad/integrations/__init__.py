"""Integrations with other libraries (optional imports): ``subquad.integrations.hf`` for transformers,
``subquad.integrations.flash_attn`` for FlashAttention 2.x's Python API."""
