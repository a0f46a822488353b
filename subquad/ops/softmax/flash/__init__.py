"""Flash attention in Triton: one forward and one backward kernel for every pattern of ``subquad.masks``.

* ``flash_attention(q, k, v, causal=, mask=, ...)``: the engine behind ``subquad.attention(backend="triton")``.
  Bands (full, causal, sliding windows) run with no BlockMask at all; every other pattern is resolved to a
  BlockMask whose full blocks run unmasked and whose partial blocks apply in-kernel terms (documents,
  prefix-LM, Longformer / BigBird global tokens, block layouts) or a precomputed bitmask (everything else).
* ``flash_attention_masked(q, k, v, block_mask, scale, ...)``: the same on a prebuilt BlockMask, with optional
  ``q_pos`` / ``kv_pos`` (gathered or permuted tokens); used by planned patterns and NSA.
* ``flash_attention_lsh(q, k, v, block_mask, scale, q_pos, kv_pos, windows)``: Reformer's hash rounds folded into
  the batch, each element sorted its own way (``subquad.ops.lsh``).

Both return ``(out, lse)``; ``lse`` (``(B, H_q, N_q)`` fp32, natural log) is differentiable.
fp16 and bf16 only: ``subquad.attention`` sends fp32 inputs to the reference.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .... import masks as _masks
from ....masks import BlockMask, Pattern
from .launch import LshWindows, MaskArgs, interpreting
from .masking import BAND_INF, Terms, bitmask_tiles, kernel_terms, pure_band
from .op import FlashWithColumns, GivenForward, run

#: BlockMask block size the engine builds (kernel tiles divide it); smaller in the interpreter so that small
#: test shapes cross several blocks
MASK_BLOCK = 128
MASK_BLOCK_INTERPRET = 32


#: the smaller BlockMask block tried for a pattern, and, per pass, the share of the 128 block's visited pairs
#: that it must visit at most to be taken: its tiles run at a lower pair rate. On the H200
#: (benchmarks/results/2026-12-04-patterns-longformer-bigbird-h200.json), BigBird (random blocks of 64) visits
#: 0.54 of the pairs at 64 and Longformer (window 512, 16 global tokens) 0.79; at 64 the forward ran 1.48x /
#: 1.32x faster (2 x 16k), a pair rate of 0.82-1.04 that of the 128 tiles, and the backward 1.23x faster /
#: 1.24x slower, a pair rate of 0.64-0.68. Since 64-row tiles no longer compute their chained dots twice
#: (``subquad.ops.chained``), BigBird runs 1.13x faster fwd+bwd at 64; Longformer's backward at 64 (threshold
#: 0.85) was still 0.85x its 128-block one (2026-12-04-unchain-dkdv-ab-h200.json).
SMALL_MASK_BLOCK = 64
SMALL_BLOCK_VISITS = {"forward": 0.85, "backward": 0.6}


def _mask_block(device) -> int:
    return MASK_BLOCK_INTERPRET if interpreting() and torch.device(device).type == "cpu" else MASK_BLOCK


def _resolve_tiled(mask, causal: bool, bsz: int, hq: int, seq_q: int, seq_kv: int,
                   device) -> tuple[BlockMask | None, BlockMask | None]:
    """The pattern's BlockMasks for the forward and the backward pass, each at the block size that pass runs
    fastest: 128, or 64 where that visits at most ``SMALL_BLOCK_VISITS`` of the pairs (narrow bands with global
    tokens, BigBird's 64-wide random blocks: at 128 most of their tiles are partial and mostly masked). The
    passes share no tiling (the backward reads only the rows' LSE), so they may differ. Chosen once per
    pattern and shape."""
    block = _mask_block(device)
    resolve = lambda size: _masks.resolve(mask, causal=causal, batch=bsz, heads=hq, seq_q=seq_q, seq_kv=seq_kv,
                                          device=device, block_q=size, block_kv=size)
    if block != MASK_BLOCK or not isinstance(mask, Pattern):
        bm = resolve(block)
        return bm, bm
    chosen = mask.memo("_mask_block_chosen")
    key = (causal, bsz, hq, seq_q, seq_kv, str(_masks.canonical_device(device)))
    if key not in chosen and torch.compiler.is_compiling():
        # the choice reads block counts back from the device, which a traced call cannot: the 128 block for
        # both passes, not remembered (the next eager call chooses)
        bm = resolve(MASK_BLOCK)
        return bm, bm
    if key not in chosen:
        if len(chosen) > 64:
            chosen.clear()
        # the small block's kind grid, counted and dropped (not cached) unless a pass takes it
        small = BlockMask.build(_masks.and_causal(mask) if causal else mask, batch=bsz, heads=hq, seq_q=seq_q,
                                seq_kv=seq_kv, block_q=SMALL_MASK_BLOCK, block_kv=SMALL_MASK_BLOCK, device=device)
        share = small.block_density() / max(resolve(MASK_BLOCK).block_density(), 1e-30)
        chosen[key] = tuple(SMALL_MASK_BLOCK if share <= SMALL_BLOCK_VISITS[p] else MASK_BLOCK
                            for p in ("forward", "backward"))
    forward_block, backward_block = chosen[key]
    forward = resolve(forward_block)
    return forward, forward if backward_block == forward_block else resolve(backward_block)


def _prep(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _check_dtype(q: torch.Tensor) -> None:
    if q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"q: the Triton flash kernels take float16 or bfloat16, got {q.dtype} (use "
                         f"backend='reference' for float32)")


def _band_args(lo: int, hi: int) -> MaskArgs:
    lo, hi = max(lo, -BAND_INF), min(hi, BAND_INF)
    return MaskArgs(use_list=False, lists=None, lists_t=None, tile_of=None, bits=None, doc_ids=None, q_pos=None,
                    kv_pos=None, band_lo=lo, band_hi=hi, prefix=0, mbq=128, mbk=128)


def _block_mask_args(bm: BlockMask, q_pos, kv_pos) -> MaskArgs:
    """The kernels' arguments for ``bm`` at these positions, kept on the BlockMask per positions tensor: made
    per call, the int32 copies of a plan component's positions were two more launches each time."""
    kept = bm._cache.setdefault("flash_args", {})
    # (torch 2.11's dynamo traces id() of a tensor, not of None)
    key = tuple(None if x is None else id(x) for x in (q_pos, kv_pos))
    hit = kept.get(key)
    if hit is not None and hit[0] is q_pos and hit[1] is kv_pos:
        return hit[2]
    if len(kept) >= 16:         # a caller making new position tensors every call keeps none for long
        kept.clear()
    args = _make_block_mask_args(bm, q_pos, kv_pos)
    kept[key] = (q_pos, kv_pos, args)
    return args



def _heaviest_first(full_num: torch.Tensor, part_num: torch.Tensor) -> torch.Tensor:
    """Blocks by the number of tiles they visit, most first (ties in block order), per mask (batch, head):
    the kernels' ``heavy_first`` schedule."""
    work = full_num.long() + part_num.long()
    return torch.argsort(work, dim=-1, descending=True, stable=True).to(torch.int32).contiguous()


def _schedule(bm: BlockMask) -> tuple:
    """``(order, order_t, walks)``: the forward's query blocks and the dK/dV pass's key blocks heaviest first, and
    the walks' lengths from which each launch decides its order (``MaskArgs.head_major``). Reading them back to the
    host is what a traced call cannot do: its ``walks`` are None (a BlockMask made by an eager call keeps the eager
    lengths)."""
    walks = None
    counts = [full[0].long() + part[0].long() for full, part in ((bm.full_kv, bm.partial_kv),
                                                                  (bm.full_q, bm.partial_q))]
    if not torch.compiler.is_compiling() and all(c.numel() for c in counts):
        walks = tuple(torch.stack([x for c in counts for x in (c.amax().double(), c.double().mean())]).tolist())
    return _heaviest_first(bm.full_kv[0], bm.partial_kv[0]), _heaviest_first(bm.full_q[0], bm.partial_q[0]), walks


def _layout_decided_by_blocks(terms: Terms, bm: BlockMask, q_pos, kv_pos) -> bool:
    """Whether the pattern is a block layout alone whose cells hold whole BlockMask blocks: every block is then
    full or empty, and the kernels need no term at all (block-sparse is a plain walk of full blocks). The layout
    term's loads had split the walk in two loops and its shared memory kept the 128 x 128 tile from fitting
    (1.43 ms at density 0.1, 2 x 16k on the H100, against 1.12 before the term). Not with other terms OR-ed in
    (a full block at the keys' end is masked by the terms, and would lose the pairs only its cell keeps), causal
    or documents AND-ed (partial blocks), or permuted positions."""
    cell = terms.layout_block
    return (terms.layout is not None and terms.lo > terms.hi and terms.prefix == 0 and terms.q_prefix == 0
            and terms.flags is None and not terms.and_causal and terms.doc_ids is None and q_pos is None
            and kv_pos is None and cell % bm.block_q == 0 and cell % bm.block_kv == 0
            and bm.q_offset % bm.block_q == 0)


def _make_block_mask_args(bm: BlockMask, q_pos, kv_pos) -> MaskArgs:
    if bm.block_q % 16 or bm.block_kv % 32:
        raise ValueError(f"mask: the flash kernels need BlockMask blocks that are multiples of 16 (queries) and "
                         f"32 (keys), got {bm.block_q}x{bm.block_kv}")
    if "flash_terms" not in bm._cache:
        # once per BlockMask: recognising global tokens reads their positions back from the device
        terms = kernel_terms(bm.pattern)
        if terms is not None:
            doc, layout = terms.doc_ids, terms.layout
            terms = replace(terms, doc_ids=None if doc is None else doc.to(torch.int32).contiguous(),
                            layout=None if layout is None else layout.to(torch.int8).contiguous())
        bm._cache["flash_terms"] = terms
    terms = bm._cache["flash_terms"]
    if terms is not None and _layout_decided_by_blocks(terms, bm, q_pos, kv_pos):
        # the keys' last tile is still masked (its blocks' ends): by the lengths alone
        terms = Terms(lo=-BAND_INF, hi=BAND_INF)
    tile_of = bits = None
    if terms is None:
        tile_of, bits = bitmask_tiles(bm, q_pos, kv_pos)
        terms = Terms(lo=-BAND_INF, hi=BAND_INF)
    lo, hi = terms.band
    order, order_t, walks = _schedule(bm)
    return MaskArgs(use_list=True, lists=(*bm.full_kv, *bm.partial_kv), lists_t=(*bm.full_q, *bm.partial_q),
                    order=order, order_t=order_t, walks=walks,
                    tile_of=tile_of, bits=bits, doc_ids=terms.doc_ids,
                    q_pos=None if q_pos is None else q_pos.to(torch.int32).contiguous(),
                    kv_pos=None if kv_pos is None else kv_pos.to(torch.int32).contiguous(),
                    band_lo=lo, band_hi=hi, prefix=terms.prefix, mbq=bm.block_q, mbk=bm.block_kv,
                    q_prefix=terms.q_prefix, flags=terms.flags, layout=terms.layout,
                    layout_block=max(terms.layout_block, 1), and_causal=terms.and_causal)


def flash_attention_masked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask | None,
                           scale: float, softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                           q_pos: torch.Tensor | None = None, kv_pos: torch.Tensor | None = None,
                           deterministic: bool = False,
                           backward_block_mask: BlockMask | None = None,
                           dropout=None, into=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention under a prebuilt BlockMask (None: every pair); returns ``(out, lse)``.

    ``q_pos`` (seq_q,) / ``kv_pos`` (seq_kv,) are the positions that the pattern's terms and ALiBi see; the
    BlockMask must have been built for them (as for ``attention_reference``). ``backward_block_mask``: the same
    pattern at another block size for the eager backward pass (traced calls keep ``block_mask``). ``dropout``:
    ``(p, rng)`` (``subquad.ops.softmax.dropout.new_rng``) or None. ``into``: ``(out, lse)`` of these queries
    over pairs that ``block_mask`` does not keep, which the call goes on from and returns, updated in place:
    the union's result without a second output and a merge; not differentiable. Arguments are assumed checked.
    """
    _check_dtype(q)
    if block_mask is None and q_pos is None and kv_pos is None:
        m = _band_args(-BAND_INF, BAND_INF)
    else:
        if block_mask is None:
            # positions without a pattern (a plan's global rows): the full pattern's BlockMask, cached on it per
            # shape (built on every call, it was a dozen small launches each time)
            block = _mask_block(q.device)
            block_mask = _masks.resolve(_masks.full, causal=False, batch=1, heads=1, seq_q=q.shape[1],
                                        seq_kv=k.shape[1], device=q.device, block_q=block, block_kv=block)
        m = _block_mask_args(block_mask.to(q.device), q_pos, kv_pos)
    m_backward = None
    if backward_block_mask is not None and backward_block_mask is not block_mask:
        m_backward = _block_mask_args(backward_block_mask.to(q.device), q_pos, kv_pos)
    return run(_prep(q), _prep(k), _prep(v), m, scale, softcap, alibi_slopes, deterministic, m_backward, dropout,
               into)


def flash_attention_lsh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, scale: float,
                        q_pos: torch.Tensor, kv_pos: torch.Tensor, windows: LshWindows,
                        deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over LSH's sorted rounds (``subquad.ops.lsh.flash``); returns ``(out, lse)``, differentiable in
    q, k, v. The batch elements are (sequence, head, round) triples, each sorted by bucket: ``q_pos`` / ``kv_pos``
    ``(batch, seq)`` their tokens' original positions (which ``block_mask``'s pattern, causal or full, sees),
    ``block_mask`` the blocks of every element's chunks (the same for all), ``windows`` the chunks of each round.
    Made per call, the positions are not kept on the BlockMask."""
    _check_dtype(q)
    m = replace(_make_block_mask_args(block_mask.to(q.device), q_pos, kv_pos), lsh=windows)
    return run(_prep(q), _prep(k), _prep(v), m, scale, None, None, deterministic)


def flash_attention_with_columns(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first, kv_index: torch.Tensor,
                                 columns: BlockMask, q_pos: torch.Tensor, kv_pos: torch.Tensor,
                                 band2: tuple[int, int], scale: float, softcap: float | None = None,
                                 alibi_slopes: torch.Tensor | None = None,
                                 kv_stride: tuple[int, int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the keys that ``first`` keeps (a BlockMask, or a band ``(lo, hi)`` on natural positions)
    together with the key columns ``kv_index`` (gathered into a compact second key set at positions ``kv_pos``,
    kept where ``lo2 <= q_pos - k_pos <= hi2``; ``columns``: its BlockMask at ``q_pos``/``kv_pos``, which the
    backward walks), in one forward launch; returns ``(out, lse)``, differentiable in q, k, v. The two key sets
    must not share a pair (a plan's local and columns components do not). ``kv_stride``: ``(first, width,
    period)`` where ``kv_index`` is whole periods of consecutive keys (``Component.kv_stride``)."""
    _check_dtype(q)
    m = _band_args(*first) if isinstance(first, tuple) else _block_mask_args(first.to(q.device), None, None)
    m2 = _block_mask_args(columns.to(q.device), q_pos, kv_pos)
    band2 = (max(band2[0], -BAND_INF), min(band2[1], BAND_INF))
    return FlashWithColumns.apply(_prep(q), _prep(k), _prep(v), kv_index.to(q.device), kv_stride, m, m2, band2,
                                  float(scale), softcap or None, alibi_slopes)


def flash_attention_given_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, forward, mask: Pattern,
                                  scale: float, softcap: float | None = None,
                                  alibi_slopes: torch.Tensor | None = None,
                                  deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``forward(q, k, v) -> (out, lse)``, computed by another route over exactly the pairs of ``mask`` (on
    natural positions), differentiated as one flash backward pass of ``mask`` at the backward's block size."""
    _check_dtype(q)
    bsz, seq_q, hq, _ = q.shape
    _, backward_mask = _resolve_tiled(mask, False, bsz, hq, seq_q, k.shape[1], q.device)
    m = _block_mask_args(backward_mask.to(q.device), None, None)
    return GivenForward.apply(_prep(q), _prep(k), _prep(v), forward, m, float(scale), softcap or None, alibi_slopes,
                              bool(deterministic))


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                    scale: float | None = None, softcap: float | None = None,
                    alibi_slopes: torch.Tensor | None = None,
                    deterministic: bool = False, dropout=None, into=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``subquad.attention``'s Triton path (arguments checked by the caller); returns ``(out, lse)``.
    ``dropout``: ``(p, rng)`` or None; ``into``: as ``flash_attention_masked``'s."""
    _check_dtype(q)
    bsz, seq_q, hq, d = q.shape
    seq_kv = k.shape[1]
    scale = d ** -0.5 if scale is None else scale
    if mask is None or isinstance(mask, Pattern):
        pattern = mask
        if causal:
            pattern = _masks.causal if mask is None else _masks.and_causal(mask)
        band = pure_band(pattern)
        if band is not None:
            return run(_prep(q), _prep(k), _prep(v), _band_args(*band), scale, softcap, alibi_slopes, deterministic,
                       dropout=dropout, into=into)
    forward_mask, backward_mask = _resolve_tiled(mask, causal, bsz, hq, seq_q, seq_kv, q.device)
    return flash_attention_masked(q, k, v, forward_mask, scale, softcap, alibi_slopes, deterministic=deterministic,
                                  backward_block_mask=backward_mask, dropout=dropout, into=into)


def varlen_mask(cu_seqlens: torch.Tensor, total: int | None = None) -> Pattern:
    """The ``document`` pattern of packed sequences given FlashAttention-style ``cu_seqlens`` (``(n + 1,)``,
    starting at 0); tokens past the last boundary form one more document."""
    cu = torch.as_tensor(cu_seqlens).long()
    if cu.dim() != 1 or cu.numel() < 2 or int(cu[0]) != 0 or bool((cu[1:] < cu[:-1]).any()):
        raise ValueError(f"cu_seqlens: expected a non-decreasing (num_seqs + 1,) tensor starting at 0, got "
                         f"{cu.tolist() if cu.numel() < 20 else tuple(cu.shape)}")
    total = int(cu[-1]) if total is None else total
    ids = torch.searchsorted(cu[1:], torch.arange(total, device=cu.device), right=True)
    return _masks.document(ids)


__all__ = ["flash_attention", "flash_attention_masked", "flash_attention_lsh", "flash_attention_with_columns",
           "varlen_mask", "LshWindows"]
