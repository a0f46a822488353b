"""Reformer's LSH attention (Kitaev et al. 2020): each query attends to the keys that angular LSH put near it.

Per hash round the tokens are hashed into buckets by a random rotation, sorted by (bucket, position), and cut
into chunks; a query sees the keys of its chunk and of the chunk before. Rounds combine as one softmax over the
union of the pairs they found, each pair counted once. See ``reference`` for the exact rules (de-duplication,
the self pair under shared QK, the first chunk) and how they relate to trax's and Hugging Face's.
"""

from __future__ import annotations

import torch

from ..._checks import check_backend, check_qkv, check_scale_softcap
from .hashing import buckets, draw_rotations, length_normalized, sort_rounds
from .reference import lsh_attention_reference

BACKENDS = ("auto", "triton", "reference")
#: the default chunk is at least this long: shorter chunks leave the kernels' tiles mostly masked
MIN_DEFAULT_CHUNK = 64


def check_options(n_buckets, n_hashes, chunk_size, causal, shared_qk, seed, generator, return_lse) -> None:
    """``lsh_attention``'s options (a layer checks its own with it at construction)."""
    if not isinstance(n_buckets, int) or isinstance(n_buckets, bool) or n_buckets < 1 \
            or (n_buckets > 1 and n_buckets % 2):
        raise ValueError(f"n_buckets: expected 1 or a positive even int (angular LSH takes the argmax over "
                         f"[xR; -xR]), got {n_buckets!r}")
    if not isinstance(n_hashes, int) or isinstance(n_hashes, bool) or n_hashes < 1:
        raise ValueError(f"n_hashes: expected a positive int, got {n_hashes!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size: expected None or a positive int, got {chunk_size!r}")
    for name, flag in (("causal", causal), ("shared_qk", shared_qk), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name}: expected a bool, got {flag!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError(f"seed: expected None or an int, got {seed!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator: expected None or a torch.Generator, got {type(generator).__name__}")
    if seed is not None and generator is not None:
        raise ValueError("seed, generator: pass one of them, not both")


def default_chunk(seq: int, n_buckets: int) -> int:
    """Two buckets' worth of tokens on average (Reformer's ``n_buckets ~ 2 N / chunk``), at least
    ``MIN_DEFAULT_CHUNK``, at most the sequence."""
    return min(seq, max(MIN_DEFAULT_CHUNK, 2 * -(-seq // n_buckets)))


def lsh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, n_buckets: int = 64, n_hashes: int = 4,
                  chunk_size: int | None = None, causal: bool = False, shared_qk: bool = False,
                  scale: float | None = None, seed: int | None = None, generator: torch.Generator | None = None,
                  return_lse: bool = False, backend: str = "auto"):
    """Reformer's LSH self-attention.

    Args:
        q: ``(batch, seq, heads_q, head_dim)``; k, v: ``(batch, seq, heads_kv, head_dim[_v])``, the same ``seq``
            (self-attention), ``heads_q`` a multiple of ``heads_kv`` (GQA/MQA).
        n_buckets: buckets per round: 1 (every token in one bucket: chunks of the natural order) or even.
        n_hashes: hash rounds; more rounds find more of a query's near keys (each pair counted once).
        chunk_size: tokens per chunk of the sorted order; a query sees its chunk and the one before. Default
            ``max(64, 2 * ceil(seq / n_buckets))`` (at most ``seq``).
        causal: keys at original positions after the query's are dropped (which earlier keys share a query's
            chunk still depends on every token's bucket, later tokens' too, as in Reformer).
        shared_qk: Reformer's shared query-key projection: ``k`` is hashed and its sort serves the queries of
            its group too; the attended keys are ``k / rms(k)`` (at the default scale a score is Reformer's
            ``q . k / |k|``; pass ``k = q`` for Reformer's layer); a token attends to itself only when it
            has no other key. Otherwise queries and keys are hashed alike (a query head with its KV head's
            rotations) and sorted separately; a query that finds no key gets 0 and LSE -inf.
        scale: defaults to ``head_dim ** -0.5``.
        seed, generator: the random rotations' source (one or neither): an int seed, or a ``torch.Generator``;
            neither draws from PyTorch's default CPU generator. The same source hashes alike on every device.
        return_lse: also return the log-sum-exp of the kept scores ``(batch, heads_q, seq)`` fp32.
        backend: ``"auto"`` (Triton on CUDA for fp16/bf16, else the reference), ``"triton"`` (fp32 runs the
            reference) or ``"reference"``.
    Returns ``out`` ``(batch, seq, heads_q, head_dim_v)`` in q's dtype, or ``(out, lse)``. Gradients flow to q,
    k and v (not through the hashes).
    """
    check_backend(backend, BACKENDS)
    check_qkv(q, k, v)
    bsz, seq, heads_q, head_dim = q.shape
    if k.shape[1] != seq:
        raise ValueError(f"k: expected shape ({bsz}, {seq}, heads_kv, {head_dim}) (LSH self-attention: as many "
                         f"keys as queries), got {tuple(k.shape)}")
    check_options(n_buckets, n_hashes, chunk_size, causal, shared_qk, seed, generator, return_lse)
    check_scale_softcap(scale, None)
    scale = head_dim ** -0.5 if scale is None else float(scale)
    chunk = default_chunk(seq, n_buckets) if chunk_size is None else min(chunk_size, seq)
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    rotations = draw_rotations(k.shape[2], n_hashes, head_dim, n_buckets, q.device, generator)
    k_rounds = sort_rounds(buckets(k, rotations, n_buckets))
    q_rounds = k_rounds if shared_qk else sort_rounds(buckets(q, rotations, n_buckets))
    keys = length_normalized(k) if shared_qk else k
    kernels = q.dtype in (torch.float16, torch.bfloat16) and (backend == "triton" or backend == "auto" and q.is_cuda)
    if kernels:
        from .flash import lsh_attention_flash
        out, lse = lsh_attention_flash(q, keys, v, q_rounds, k_rounds, chunk, causal, shared_qk, scale)
    else:
        out, lse = lsh_attention_reference(q, keys, v, q_rounds, k_rounds, chunk, causal, shared_qk, scale)
    return (out, lse) if return_lse else out


__all__ = ["lsh_attention", "default_chunk", "check_options", "BACKENDS"]
