"""Peers as benchmark impls: other implementations of the same attention, called on the harness's
``(batch, seq, heads, dim)`` inputs."""

from __future__ import annotations

import torch

_SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                  "math": "MATH"}


def sdpa(backend: str, causal: bool = False, enable_gqa: bool = False):
    """PyTorch SDPA pinned to one backend (``flash`` is FlashAttention-2)."""
    if backend not in _SDPA_BACKENDS:
        raise ValueError(f"backend: expected one of {sorted(_SDPA_BACKENDS)}, got {backend!r}")

    def run(inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.functional import scaled_dot_product_attention

        q, k, v = (inputs[x].transpose(1, 2) for x in ("q", "k", "v"))
        with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
            out = scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    return run


_FLEX: dict = {}


def flex(mask_mod_factory=None, backend: str | None = None):
    """FlexAttention, compiled once per process (with the compile-cache limit raised, BENCHMARKS.md), its
    BlockMask built on the first call per (mask, N, device). ``mask_mod_factory(n, device)`` returns the
    ``mask_mod`` (None: full attention); ``backend`` is flex's ``kernel_options["BACKEND"]`` (TRITON, FLASH)."""

    def run(inputs):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = (inputs[x].transpose(1, 2) for x in ("q", "k", "v"))
        n = q.shape[2]
        if "compiled" not in _FLEX:
            torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
            # static shapes, as subquad's flex backend (subquad/ops/softmax/flex.py says why)
            _FLEX["compiled"] = torch.compile(flex_attention, dynamic=False)
        block_mask = None
        if mask_mod_factory is not None:
            # The factory itself is in the key: two suites may name different masks alike.
            key = (mask_mod_factory, n, str(q.device))
            if key not in _FLEX:
                # compiled on CUDA: evaluated eagerly, BigBird's mask_mod (a layout indexed by q // 64, k // 64)
                # asked for 32 GiB at 64k on the H100 (int64 index grids of N x N)
                _FLEX[key] = create_block_mask(mask_mod_factory(n, q.device), None, None, n, n, device=q.device,
                                               _compile=q.is_cuda)
            block_mask = _FLEX[key]
        options = {"kernel_options": {"BACKEND": backend}} if backend else {}
        return _FLEX["compiled"](q, k, v, block_mask=block_mask, **options).transpose(1, 2)

    return run


def mamba_ssd_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, scale: float):
    """The SSD case, ``gla(q, k, v, g)`` with a log-decay ``g`` per token and head, in mamba-ssm's terms
    ``(x, dt, A, B, C)``, as the same function: ``dt = -g`` with ``A = -1`` is its log-decay ``dt A = g``,
    ``x = v / dt`` makes its input ``x dt`` our ``v``, ``B = k`` and ``C = scale q``, one group per head."""
    acc = torch.promote_types(v.dtype, torch.float32)
    dt = -g.to(acc)
    x = (v.to(acc) / dt[..., None]).to(v.dtype)
    return x, dt, -torch.ones(q.shape[2], device=q.device, dtype=acc), k, (q.to(acc) * scale).to(q.dtype)


def _mamba_chunk_scan():
    """mamba-ssm's ``mamba_chunk_scan_combined`` without running the package's ``__init__``, which loads its
    CUDA extensions: only the Triton SSD is needed, and PyPI carries mamba-ssm as sources that a machine
    without a compiler can still put on its path (``benchmarks/gpu/mamba-src.sh``)."""
    import importlib.util
    import sys
    import types

    if "mamba_ssm" not in sys.modules:
        spec = importlib.util.find_spec("mamba_ssm")
        if spec is None or not spec.submodule_search_locations:
            raise ModuleNotFoundError("No module named 'mamba_ssm'")
        package = types.ModuleType("mamba_ssm")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["mamba_ssm"] = package
    from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

    return mamba_chunk_scan_combined


def mamba_ssd(chunk_size: int = 256):
    """mamba-ssm's Triton SSD (Mamba-2's chunked scan, its default chunk of 256) on the inputs
    ``mamba_x, mamba_dt, mamba_A, k, mamba_C`` that the suite prepares with ``mamba_ssd_inputs``."""

    def run(inputs):
        return _mamba_chunk_scan()(inputs["mamba_x"], inputs["mamba_dt"], inputs["mamba_A"], inputs["k"],
                                   inputs["mamba_C"], chunk_size)

    return run
