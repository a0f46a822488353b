"""Attention dropout's random stream: one seed per call, and a keep decision per (query row, key) pair that
every pass, tiling and backend derives from the seed alone.

As FlashAttention-2 draws them: pair ``(row, key)`` — ``row`` the ``batch x head x query`` index, ``key`` the key's
index — takes one byte of Philox-4x32-10's output at counter ``row * cdiv(seq_kv, 16) + key // 16`` under the
seed (16 keys per call: byte ``key % 4`` of word ``(key % 16) // 4``), and is kept when that byte is at least the
threshold ``round(256 p)``. So ``p`` is used as a multiple of 1/256 (``quantized``; the kept probabilities are
scaled by ``1 / (1 - quantized(p))``, which keeps the output unbiased). The flash kernels draw the words with
Triton's ``tl.randint4x`` (``flash.tile.dropout_keep``), and ``keep`` here computes them with int64 tensor
arithmetic, so the reference drops exactly the kernels' pairs, tile by tile, without materialising a mask. A
call's ``rng`` (``new_rng``) is ``[seed, threshold]``, int64 on the device: the seed from PyTorch's generator of
the device (``torch.manual_seed`` makes a run repeatable), drawn on the device, so that a compiled or
graph-captured call draws a fresh one each time without reading it back; the threshold beside it, so that the
kernels take it as data (an integer argument would be specialised on).
"""

from __future__ import annotations

import torch

from ..._checks import is_real

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


def philox(seed: torch.Tensor, counter: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four 32-bit words (int64 in [0, 2**32)) of Philox-4x32-10 at counters ``counter`` (int64 >= 0, as
    ``(lo, hi, 0, 0)``) under the 64-bit key ``seed``, as Triton's ``randint4x`` computes them."""
    c0, c1 = counter & _M32, counter >> 32
    c2 = c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul(_ROUND_B, c2)
        hi_a, lo_a = _mul(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def threshold(dropout_p: float) -> int:
    """The bytes below which a pair is dropped: ``round(256 p)``, at most 255."""
    return min(255, round(dropout_p * 256))


def quantized(dropout_p: float) -> float:
    """The dropout probability that the draws give: ``threshold(p) / 256``."""
    return threshold(dropout_p) / 256


def keep(rng: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """Whether the pairs (``rows``, ``keys``, broadcast; int64) survive under ``rng`` (``new_rng``)."""
    words = philox(rng[0], rows * -(-seq_kv // 16) + torch.div(keys, 16, rounding_mode="floor"))
    lane = keys % 16
    word = torch.where(lane < 8, torch.where(lane < 4, words[0], words[1]),
                       torch.where(lane < 12, words[2], words[3]))
    return ((word >> ((lane % 4) * 8)) & 0xFF) >= rng[1]


@torch.library.custom_op("subquad::dropout_keep", mutates_args=())
def keep_traced(rng: torch.Tensor, rows: torch.Tensor, keys: torch.Tensor, seq_kv: int) -> torch.Tensor:
    """``keep`` as one op of its own for traced calls (torch.compile): fused into the reference's score loops,
    inductor (CPU, torch 2.13) left the words of a partial last group of 16 keys unwritten and read uninitialised
    memory for them (20 keys: keys 16-19), so a compiled call dropped other pairs than the eager one."""
    return keep(rng, rows, keys, seq_kv)


@keep_traced.register_fake
def _keep_traced_fake(rng, rows, keys, seq_kv):
    return rows.new_empty(torch.broadcast_shapes(rows.shape, keys.shape), dtype=torch.bool)


def keep_mask(rng: torch.Tensor, batch: int, heads: int, seq_q: int, seq_kv: int) -> torch.Tensor:
    """Every pair's decision, bool ``(batch, heads, seq_q, seq_kv)`` (for tests and oracles: O(N^2) memory)."""
    rows = torch.arange(batch * heads * seq_q, device=rng.device).view(batch, heads, seq_q, 1)
    return keep(rng, rows, torch.arange(seq_kv, device=rng.device).view(1, 1, 1, -1), seq_kv)


def check_dropout_p(dropout_p, backend: str = "auto") -> float:
    """The probability that a call uses (``quantized``), or a ValueError naming ``dropout_p`` (also for a backend
    without dropout)."""
    if type(dropout_p) in (float, int) and dropout_p == 0:     # (every call without dropout: 1 us less of host time)
        return 0.0
    if not is_real(dropout_p) or not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p: expected a probability in [0, 1), got {dropout_p!r}")
    if dropout_p and backend in ("fa4", "cudnn", "flex"):
        raise ValueError(f"dropout_p: runs on the 'triton' and 'reference' backends (or 'auto'), got "
                         f"backend={backend!r}")
    return quantized(float(dropout_p))


__all__ = ["new_rng", "philox", "threshold", "quantized", "keep", "keep_traced", "keep_mask", "check_dropout_p"]
