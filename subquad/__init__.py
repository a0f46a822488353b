"""subquad: efficient attention for PyTorch.

Tensors are ``(batch, seq, heads, head_dim)``. Each op has a plain-PyTorch reference (the CPU path and the
specification) and Triton kernels for the GPU, chosen by ``backend="auto"``.
"""

from . import masks
from .ops.softmax import attention

__version__ = "0.1.0"

__all__ = ["masks", "attention", "__version__"]
