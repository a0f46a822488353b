"""subquad: efficient attention for PyTorch.

Tensors are ``(batch, seq, heads, head_dim)``. Each op has a plain-PyTorch reference (the CPU path and the
specification) and Triton kernels for the GPU, chosen by ``backend="auto"``.
"""

from . import masks
from .ops.softmax import attention
from .ops.softmax.varlen import varlen_attention
from .ops.softmax.dispatch import available_backends
from .ops.linear import (gla, gla_step, linear_attention, linear_attention_step, retention, ssd, ssd_step)
from .ops.lsh import lsh_attention
from .ops.delta import delta_rule, delta_rule_step
from .ops.nsa import nsa, topk_block_attention
from . import cache
from .ops.decode import decode
from .ops.ring import ring_attention, sharded_gla, sharded_retention, zigzag_shard, zigzag_unshard
from . import nn, models
from .models import HybridLM

__version__ = "0.1.0"

__all__ = ["masks", "attention", "varlen_attention", "available_backends", "__version__", "lsh_attention",
           "gla", "gla_step", "linear_attention", "linear_attention_step", "retention", "ssd", "ssd_step",
           "delta_rule", "delta_rule_step", "nsa", "topk_block_attention", "cache", "decode", "nn", "models",
           "HybridLM", "ring_attention", "sharded_gla", "sharded_retention", "zigzag_shard", "zigzag_unshard"]
