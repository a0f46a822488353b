"""Launching the flash kernels: strides, grids, schedules and the forward / backward entry points on plain
tensors; the tiles are the autotuner's (``tuning``), or small ones in the interpreter."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...chained import chains_replicate
from ...grid import cdiv, launch_split, next_power_of_2, num_sms
from ..lse_merge import merge_lse_stacked
from . import schedule, tuning
from .backward import flash_bwd_kernel, flash_bwd_preprocess_kernel
from .forward import flash_fwd_kernel
from .lsh_windows import LshWindows
from .masking import BAND_INF
from .tuning import (_dq_by_tma, _dq_tiles, _fit, _kernel, _tma_allocator, interpreting, tune_bucket, tune_walk,
                     widest_key_tile)

LOG2E = 1.4426950408889634

# the interpreter: small tiles, so that small test shapes still cross several tiles
INTERPRET_FWD = (32, 16)
INTERPRET_BWD = (16, 32)
INTERPRET_WARPS = 4     # the interpreter's launches leave num_warps at Triton's default: UNCHAIN's rule takes it


@dataclass
class MaskArgs:
    """Everything the kernels read about the pattern, as tensors and numbers (see ``tile.py``)."""

    use_list: bool
    lists: tuple | None          # (full_num, full_idx, part_num, part_idx) per query block
    lists_t: tuple | None        # the same per key block (dK/dV pass)
    tile_of: torch.Tensor | None
    bits: torch.Tensor | None
    doc_ids: torch.Tensor | None
    q_pos: torch.Tensor | None
    kv_pos: torch.Tensor | None
    band_lo: int
    band_hi: int
    prefix: int
    mbq: int
    mbk: int
    q_prefix: int = 0
    flags: torch.Tensor | None = None    # int8 per position: global key (bit 0) / global query (bit 1)
    layout: torch.Tensor | None = None   # int8 (Lb, Lh, q_cells, kv_cells) block layout
    layout_block: int = 1
    and_causal: bool = False
    #: BlockMask blocks heaviest first, per mask (batch, head): ``order`` the query blocks (forward, dQ programs),
    #: ``order_t`` the key blocks (dK/dV); both or neither; None runs them in the grid's order (``tile.heavy_first``)
    order: torch.Tensor | None = None
    order_t: torch.Tensor | None = None
    #: the walks' lengths in blocks, ``(forward longest, forward mean, dK/dV longest, dK/dV mean)``, read back once
    #: per MaskArgs; None (a traced call's, which cannot read them) takes the heads-fastest order: ``head_major``
    walks: tuple | None = None
    #: cut the longest walks into pieces (``pieces``, ``pieces_t``): the schedule is made once per MaskArgs and
    #: reads walk lengths back to the host, so the custom op, whose MaskArgs are new on every call, does not
    cut_walks: bool = True
    #: Reformer's hash rounds folded into the batch (positions then ``(batch, seq)``), or None
    lsh: LshWindows | None = None
    _pieces: dict = field(default_factory=dict)
    _piece_rows: dict = field(default_factory=dict)

    def __post_init__(self):
        if (self.order is None) != (self.order_t is None):
            raise ValueError("order, order_t: expected both or neither (the backward's programs take one schedule)")
        if len({p.dim() for p in (self.q_pos, self.kv_pos) if p is not None}) > 1:
            raise ValueError("q_pos, kv_pos: expected both (seq,) or both (batch, seq)")

    @property
    def batch_pos(self) -> bool:
        """A row of positions per batch element (``tile.batch_rows``)."""
        return any(p is not None and p.dim() == 2 for p in (self.q_pos, self.kv_pos))

    def head_major(self, backward: bool, rows: int, sms: int) -> bool:
        """Whether a pass over ``rows`` (batch, head) pairs on ``sms`` SMs takes its order head by head
        (``tile.heavy_first``'s ``HEAD_MAJOR``: neighbouring programs read one head's keys, which stay in L2, and
        no walk is cut): where no block walks ``HEAVY_WALK`` times the mean, and the longest walk is at most
        ``TAIL_SHARE`` of the mean work an SM gets. ``backward``: the dK/dV pass's key-block walks."""
        if self.walks is None or self.order is None:
            return False
        longest, mean = self.walks[2:] if backward else self.walks[:2]
        per_sm = mean * rows * (self.order_t if backward else self.order).shape[-1] / sms
        return longest <= schedule.HEAVY_WALK * mean and longest <= schedule.TAIL_SHARE * per_sm

    def pieces_t(self, programs: int, sms: int, load: float | None = None):
        """The dK/dV pass's schedule with its longest walks cut into pieces (``walk_pieces``), or None; made
        on the first backward of a grid (it reads the walk lengths back to the host) and kept. ``load``:
        ``PIECE_LOAD`` unless given."""
        load = schedule.PIECE_LOAD if load is None else load
        return self._walk_pieces(f"dkdv{load}", self.lists_t, programs, sms, load, None)

    def pieces(self, programs: int, sms: int):
        """The forward's schedule with its longest query-block walks cut into pieces, or None (as ``pieces_t``)."""
        return self._walk_pieces("fwd", self.lists, programs, sms, schedule.FWD_PIECE_LOAD,
                                 schedule.FWD_MOST_PIECES)

    def _walk_pieces(self, kind: str, lists, programs: int, sms: int, load: float, most: int | None):
        key = (kind, programs, sms)
        if key not in self._pieces:
            self._pieces[key] = () if lists is None else schedule.walk_pieces(lists[0], lists[2], programs, sms,
                                                                               load, most)
        return self._pieces[key] or None

    def piece_rows(self, blocks: torch.Tensor, seq: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of the pieced ``blocks`` (of ``size`` rows) that exist (< ``seq``), and their places in the
        blocks' buffer."""
        hit = self._piece_rows.get((size, seq))
        if hit is None or hit[0] is not blocks:
            every = (blocks.cpu()[:, None] * size + torch.arange(size)).flatten()
            kept = torch.nonzero(every < seq).flatten()
            hit = self._piece_rows[size, seq] = (blocks, every[kept].to(blocks.device), kept.to(blocks.device))
        return hit[1:]

    @property
    def band(self) -> bool:
        return (self.band_lo > -BAND_INF or self.band_hi < BAND_INF or self.prefix > 0 or self.q_prefix > 0
                or self.flags is not None or self.layout is not None or self.and_causal)


_DUMMIES: dict = {}


def _dummy(device, dtype=torch.int32) -> torch.Tensor:
    """A one-element stand-in for a pointer argument that the kernel's switches never read, made once per
    (device, dtype): made per call it was two extra launches (a fill, a cast) per forward on CUDA."""
    key = (str(device), dtype)
    hit = _DUMMIES.get(key)
    if hit is None:
        hit = _DUMMIES[key] = torch.zeros(1, dtype=dtype, device=device)
    return hit


def _mask_kernel_args(m: MaskArgs, lists, device):
    d = _dummy(device)
    full_num, full_idx, part_num, part_idx = lists if lists is not None else (d, d, d, d)
    doc = m.doc_ids if m.doc_ids is not None else d
    args = [full_num, full_idx, part_num, part_idx, m.tile_of if m.tile_of is not None else d,
            m.bits if m.bits is not None else d, doc, m.q_pos if m.q_pos is not None else d,
            m.kv_pos if m.kv_pos is not None else d, m.flags if m.flags is not None else d,
            m.layout if m.layout is not None else d]
    return args, ((full_idx.shape[-1], part_idx.shape[-1]) if lists is not None else (1, 1))


def _wide_rows(*tensors) -> bool:
    """Whether a row's offset inside a (batch, head) slice reaches 2^31 elements (``tile.tile_rows``)."""
    return max(t.shape[1] * t.stride(1) for t in tensors if t is not None) >= 2 ** 31


def _row_stride(m: MaskArgs, *tensors) -> int:
    """The row stride (``stride(1)``) that ``tensors`` share, which a band walk's kernels take as a constant
    (``KV_ROWS``, ``Q_ROWS``; one compile per layout) to address a tile's rows by immediates (H100, 2 x 16k
    forward: window 1.04-1.07x, full 1.02x). 0, read at run time, where the strides differ and on BlockMask walks,
    which lost with it (block-sparse 0.94x; ``2026-12-07-row-strides-ab*-h100.json``)."""
    strides = {t.stride(1) for t in tensors}
    return strides.pop() if len(strides) == 1 and not m.use_list else 0


def _common_flags(m: MaskArgs, seq_q: int, seq_kv: int, softcap, slopes, *tensors):
    even = 128 if not m.use_list else max(128, m.mbq), 128 if not m.use_list else max(128, m.mbk)
    flags = dict(
        WIDE_ROWS=_wide_rows(*tensors),
        EVEN_Q=seq_q % even[0] == 0 and (not m.use_list or seq_q % m.mbq == 0),
        EVEN_KV=seq_kv % even[1] == 0 and (not m.use_list or seq_kv % m.mbk == 0),
        USE_LIST=m.use_list, BAND=m.band, PREFIX=m.prefix > 0, Q_PREFIX=m.q_prefix > 0,
        HAS_FLAGS=m.flags is not None, HAS_LAYOUT=m.layout is not None, AND_CAUSAL=m.and_causal,
        DOC=m.doc_ids is not None,
        USE_BITS=m.bits is not None, HAS_Q_POS=m.q_pos is not None, HAS_KV_POS=m.kv_pos is not None,
        SOFTCAP=softcap is not None, ALIBI=slopes is not None,
        MBQ=m.mbq if m.use_list else 128, MBK=m.mbk if m.use_list else 128,
        tune_kv=tune_bucket(seq_kv),
        tune_walk=0 if m.use_list else tune_walk(m.band_lo, m.band_hi, seq_kv),
    )
    if m.batch_pos:     # (only when on: ordinary launches keep their arguments as they were)
        flags["BATCH_POS"] = True
    return flags


def _score_scales(scale: float, softcap):
    if softcap is None:
        return scale * LOG2E, 1.0
    return scale / softcap, softcap * LOG2E


def _block_counts(m: MaskArgs, seq_q: int, seq_kv: int):
    return -(-seq_q // m.mbq), -(-seq_kv // m.mbk)


def _slopes(slopes, batch, device):
    if slopes is None:
        return _dummy(device, torch.float32), 0
    s = slopes.float().contiguous()
    return s, (s.shape[1] if s.dim() == 2 and s.shape[0] == batch and batch > 1 else 0)


def _doc_stride(m: MaskArgs):
    if m.doc_ids is None or m.doc_ids.shape[0] == 1:
        return 0
    return m.doc_ids.stride(0)


def _layout_strides(m: MaskArgs):
    """Batch, head and row strides of the layout grid (0 where one grid serves every batch / head)."""
    if m.layout is None:
        return [0, 0, 0]
    lay = m.layout
    return [lay.stride(0) if lay.shape[0] > 1 else 0, lay.stride(1) if lay.shape[1] > 1 else 0, lay.stride(2)]


def _lsh_args(m: MaskArgs, meta: dict, device) -> list:
    """The kernels' ``LSH_Q_CHUNK, LSH_K_CHUNK``; sets ``LSH`` in ``meta`` (a tuning key: LSH's masked tiles are
    no other pattern's), and where ``m`` has hash rounds ``LSH_EARLIER`` (the rounds before the last, each a
    row of the chunk tables), ``LSH_CHUNK`` (0 where the BlockMask's blocks are whole chunks) and
    ``LSH_NOT_SELF``."""
    meta["LSH"] = m.lsh is not None
    if m.lsh is None:
        return [_dummy(device), _dummy(device)]
    if m.lsh.chunk % m.mbq or m.lsh.chunk % m.mbk:
        meta["LSH_CHUNK"] = m.lsh.chunk
    if m.lsh.not_self:
        meta["LSH_NOT_SELF"] = True
    if m.lsh.rounds == 1:       # (its tables are empty: never read)
        return [_dummy(device), _dummy(device)]
    meta["LSH_EARLIER"] = m.lsh.rounds - 1
    return [m.lsh.q_chunk, m.lsh.k_chunk]


def _term_scalars(m: MaskArgs):
    """``q_prefix, n_flags, lay_block`` after ``prefix`` in the kernels' arguments."""
    return [m.q_prefix, m.flags.numel() if m.flags is not None else 0, m.layout_block]


def _tiles(seq: int, n_blocks: int, mask_block: int, ordered: bool):
    """Kernel tiles along a sequence, as a function of the tile size: ordered by ``heavy_first``, every block
    of the BlockMask holds a whole number of them (tiles past the end store nothing)."""
    if ordered:
        return lambda tile: n_blocks * (mask_block // tile)
    return lambda tile: cdiv(seq, tile)


def _second_source_args(second, device) -> list:
    if second is None:
        d = _dummy(device)
        return [d, d, d, 0, 0, 0, 0, 0, 0, 0, 0, 0, d, d, d, d, 1, 1, 1, 1]
    k2, v2, m2, lo, hi = second
    full_num, full_idx, part_num, part_idx = m2.lists
    return [k2, v2, m2.kv_pos, k2.stride(0), k2.stride(1), k2.stride(2), v2.stride(0), v2.stride(1), v2.stride(2),
            k2.shape[1], lo, hi, full_num, full_idx, part_num, part_idx, full_idx.shape[-1], part_idx.shape[-1],
            full_num.shape[0], full_num.shape[1]]


def _second_source_meta(meta: dict, m: MaskArgs, second) -> None:
    """The switches of a launch whose query tiles walk ``second``'s keys after ``m``'s (``TWO_SOURCES``)."""
    m2 = second[2]
    if not m.use_list:
        # a band first source has no blocks of its own: the block sizes are the second source's lists'
        meta["MBQ"], meta["MBK"] = m2.mbq, m2.mbk
    if (m2.mbq, m2.mbk) != (meta["MBQ"], meta["MBK"]):
        raise ValueError(f"columns: expected BlockMask blocks of {meta['MBQ']}x{meta['MBK']} (the first key "
                         f"set's), got {m2.mbq}x{m2.mbk}")
    meta["TWO_SOURCES"] = True
    meta["EVEN_KV2"] = second[0].shape[1] % m2.mbk == 0
    meta["ONE_BLOCK2"] = second[0].shape[1] <= m2.mbk


def _dropout_args(dropout, meta: dict, device) -> list:
    """The kernels' ``RNG, dropout_p`` for ``dropout``: ``(p, rng)`` (``subquad.ops.softmax.dropout.new_rng``)
    or None; sets ``DROPOUT`` in ``meta`` when on."""
    if dropout is None or dropout[0] == 0:
        return [_dummy(device, torch.int64), 0.0]
    meta["DROPOUT"] = True
    return [dropout[1], float(dropout[0])]


def forward(q, k, v, m: MaskArgs, scale: float, softcap, slopes, second=None, dropout=None, into=None):
    """``(out, lse)`` for contiguous-last-dim (B, N, H, D) tensors. ``second``: ``(k2, v2, m2, band2_lo,
    band2_hi)``, a second key set in the same launch with its BlockMask arguments ``m2`` (at its key positions,
    in blocks of the first source's size) (``forward.py``'s ``TWO_SOURCES``; its gradients:
    ``backward_two_sources``). A query block whose walk outlasts the pass (``MaskArgs.pieces``) runs as
    pieces in the same launch, heaviest first, their partial results merged by LSE afterwards. ``dropout``:
    ``(p, rng)``, attention dropout (not with ``second``). ``into``: ``(out, lse)`` of these rows over other
    pairs, which the launch goes on from and returns, updated in place (``SEEDED``; not with dropout)."""
    if second is not None and dropout is not None:
        raise ValueError("dropout: not with a second key set (a gathered key's dropout counter would move)")
    if into is not None and dropout is not None:
        raise ValueError("dropout: not with into (the seed's probabilities were not dropped by this launch)")
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv, dv = k.shape[1], k.shape[2], v.shape[3]
    if into is None:
        out = torch.empty(bsz, seq_q, hq, dv, dtype=q.dtype, device=q.device)
        lse = torch.empty(bsz, hq, seq_q, dtype=torch.float32, device=q.device)
    else:
        out, lse = into
        if out.shape != (bsz, seq_q, hq, dv) or out.dtype != q.dtype or out.stride(-1) != 1:
            raise ValueError(f"into: expected an output of shape {(bsz, seq_q, hq, dv)}, {q.dtype}, contiguous "
                             f"in its last dim, got {tuple(out.shape)}, {out.dtype}")
        if lse.shape != (bsz, hq, seq_q) or lse.dtype != torch.float32 or not lse.is_contiguous():
            raise ValueError(f"into: expected a contiguous float32 LSE of shape {(bsz, hq, seq_q)}, got "
                             f"{tuple(lse.shape)}, {lse.dtype}")
    mask_args, widths = _mask_kernel_args(m, m.lists, q.device)
    n_qb, n_kb = _block_counts(m, seq_q, seq_kv)
    mb, mh = (m.lists[0].shape[0], m.lists[0].shape[1]) if m.lists is not None else (1, 1)
    sl, sl_stride = _slopes(slopes, bsz, q.device)
    qk_scale, cap_scale = _score_scales(scale, softcap)
    args = [q, k, v, out, lse, *mask_args, sl,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), sl_stride,
            _doc_stride(m), *_layout_strides(m), seq_q, seq_kv, seq_kv - seq_q, qk_scale, cap_scale, m.band_lo,
            m.band_hi, m.prefix, *_term_scalars(m), *widths, n_qb, n_kb, mb, mh, *_second_source_args(second, q.device)]
    meta = dict(HQ=hq, G=hq // hkv, D=d, DV=dv, BLOCK_D=next_power_of_2(d),
                BLOCK_DV=next_power_of_2(dv), KV_ROWS=_row_stride(m, k, v),
                **_common_flags(m, seq_q, seq_kv, softcap, slopes, q, k, v, out))
    # (a second key set would be walked whole by every piece)
    head_major = m.head_major(False, bsz * hq, num_sms(q.device))
    pieces = m.pieces(bsz * hq, num_sms(q.device)) if second is None and m.order is not None and m.cut_walks \
        and not head_major else None
    no_float = _dummy(q.device, torch.float32)
    order = m.order if m.order is not None else _dummy(q.device)
    walk_args = [order, n_qb, 1 << 30, _dummy(q.device), no_float, no_float, 0, 1]
    if pieces is not None:
        whole, cut_items, piece_len, blocks, slot, n_pieces = pieces
        order = torch.cat([cut_items, whole], -1)       # every piece weighs piece_len, every whole walk at most that
        cut_rows = blocks.numel() * meta["MBQ"]
        o_part = torch.zeros(bsz, n_pieces, cut_rows, hq, dv, dtype=torch.float32, device=q.device)
        lse_part = torch.full((bsz, n_pieces, hq, cut_rows), float("-inf"), device=q.device)
        walk_args = [order, order.shape[-1], piece_len, slot, o_part, lse_part, blocks.numel(), n_pieces]
        meta["PIECES"] = True
    args += walk_args + _dropout_args(dropout, meta, q.device) + _lsh_args(m, meta, q.device)
    if second is not None:
        _second_source_meta(meta, m, second)
    if m.order is not None:
        meta["ORDERED"], meta["HEAD_MAJOR"] = True, head_major
    meta["tail_heads"] = schedule.tail_heads(walk_args[1], bsz * hq, num_sms(q.device)) if head_major else 1
    if into is not None:
        meta["SEEDED"] = True
    args.append(bsz * hq)       # n_rows: the grid's rows, over all the launches of a split grid
    tiles = _tiles(seq_q, walk_args[1], meta["MBQ"], m.order is not None)
    kern = _kernel("fwd" if into is None else "fwd_seeded", flash_fwd_kernel)
    if kern is None:
        bm_, bn_ = (_fit(INTERPRET_FWD[0], meta["MBQ"]), _fit(INTERPRET_FWD[1], meta["MBK"]))
        launch_split(flash_fwd_kernel, lambda n: (tiles(bm_), n), bsz * hq, *args, BLOCK_M=bm_, BLOCK_N=bn_,
                     UNCHAIN=chains_replicate(bm_, INTERPRET_WARPS), OVERLAP=bool(tuning.FWD_OVERLAP),
                     RAW_MAX=tuning.raw_max({**meta, "qk_scale": qk_scale}), flag="SPLIT_GRID", **meta)
    else:
        launch_split(kern, lambda n: lambda c: (tiles(c["BLOCK_M"]), n), bsz * hq, *args, flag="SPLIT_GRID",
                     **meta)
    if pieces is not None:
        _merge_pieces(out, lse, o_part, lse_part, *m.piece_rows(blocks, seq_q, meta["MBQ"]))
    return out, lse


def _merge_pieces(out, lse, o_part, lse_part, rows, kept):
    """The rows of the forward's cut query blocks from their pieces' partial results (``o_part`` (B, pieces,
    cut rows, H, Dv), ``lse_part`` (B, pieces, H, cut rows); a piece that a block did not have is -inf):
    ``out = sum_p exp(lse_p - lse) out_p`` with ``lse = logsumexp_p lse_p``, into ``rows`` of ``out`` and
    ``lse`` (``kept``: those rows' places among the cut rows)."""
    if kept.numel() < o_part.shape[2]:      # (a ragged last block's rows past the sequence)
        o_part, lse_part = o_part.index_select(2, kept), lse_part.index_select(3, kept)
    merged, merged_lse = merge_lse_stacked(o_part, lse_part, out.dtype)
    out.index_copy_(1, rows, merged)
    lse.index_copy_(2, rows, merged_lse)


def _preprocess(do, out, lse, dlse):
    """``(delta, lse2)`` per query row (fp32, the shape of ``lse``): ``delta = rowsum(dO * O) - dlse`` and the LSE
    as the backward's exponentials take it (base 2, ``+inf`` for a row that saw no key)."""
    bsz, seq_q, hq, dv_dim = out.shape
    delta = torch.empty_like(lse)
    lse2 = torch.empty_like(lse)
    pre_rows = 64 if interpreting() else 128
    if dlse is not None:
        dlse = dlse.float().contiguous()
    launch_split(flash_bwd_preprocess_kernel, lambda n: (cdiv(seq_q, pre_rows), n), bsz * hq,
                 out, do, dlse if dlse is not None else delta, delta, lse, lse2, out.stride(0), out.stride(1),
                 out.stride(2), do.stride(0), do.stride(1), do.stride(2), seq_q, HQ=hq, DV=dv_dim,
                 BLOCK_DV=next_power_of_2(dv_dim), BLOCK_M=pre_rows, HAS_DLSE=dlse is not None, flag="SPLIT_GRID")
    return delta, lse2


#: query rows that a split of the dK/dV walk holds at least (``_query_splits``); 32 in the interpreter, whose
#: query tiles are 16 rows
SPLIT_MIN_ROWS = 1024


def _query_splits(key_tiles: int, seq_q: int, device: torch.device) -> int:
    """Programs per key tile in the dK/dV pass: 1 while the key tiles fill the GPU; else a power of two that
    brings the grid to about one program per SM (one fits at a time: 230 KB of shared memory), each split
    walking every n-th query tile. At 2 x 16k the strided pattern's 64 gathered columns per head are one key
    tile: 32 programs walked 16k queries each while 100 SMs idled."""
    sms = num_sms(device)
    least = 32 if interpreting() else SPLIT_MIN_ROWS
    splits = 1
    while key_tiles * splits * 2 <= sms and seq_q // (splits * 2) >= least:
        splits *= 2
    return splits


def _backward_head_major(m: MaskArgs, bsz: int, hq: int, hkv: int, atomic: bool, device) -> bool:
    """The backward's ``HEAD_MAJOR`` (one for its dK/dV programs and, without ``atomic``, its dQ programs, which
    walk the forward's query blocks)."""
    sms = num_sms(device)
    return m.head_major(True, bsz * hkv, sms) and (atomic or m.head_major(False, bsz * hq, sms))


def _backward_launch(q, k, v, do, lse2, delta, dq, m: MaskArgs, scale: float, softcap, slopes, atomic: bool,
                     dropout=None, dq_in=None, dq_store: bool = False, second=None, dq_dkdv: bool = False):
    """One key set's backward launch; returns dk, dv. ``lse2``: the forward's LSE in base 2 (``_preprocess``). dQ:
    with ``atomic`` its dK/dV programs add it into ``dq`` (fp32, zeroed); with ``dq_store`` (``_dq_stored``) they
    store it into ``dq``; otherwise dQ programs in the same grid write it into ``dq`` (the query's dtype, or fp32),
    each row's sum in one fixed order, starting from ``dq_in``'s where given (fp32, ``dq``'s strides: another key
    set's dQ), and going on over ``second``'s keys where given (``forward``'s ``second``: backward.py's
    ``TWO_SOURCES``). ``dq`` None: no dQ at all (another launch's dQ programs walked these keys as its ``second``).
    ``dq_dkdv`` (``_dkdv_by_dq_programs``): the dQ programs alone, storing dK/dV too (backward.py's ``DQ_DKDV``)."""
    dq_programs = dq is not None and not atomic and not dq_store
    if dq_in is not None and (not dq_programs or dq_in.stride() != dq.stride()):
        raise ValueError("dq_in: an fp32 tensor with dq's strides, for a launch with dQ programs")
    if second is not None and not dq_programs:
        raise ValueError("second: a second key set is walked by dQ programs only")
    if dq_dkdv and not (dq_programs and dropout is None and _dkdv_by_dq_programs(m, q, k)):
        raise ValueError("dq_dkdv: a launch with dQ programs, no dropout, over a BlockMask whose key blocks are "
                         "each listed once, heads not grouped")
    bsz, seq_q, hq, d = q.shape
    seq_kv, hkv, dv_dim = k.shape[1], k.shape[2], v.shape[3]
    # a deterministic backward keeps one program per key tile (its sums in one fixed order)
    splits = _query_splits(bsz * hkv * cdiv(seq_kv, 128), seq_q, q.device) if atomic or dq is None else 1
    head_major = _backward_head_major(m, bsz, hq, hkv, not dq_programs, q.device)
    pieces = None
    if atomic and splits == 1 and m.order_t is not None and m.cut_walks and not head_major:
        pieces = m.pieces_t(bsz * hkv, num_sms(q.device))
    if splits > 1:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    else:
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
    sl, sl_stride = _slopes(slopes, bsz, q.device)
    qk_scale, cap_scale = _score_scales(scale, softcap)
    n_qb, n_kb = _block_counts(m, seq_q, seq_kv)
    mb, mh = (m.lists[0].shape[0], m.lists[0].shape[1]) if m.lists is not None else (1, 1)
    flags = _common_flags(m, seq_q, seq_kv, softcap, slopes, q, k, v, do, dq, dk, dv)
    mask_args_t, widths_t = _mask_kernel_args(m, m.lists_t, q.device)
    mask_args_q, widths_q = _mask_kernel_args(m, m.lists if dq_programs else None, q.device)
    q_rows = _row_stride(m, q, do, *([] if dq is None else [dq]))
    if dq is None:
        dq = _dummy(q.device, torch.float32).view(1, 1, 1)
    args = [q, k, v, do, lse2, delta, dq, dq if dq_in is None else dq_in, dk, dv, *mask_args_t, sl,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2), sl_stride, _doc_stride(m), *_layout_strides(m),
            seq_q, seq_kv, seq_kv - seq_q, qk_scale, cap_scale, scale, m.band_lo, m.band_hi, m.prefix,
            *_term_scalars(m), *widths_t, n_qb, n_kb, mb, mh, *_second_source_args(second, q.device)]
    meta = dict(HQ=hq, HKV=hkv, G=hq // hkv, DQ_ATOMIC=atomic, SPLIT_ATOMIC=splits > 1, DQ_PROGRAMS=dq_programs,
                DQ_STORE=dq_store, DQ_SEED=dq_in is not None, TWO_SOURCES=False, DQ_DKDV=dq_dkdv,
                D=d, DV=dv_dim, BLOCK_D=next_power_of_2(d), BLOCK_DV=next_power_of_2(dv_dim),
                Q_ROWS=q_rows, KV_ROWS=_row_stride(m, k, v), **flags)
    if second is not None:
        _second_source_meta(meta, m, second)
        flags["MBQ"], flags["MBK"] = meta["MBQ"], meta["MBK"]
    rng = _dropout_args(dropout, meta, q.device)
    lsh = _lsh_args(m, meta, q.device)
    if atomic and _dq_by_tma(q):
        _tma_allocator()
    if m.order_t is not None:
        meta["ORDERED"], meta["HEAD_MAJOR"] = True, head_major
    kern = _kernel("bwd", flash_bwd_kernel)
    no_float = _dummy(q.device, torch.float32)

    query_tiles = _tiles(seq_q, n_qb, flags["MBQ"], m.order is not None)
    q_order = m.order if m.order is not None and dq_programs else _dummy(q.device)

    def launch_walks(order, n_items, piece_len, slot, acc_k, acc_v, n_slots, **switch):
        key_tiles = _tiles(seq_kv, n_items, flags["MBK"], m.order_t is not None)

        def grid(rows: int):
            def axes(tiles: dict):
                programs = query_tiles(tiles["DQ_BLOCK_M"]) * (hq // hkv) if dq_programs else 0
                return (0 if dq_dkdv else key_tiles(tiles["BLOCK_N"])) + programs, rows, splits
            return axes

        # (n_rows: the grid's rows, over all the launches of a split grid)
        walk_args = args + [order, n_items, piece_len, slot, acc_k, acc_v, n_slots, *mask_args_q[:4], *widths_q,
                            q_order, *rng, *lsh, bsz * hkv]
        if kern is None:
            bm_ = _fit(INTERPRET_BWD[0], flags["MBQ"])
            # (DQ_DKDV: the dQ tile, BLOCK_N rows, a whole query block)
            bn_ = flags["MBK"] if dq_store else flags["MBQ"] if dq_dkdv else _fit(INTERPRET_BWD[1], flags["MBK"])
            tiles = dict(BLOCK_M=bm_, BLOCK_N=bn_, UNCHAIN=chains_replicate(bn_, INTERPRET_WARPS),
                         **_dq_tiles(bm_, bn_, flags["MBQ"], flags["MBK"], INTERPRET_WARPS))
            launch_split(flash_bwd_kernel, lambda n: grid(n)(tiles), bsz * hkv, *walk_args, **tiles, **meta,
                         flag="SPLIT_GRID", **switch)
        else:
            launch_split(kern, grid, bsz * hkv, *walk_args, flag="SPLIT_GRID", **meta, **switch)

    if pieces is None:
        order = m.order_t if m.order_t is not None else _dummy(q.device)
        launch_walks(order, order.shape[-1] if m.order_t is not None else n_kb, 1 << 30, _dummy(q.device),
                     no_float, no_float, 0)
    else:
        # the pieces and the whole walks in one launch, the pieces first (each weighs piece_len, every whole walk
        # at most that): before, the pieces' own launch waited for the whole walks' tail
        whole, cut_items, piece_len, blocks, slot, _ = pieces
        order = torch.cat([cut_items, whole], -1)
        n_slots = blocks.numel()
        acc_k = torch.zeros(bsz, hkv, n_slots, flags["MBK"], d, dtype=torch.float32, device=q.device)
        acc_v = torch.zeros(bsz, hkv, n_slots, flags["MBK"], dv_dim, dtype=torch.float32, device=q.device)
        launch_walks(order, order.shape[-1], piece_len, slot, acc_k, acc_v, n_slots, PIECES=True)
    if splits > 1:
        return dk.to(k.dtype), dv.to(v.dtype)
    if pieces is not None:
        # the pieced blocks' sums into their rows of dK/dV (indices made on the host once: a boolean index
        # here read a count back and stalled the stream)
        rows, kept = m.piece_rows(blocks, seq_kv, m.mbk)
        dk.index_copy_(1, rows, acc_k.permute(0, 2, 3, 1, 4).reshape(bsz, -1, hkv, d).index_select(1, kept)
                       .to(dk.dtype))
        dv.index_copy_(1, rows, acc_v.permute(0, 2, 3, 1, 4).reshape(bsz, -1, hkv, dv_dim).index_select(1, kept)
                       .to(dv.dtype))
    return dk, dv


def _walks_whole(m: MaskArgs, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a backward with dQ programs walks this BlockMask with no piece schedule: always where walks are
    never cut (the custom op's calls, which cannot read walk lengths back), else as the schedule decides for a
    grid that holds the dQ programs too (``DQ_PROGRAMS_LOAD``)."""
    return (not m.cut_walks or m.order_t is None or _backward_head_major(m, q.shape[0], q.shape[2], k.shape[2], True,
                                                                          q.device)
            or m.pieces_t(q.shape[0] * k.shape[2], num_sms(q.device), schedule.DQ_PROGRAMS_LOAD) is None)


def _dq_by_programs(m: MaskArgs, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a backward over these keys takes dQ programs where no determinism is asked (``backward``): a
    band, or a BlockMask walk that no piece schedule cuts."""
    return not m.use_list or _walks_whole(m, q, k)


def _dq_stored(m: MaskArgs, q: torch.Tensor) -> bool:
    """Whether a backward over this BlockMask has its dK/dV programs store dQ (``DQ_STORE``): every query block
    lists one key block (block-diagonal: block-local attention), read from the walks' lengths (a
    traced call has none), and a dK/dV tile holds a whole key block, so that one program alone walks each query
    tile. Neither dQ programs (which compute the scores and dP again) nor atomics then; deterministic too."""
    return (m.use_list and m.walks is not None and m.walks[0] == 1 and m.walks[1] == 1
            and m.mbk <= widest_key_tile(q.shape[3]))


def _dkdv_by_dq_programs(m: MaskArgs, q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether a launch with dQ programs over this BlockMask can have them store dK/dV too (``DQ_DKDV``): every
    query block lists one key block and every key block is listed once (the walks' lengths: the fixed pattern's
    local blocks), a dQ tile can hold a whole query block, and each KV head has one query head; then the dQ
    program of a query block is the only one to see its key block."""
    return (m.use_list and m.walks is not None and tuple(m.walks) == (1, 1, 1, 1) and q.shape[2] == k.shape[2]
            and m.mbq <= widest_key_tile(q.shape[3]))


def backward(do, q, k, v, out, lse, dlse, m: MaskArgs, scale: float, softcap, slopes, deterministic: bool,
             dropout=None):
    """``(dq, dk, dv)``. dQ comes from dQ programs beside the dK/dV programs (no fp32 buffer, no atomics) when
    asked to be deterministic, and otherwise wherever that measured faster than the dK/dV programs' atomic sums,
    although its dQ programs compute the scores and dP again: bands (full, causal, windows; H100, fwd+bwd, against
    the atomics by TMA, ``2026-12-06-band-atomic-ab-h100.json``: full 2 x 16k 36.69 against 38.88 ms, causal
    18.12 against 18.75, window 4096 8.21 against 8.58, causal 32 x 1k 1.73 against 1.94, full 2.62 against 2.91)
    and BlockMask walks that no piece schedule cuts (H100, fwd+bwd, ``2026-12-05-flash-h100.json``'s
    ``subquad-triton-det`` rows: Longformer 2 x 16k 2.601 against 2.766 ms, BigBird 4.636 against 5.085,
    block-sparse 5.16 / 11.84 / 22.63 against 6.28 / 13.93 / 26.39 at densities 0.1 / 0.25 / 0.5). Walks that
    outlast even the grid with dQ programs (``DQ_PROGRAMS_LOAD``) are cut into pieces and keep the atomic sums,
    which the pieces need. A block-diagonal BlockMask needs neither: its dK/dV programs store dQ
    (``_dq_stored``)."""
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta, lse2 = _preprocess(do, out, lse, dlse)
    dq_store = _dq_stored(m, q)
    if deterministic or dq_store or _dq_by_programs(m, q, k):
        dq = torch.empty_like(q)
        dk, dv = _backward_launch(q, k, v, do, lse2, delta, dq, m, scale, softcap, slopes, False, dropout,
                                  dq_store=dq_store)
        return dq, dk, dv
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    dk, dv = _backward_launch(q, k, v, do, lse2, delta, dq, m, scale, softcap, slopes, True, dropout)
    return dq.to(q.dtype), dk, dv


def backward_two_sources(do, q, k, v, m: MaskArgs, k2, v2, m2: MaskArgs, out, lse, dlse, scale: float, softcap,
                         slopes, band2: tuple[int, int]):
    """``(dq, dk, dv, dk2, dv2)`` of a two-source forward (``forward``'s ``second``: ``(k2, v2, m2, *band2)``):
    each key set's backward launch reads the merged LSE and delta. ``m2`` is the second set's BlockMask
    arguments at its positions.

    Where the first set takes dQ programs (``backward``'s choice: a band, or a walk that no piece schedule
    cuts; the strided pattern's band, the fixed pattern's local blocks), they walk the second set's keys too, as
    the forward does, and store dQ once in the query's dtype; the second set's launch computes dK/dV alone (its
    few key tiles split over programs where they cannot fill the GPU: the strided pattern's 64 columns at 2 x
    16k). H100, fwd+bwd, against the code before (``2026-12-06-dq-walks-columns-ab-h100.json``): strided 1.935
    -> 1.661 ms at 2 x 16k and 4.527 -> 3.972 at 1 x 64k, where the columns' split walks had added dQ by fp32
    atomics into the first launch's fp32 sums, converted after; fixed 2.678 -> 2.424 ms at 2 x 16k and 13.01 ->
    12.64 at 1 x 64k, where the local blocks' dK/dV programs had stored fp32 dQ sums (``DQ_STORE``) that the
    columns' dQ programs went on from: those programs' second read of Q and dO and the fp32 round trip cost
    more than the dQ programs' second pass over the diagonal blocks' scores. Where each key block of the first
    set is seen by one query block alone and heads are not grouped (``_dkdv_by_dq_programs``: the fixed pattern's
    local blocks), the dQ programs store that set's dK/dV too and no dK/dV program runs (``DQ_DKDV``; H100,
    fwd+bwd, ``2026-12-06-dq-dkdv-ab-h100.json``: fixed 2.414 -> 2.211 ms at 2 x 16k, 12.63 -> 12.32 at 1 x 64k).

    Otherwise (a first set whose walks are cut into pieces) the first set adds its dQ by atomics into fp32 sums;
    the second's dQ programs start from those and write dQ (no atomics, no conversion), unless its key tiles
    are too few to fill the GPU unsplit (``_query_splits``), where its dK/dV programs add dQ by atomics too and
    the sums are converted after."""
    do = do if do.stride(-1) == 1 else do.contiguous()
    delta, lse2 = _preprocess(do, out, lse, dlse)
    if _dq_by_programs(m, q, k):
        dq = torch.empty_like(q)
        dk, dv = _backward_launch(q, k, v, do, lse2, delta, dq, m, scale, softcap, slopes, False,
                                  second=(k2, v2, m2, *band2), dq_dkdv=_dkdv_by_dq_programs(m, q, k))
        dk2, dv2 = _backward_launch(q, k2, v2, do, lse2, delta, None, m2, scale, softcap, slopes, False)
        return dq, dk, dv, dk2, dv2
    partial = torch.zeros_like(q, dtype=torch.float32)
    dk, dv = _backward_launch(q, k, v, do, lse2, delta, partial, m, scale, softcap, slopes, True)
    if _dq_by_programs(m2, q, k2) and _query_splits(q.shape[0] * k2.shape[2] * cdiv(k2.shape[1], 128), q.shape[1],
                                                    q.device) == 1:
        dq = torch.empty_like(q)
        dk2, dv2 = _backward_launch(q, k2, v2, do, lse2, delta, dq, m2, scale, softcap, slopes, False,
                                    dq_in=partial)
        return dq, dk, dv, dk2, dv2
    dk2, dv2 = _backward_launch(q, k2, v2, do, lse2, delta, partial, m2, scale, softcap, slopes, True)
    return partial.to(q.dtype), dk, dv, dk2, dv2
