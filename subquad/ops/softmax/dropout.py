"""Attention dropout's random stream: one seed per call, and a keep decision per (query row, key) pair that
every pass, tiling and backend derives from the seed alone.

Pair ``(row, key)`` — ``row`` the ``batch x head x query`` index, ``key`` the key's index — is kept when the
first word of Philox-4x32-10 at counter ``row * seq_kv + key`` under key ``seed`` is at least
``threshold(p)``: what Triton's ``tl.randint`` draws in the flash kernels (``flash.tile.dropout_keep``) and
``keep`` here computes with int64 tensor arithmetic, so the reference drops exactly the kernels' pairs, tile by
tile, without materialising a mask. A call's ``rng`` (``new_rng``) is ``[seed, threshold]``, int64 on the device:
the seed from PyTorch's generator of the device (``torch.manual_seed`` makes a run repeatable), drawn on the
device, so that a compiled or graph-captured call draws a fresh one each time without reading it back; the
threshold beside it, so that the kernels take it as data (an integer argument would be specialised on).
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def new_rng(device, dropout_p: float) -> torch.Tensor:
    """One call's dropout stream: ``[fresh seed, threshold(dropout_p)]``, int64 on ``device``."""
    rng = torch.randint(0, 2 ** 62, (2,), device=device, dtype=torch.int64)
    rng[1] = threshold(dropout_p)
    return rng


def _mul(a: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` 32-bit words of ``a * x`` for a 32-bit constant ``a`` and int64 ``x`` in [0, 2**32), with no
    intermediate above 2**49 (the product itself would overflow int64)."""
    t_lo = a * (x & 0xFFFF)
    t_hi = a * (x >> 16)
    return (t_hi + (t_lo >> 16)) >> 16, (((t_hi & 0xFFFF) << 16) + t_lo) & _M32


def philox_word(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """The first 32-bit word (int64 in [0, 2**32)) of Philox-4x32-10 at counters ``counter`` (int64 >= 0, as
    ``(lo, hi, 0, 0)``) under the 64-bit key ``seed``, as Triton's ``randint`` computes it."""
    c0, c1 = counter & _M32, counter >> 32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul(_ROUND_B, c2)
        hi_a, lo_a = _mul(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def threshold(dropout_p: float) -> int:
    """The words below which a pair is dropped: ``uint32(fp32(p) * 2**32)``, as the kernels compute it."""
    return int(torch.tensor(dropout_p, dtype=torch.float32) * 4294967296.0)


def keep(rng: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """Whether the pairs (``rows``, ``keys``, broadcast; int64) survive under ``rng`` (``new_rng``)."""
    return philox_word(rng[0], rows * seq_kv + keys) >= rng[1]


def keep_mask(rng: torch.Tensor, batch: int, heads: int, seq_q: int, seq_kv: int) -> torch.Tensor:
    """Every pair's decision, bool ``(batch, heads, seq_q, seq_kv)`` (for tests and oracles: O(N^2) memory)."""
    rows = torch.arange(batch * heads * seq_q, device=rng.device).view(batch, heads, seq_q, 1)
    return keep(rng, rows, torch.arange(seq_kv, device=rng.device).view(1, 1, 1, -1), seq_kv)


def check_dropout_p(dropout_p) -> float:
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    return float(dropout_p)


__all__ = ["new_rng", "philox_word", "threshold", "keep", "keep_mask", "check_dropout_p"]
