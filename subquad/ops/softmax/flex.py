"""PyTorch's FlexAttention as a backend of ``subquad.attention``.

FlexAttention compiles a mask predicate into a Triton kernel that skips the key blocks its block map excludes
and masks only the partial ones: the design subquad's own kernels follow. On some patterns its kernels are
the fastest there are (BigBird fwd+bwd on the H100: 6% ahead of FA4 and 1.6x ahead of the own Triton kernel,
``benchmarks/results/2026-11-23-backends-h100.json``), so ``backend="auto"`` may pick it: only where the
measured table ranks it (it is in no unmeasured order), and ``backend="flex"`` asks for it directly.

The adapter adds no mask work of its own: flex gets the BlockMask FA4's adapter uses (``fa4.block_mask_for``),
its 128 x 128 full and partial key-block lists become ``BlockMask.from_kv_blocks``, and a ``mask_mod``
evaluates the same ``fa4.emit`` that generates FA4's CuTe predicate, here with torch operations; softcap and
ALiBi become a ``score_mod``. Unlike FA4's, the mask_mod is made even when no block is partial: eager flex
(the CPU) applies it to every block and ignores the lists. Patterns with no such form (Python predicates)
cannot run here.
``flex_attention`` is compiled once per process on CUDA with static shapes (dynamo's cache limit raised:
every new shape or pattern is a new graph); on the CPU it runs eagerly, slowly (for tests).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings

import torch

from ... import masks as _masks
from . import fa4


# found once at import: torch 2.11's dynamo refuses to trace importlib.util.find_spec (even behind an lru_cache)
# inside a compiled call to backend="flex"
_AVAILABLE = importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def is_available() -> bool:
    return _AVAILABLE


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       mask=None, alibi_slopes: torch.Tensor | None = None) -> str | None:
    """Why FlexAttention cannot run this call, or None if it can."""
    if not is_available():
        return "this PyTorch has no torch.nn.attention.flex_attention"
    if alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled():
        return "ALiBi slopes reach FlexAttention's score_mod as constants: no gradient flows to them"
    if not q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "FlexAttention has no backward on the CPU"
    if q.shape[-1] < 16 or q.shape[-1] & (q.shape[-1] - 1):
        return f"FlexAttention's kernels take power-of-two head dims >= 16, got {q.shape[-1]}"
    if mask is not None:
        try:
            _spec(_block_mask(q, k, causal=causal, mask=mask))
        except fa4.NotExpressible as exc:
            return str(exc).replace("FA4 mask_mod", "FlexAttention mask_mod")
        except (TypeError, ValueError) as exc:
            return f"the mask cannot be built for FlexAttention: {exc}"
    return None


def _block_mask(q, k, *, causal, mask) -> "_masks.BlockMask":
    return fa4.block_mask_for(mask, causal=causal, batch=q.shape[0], heads=q.shape[2], seq_q=q.shape[1],
                              seq_kv=k.shape[1], device=q.device)


def _spec(bm: "_masks.BlockMask"):
    """(spec, aux) of the BlockMask's pattern, made once per BlockMask. Flag tensors (block layouts, global
    tokens, bool masks) reach flex as bool: read as int32 and compared with 0, BigBird's random-block layout
    made flex's kernels 2.5x slower on the H100 (1.56 against 0.64 ms forward at 16k; the layout's broadcast
    batch and head dimensions cost nothing measurable, benchmarks/NOTES.md)."""
    cached = bm._cache.get("flex_spec")
    if cached is None:
        aux: list[torch.Tensor] = []
        cached = bm._cache["flex_spec"] = (fa4.mask_spec(bm.pattern, bm.seq_kv, aux, torch.bool), aux)
    return cached


def _padded(idx: torch.Tensor, n_kb: int) -> torch.Tensor:
    """Key-block indices padded to one column per key block (flex transposes the lists through a dense map)."""
    out = idx.new_zeros(*idx.shape[:-1], n_kb)
    out[..., :idx.shape[-1]] = idx[..., :n_kb]
    return out.to(torch.int32)


def flex_block_mask(bm: "_masks.BlockMask"):
    """FlexAttention's BlockMask for a subquad BlockMask (made once per BlockMask)."""
    cached = bm._cache.get("flex")
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask

    spec, aux = _spec(bm)
    offset = bm.q_offset

    def mask_mod(b, h, q_idx, kv_idx):
        return fa4.emit(spec, fa4.TorchOps, b, h, q_idx + offset, kv_idx, aux)

    (pnum, pidx), (fnum, fidx) = bm.partial_kv, bm.full_kv
    n_kb = -(-bm.seq_kv // bm.block_kv)
    cached = bm._cache["flex"] = FlexBlockMask.from_kv_blocks(
        pnum.to(torch.int32), _padded(pidx, n_kb), fnum.to(torch.int32), _padded(fidx, n_kb),
        BLOCK_SIZE=(bm.block_q, bm.block_kv), mask_mod=mask_mod, seq_lengths=(bm.seq_q, bm.seq_kv))
    return cached


_SCORE_MODS: dict = {}
#: score_mods made around a user's function: few, as each keeps the function and what it captures alive
USER_SCORE_MODS = 8


def _score_mod(softcap, alibi_slopes, q_offset, user=None):
    """One function per (softcap, slopes tensor, offset, user's score_mod), kept: compiled flex guards on the
    score_mod, so a new closure on every call would compile again. The user's gets query positions (flex's
    index plus the offset), as subquad's masks and the reference do."""
    if softcap is None and alibi_slopes is None and user is None:
        return None
    if torch.compiler.is_compiling():
        # traced, the closure is inlined into the graph (nothing to keep), and dynamo cannot take id() of a
        # score_mod defined inside the compiled region (torch 2.11)
        return _make_score_mod(softcap, alibi_slopes, q_offset, user)
    # (the version too: a closure holds a float copy of bf16 slopes, which an in-place update would not reach)
    key = (softcap, None if alibi_slopes is None else (id(alibi_slopes), alibi_slopes._version), q_offset,
           None if user is None else id(user))
    hit = _SCORE_MODS.get(key)
    if hit is not None and hit[0] is alibi_slopes and hit[2] is user:
        return hit[1]
    if len(_SCORE_MODS) > 256:
        _SCORE_MODS.clear()
    if user is not None:
        users = [k for k, v in _SCORE_MODS.items() if v[2] is not None]
        for stale in users[:max(0, len(users) - USER_SCORE_MODS + 1)]:
            del _SCORE_MODS[stale]
    score_mod = _make_score_mod(softcap, alibi_slopes, q_offset, user)
    _SCORE_MODS[key] = (alibi_slopes, score_mod, user)
    return score_mod


def _make_score_mod(softcap, alibi_slopes, q_offset, user):
    slopes = None if alibi_slopes is None else alibi_slopes.float()
    per_batch = slopes is not None and slopes.dim() == 2 and slopes.shape[0] > 1

    def score_mod(score, b, h, q_idx, kv_idx):
        if softcap is not None:
            score = softcap * torch.tanh(score / softcap)
        if slopes is not None:
            slope = slopes[b, h] if per_batch else slopes.view(-1)[h]
            score = score - slope * (q_idx + q_offset - kv_idx).abs()
        if user is not None:
            score = user(score, b, h, q_idx + q_offset, kv_idx)
        return score

    return score_mod


_COMPILED: dict = {}


def _flex(device: torch.device):
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if "cuda" not in _COMPILED:
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 1024)
        # dynamic=False: every pattern's mask_mod is the same function over different closure tensors, so from
        # the second pattern on, dynamo's automatic dynamic shapes made the flag tensors symbolic (its log:
        # "marking ...mask_mod.__closure__[0].cell_contents[0] as dynamic"), with symbolic index arithmetic in
        # the kernels: BigBird forward 0.77 ms in the suite against 0.65 alone on the H100
        _COMPILED["cuda"] = torch.compile(flex_attention, dynamic=False)
    return _COMPILED["cuda"]


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                   scale: float | None = None, softcap: float | None = None,
                   alibi_slopes: torch.Tensor | None = None, return_lse: bool = True,
                   score_mod=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out, lse)`` of exact attention on ``(batch, seq, heads, dim)`` tensors through FlexAttention
    (differentiable; GQA through ``enable_gqa``); ``lse`` is None unless asked for, so that flex's backward
    need not take a gradient for it. Callers check ``unsupported_reason``."""
    block_mask = None
    if mask is not None or causal:
        block_mask = flex_block_mask(_block_mask(q, k, causal=causal, mask=mask))
    # eager flex on the CPU warns that it is unfused, and newer PyTorch prefers return_aux to return_lse (dynamo
    # cannot trace the filter's change: traced, the warnings are left alone)
    with contextlib.nullcontext() if torch.compiler.is_compiling() else warnings.catch_warnings():
        if not torch.compiler.is_compiling():
            warnings.simplefilter("ignore")
        result = _flex(q.device)(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            score_mod=_score_mod(softcap, alibi_slopes, k.shape[1] - q.shape[1], score_mod), block_mask=block_mask,
            scale=scale, enable_gqa=q.shape[2] != k.shape[2], return_lse=return_lse)
    out, lse = result if return_lse else (result, None)
    return out.transpose(1, 2), lse


__all__ = ["flex_attention", "flex_block_mask", "unsupported_reason", "is_available"]
