"""Integrations with other libraries (optional imports): ``subquad.integrations.hf`` for transformers,
``subquad.integrations.flash_attn`` for FlashAttention 2.x's Python API, ``subquad.integrations.flex_attention``
for PyTorch FlexAttention's API (``flex_attention``, ``create_block_mask``, ``and_masks``, ``or_masks``)."""
