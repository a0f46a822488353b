"""cuDNN's fused attention through PyTorch SDPA, as a backend of ``subquad.attention`` for dense calls.

On the H100, cuDNN's dense kernels run 550-650 TFLOP/s forward (BENCHMARKS.md), ahead of the own Triton
kernels and level with FlashAttention-4; ``backend="auto"`` takes it where the measured table says it is the
fastest. It runs full and causal attention only (no pattern, softcap or ALiBi; SDPA's causal mask is
top-left aligned, so causal needs ``seq_q == seq_kv``) and returns no LSE.
"""

from __future__ import annotations

import torch


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                       softcap=None, alibi_slopes=None, return_lse: bool = False) -> str | None:
    """Why SDPA's cuDNN backend cannot run this call, or None if it can."""
    if not q.is_cuda:
        return "cuDNN attention needs CUDA tensors"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN attention runs fp16/bf16, got {q.dtype}"
    if mask is not None:
        return "cuDNN attention runs full and causal attention only, not a mask pattern"
    if softcap is not None or alibi_slopes is not None:
        return "softcap and ALiBi are not expressed through SDPA"
    if return_lse:
        return "SDPA returns no log-sum-exp"
    if causal and q.shape[1] != k.shape[1]:
        return "SDPA aligns the causal mask top-left: causal needs seq_q == seq_kv"
    if not torch.backends.cudnn.is_available():
        return "PyTorch is not built with cuDNN here"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    params = torch.backends.cuda.SDPAParams(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, 0.0,
                                            causal, q.shape[2] != k.shape[2])
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):   # as cudnn_attention runs it, whatever the caller enabled
        usable = torch.backends.cuda.can_use_cudnn_attention(params, False)
    if not usable:
        return (f"cuDNN attention does not take this call here (head_dim={q.shape[-1]}, dtype={q.dtype}, "
                f"heads {q.shape[2]}/{k.shape[2]})")
    return None


def cudnn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    scale: float | None = None) -> torch.Tensor:
    """Dense or causal attention on ``(batch, seq, heads, dim)`` tensors through SDPA's cuDNN kernels
    (differentiable; GQA through ``enable_gqa``, K/V not repeated). Callers check ``unsupported_reason``."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.functional import scaled_dot_product_attention

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=causal, scale=scale, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


__all__ = ["cudnn_attention", "unsupported_reason"]
