"""Device helpers shared by the flash forward and backward kernels: which (query, key) tiles a program visits,
the score of a tile (scale, softcap, ALiBi) and the element mask of a partial tile.

Every pattern reaches the kernels as a few terms, each a ``tl.constexpr`` switch:

* ``BAND``: ``lo <= q_pos - k_pos <= hi`` (causal, sliding windows, full when both are infinite), OR-ed with
  * ``PREFIX``: ``k_pos < prefix`` (prefix-LM; global keys ``0..G-1``),
  * ``Q_PREFIX``: ``q_pos < q_prefix`` (global queries ``0..G-1``),
  * ``HAS_FLAGS``: ``IS_GLOBAL[k_pos] & 1`` or ``IS_GLOBAL[q_pos] & 2`` (scattered global tokens, one int8
    per position loaded as a row and a column vector per tile),
  * ``HAS_LAYOUT``: ``LAYOUT[q_pos // s, k_pos // s]`` (a block layout whose cells need not align with the
    BlockMask blocks: BigBird's random blocks),

  and the whole AND-ed with ``q_pos >= k_pos`` under ``AND_CAUSAL`` (causal Longformer / BigBird);
* ``DOC``: AND-ed, ``seq_ids[q_pos] == seq_ids[k_pos]`` (packed documents, varlen);
* ``BITS``: AND-ed, a precomputed bit per pair of a partial tile (any other pattern);
* ``LSH``: AND-ed, Reformer's chunks of a hash round's sorted order, less the pairs of earlier rounds, and
  (``LSH_NOT_SELF``) less the self pair (``subquad.ops.lsh``).

Positions are ``i + seq_kv - seq_q`` for query ``i`` and ``j`` for key ``j`` unless ``q_pos`` / ``kv_pos``
tensors give them (gathered or permuted tokens; ``BATCH_POS``: a row of them per batch element). Scores are kept
in base-2 units (``log2(e)`` folded into the scale) so that the softmax uses ``exp2``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ...grid import interpreting

#: the interpreter of Triton 3.9 computes bf16 ``tl.dot`` wrongly: under it, products are taken in fp32
UPCAST_DOT = tl.constexpr(interpreting())


@triton.jit
def dot(a, b):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def dot_acc(a, b, acc):
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc)
    return tl.dot(a, b, acc)


@triton.jit
def grid_row(pid_offset, SPLIT_GRID: tl.constexpr):
    """The program's row on grid axis 1 (batch x heads), counted over every launch of a grid that
    ``grid.launch_split`` cut into launches past CUDA's limit (``pid_offset``: the rows of the launches before
    this one). Only that grid's variant (its flag ``SPLIT_GRID``) adds the offset, so that the ordinary one, whose
    loops were measured, compiles exactly as before: added in every variant, the offset moved the backward's
    registers (Triton 3.6, sm90: Longformer 16k's dK/dV loop 1,819 -> 1,821 instructions and 140 -> 144 B of
    spill stores, the dropout backward's loop 2,108 -> 2,104)."""
    if SPLIT_GRID:
        return tl.program_id(1) + pid_offset
    return tl.program_id(1)


@triton.jit
def grid_rows(n_rows, SPLIT_GRID: tl.constexpr):
    """The grid's rows on axis 1: under ``SPLIT_GRID`` all its launches' (``n_rows``), as ``grid_row`` counts."""
    if SPLIT_GRID:
        return n_rows
    return tl.num_programs(1)


@triton.jit
def heavy_first(ORDER, n_blocks, n_items, mask_b, mask_h, HEADS: tl.constexpr, SUBS: tl.constexpr,
                HEAD_STEP: tl.constexpr, pid, n_pid, n_bh, pid_offset, SPLIT_GRID: tl.constexpr,
                HEAD_MAJOR: tl.constexpr = False, tail_heads=1):
    """``(tile, pid_bh, piece)`` of this program when every (batch, head) runs its BlockMask blocks heaviest
    first: the grid's linear id walks the heads fastest and ``ORDER``'s ``n_items`` entries in rank (``SUBS``
    kernel tiles per block). A block that walks far more tiles than the rest (the query block of global rows,
    the key block of global columns) would otherwise start with its head's turn, last for the last head, and
    run alone at the end. An entry is ``block + n_blocks * piece``: the dK/dV pass cuts such a walk into pieces
    (``piece`` of them, see ``launch._backward_launch``); otherwise every entry is a whole block and ``piece`` is 0.
    ``HEAD_STEP``: query heads per program head (the dK/dV grid is over KV heads). ``pid``: the program's place
    among the ``n_pid`` programs of its grid row that take this schedule (the backward's dQ programs follow its
    dK/dV programs in the row); ``n_bh``: the (batch, head) pairs over which they go (the grid's rows, or the
    query heads of the backward's KV-head rows: a dQ program may take any query head). ``pid_offset``,
    ``SPLIT_GRID``: a grid cut into launches (``grid_row``; ``n_bh`` then from ``grid_rows``): the schedule
    spans them, each launch taking the next ranks.

    ``HEAD_MAJOR``: the heads slowest instead, each (batch, head)'s blocks side by side heaviest first, for walks
    with no block far heavier than the rest: neighbouring programs then read one head's keys, which stay in L2
    (the heads-fastest walk read block-sparse's from memory: 1.28x slower at density 0.1), and the shortest walks
    of the last heads, not whichever came last in the grid, fill the pass's tail. ``tail_heads``: the last that
    many (batch, head) pairs go side by side, rank by rank, so that the pass ends on the shortest walks of all of
    them, not on one head's longest ones still running while the others have finished (``schedule.tail_heads``)."""
    linear = grid_row(pid_offset, SPLIT_GRID) * n_pid + pid
    if HEAD_MAJOR:
        per_head = n_items * SUBS
        tail_start = (n_bh - tail_heads) * per_head
        in_tail = linear >= tail_start
        into_tail = linear - tail_start
        rank = tl.where(in_tail, into_tail // tail_heads, linear % per_head)
        pid_bh = tl.where(in_tail, n_bh - tail_heads + into_tail % tail_heads, linear // per_head)
    else:
        rank = linear // n_bh
        pid_bh = linear % n_bh
    h = (pid_bh % HEADS) * HEAD_STEP
    item = tl.load(ORDER + (((pid_bh // HEADS) % mask_b * mask_h + h % mask_h) * n_items + rank // SUBS))
    return (item % n_blocks) * SUBS + rank % SUBS, pid_bh, item // n_blocks


@triton.jit
def tile_rows(base, start, stride, BLOCK: tl.constexpr, WIDE: tl.constexpr):
    """Pointers to rows ``start .. start + BLOCK`` of ``base``, a ``(BLOCK, 1)`` block (add the columns). ``WIDE``
    (the launch's ``WIDE_ROWS``: some row x stride reaches 2^31 elements, e.g. 128k tokens of 128 heads of 128)
    takes the offsets in int64, where int32 wrapped; the rest keep int32 offsets, which sm90 loops address in fewer
    instructions and registers (int64 rows: +25-60 instructions a loop, and more spills in Longformer's dK/dV)."""
    rows = start + tl.arange(0, BLOCK)
    if WIDE:
        return base + rows.to(tl.int64)[:, None] * stride
    return base + rows[:, None] * stride


@triton.jit
def tanh(x):
    # tanh through the sigmoid: available on every backend and in the interpreter
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def scores(qk, qp, kp, qk_scale, cap_scale, slope2, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    """Scores in base-2 units from raw ``q.k``; also returns tanh's value for the softcap derivative.

    Without softcap ``qk_scale = scale * log2(e)``; with it ``qk_scale = scale / softcap`` and
    ``cap_scale = softcap * log2(e)``. ``qp``/``kp`` are 2-D broadcastable positions, ``slope2`` the ALiBi
    slope times ``log2(e)``.
    """
    if SOFTCAP:
        t = tanh(qk * qk_scale)
        s = t * cap_scale
    else:
        t = qk
        s = qk * qk_scale
    if ALIBI:
        s = s - slope2 * tl.abs(qp - kp).to(tl.float32)
    return s, t


@triton.jit
def _repeat16(word, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Each of a tile's words 16 times in a row along the keys: ``(rows, keys / 16)`` -> ``(rows, keys)``."""
    return tl.reshape(tl.broadcast_to(word[:, :, None], (BLOCK_ROWS, BLOCK_N // 16, 16)), (BLOCK_ROWS, BLOCK_N))


@triton.jit
def dropout_keep(rng, rows, start_n, seq_kv, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
                 TRANS: tl.constexpr = False):
    """Attention dropout's keep decisions for a tile: ``rows`` the ``batch x head x query`` row indices (int64,
    ``BLOCK_ROWS``) and keys ``start_n .. start_n + BLOCK_N`` (``start_n`` a multiple of 16); ``(rows, keys)``, or
    ``(keys, rows)`` with ``TRANS``. As FlashAttention-2 draws them, one Philox-4x32-10 call (``tl.randint4x``
    under the seed ``rng[0]``, at counter ``row * cdiv(seq_kv, 16) + key // 16``) gives 16 keys their bytes:
    key ``k`` takes byte ``k % 4`` of word ``(k % 16) // 4`` and is kept from the threshold ``rng[1]`` up
    (``subquad.ops.softmax.dropout``). Each word is repeated over its 16 keys by a broadcast and a reshape; the
    transposed tile is the same tile transposed (computed in that orientation, Triton 3.6 gave the same
    instructions: sm90, ``benchmarks/kernel_report.py causal-1k-dropout``)."""
    groups = start_n // 16 + tl.arange(0, BLOCK_N // 16)
    lanes = (tl.arange(0, BLOCK_N) % 16)[None, :]
    w0, w1, w2, w3 = tl.randint4x(tl.load(rng), rows[:, None] * tl.cdiv(seq_kv, 16) + groups[None, :])
    word = tl.where(lanes < 8, tl.where(lanes < 4, _repeat16(w0, BLOCK_ROWS, BLOCK_N),
                                        _repeat16(w1, BLOCK_ROWS, BLOCK_N)),
                    tl.where(lanes < 12, _repeat16(w2, BLOCK_ROWS, BLOCK_N), _repeat16(w3, BLOCK_ROWS, BLOCK_N)))
    byte = (word.to(tl.uint32, bitcast=True) >> ((lanes % 4) * 8).to(tl.uint32)) & 0xFF
    keep = byte.to(tl.int32) >= tl.load(rng + 1).to(tl.int32)
    if TRANS:
        keep = tl.trans(keep)
    return keep


@triton.jit
def keep_mask(qi, ki, qp, kp, seq_q, seq_kv, band_lo, band_hi, prefix, q_prefix, IS_GLOBAL, n_flags, LAY,
              lay_block, stride_lay_q, DOC_IDS, BITS, tile, rq, ck,
              BAND: tl.constexpr, PREFIX: tl.constexpr, Q_PREFIX: tl.constexpr, HAS_FLAGS: tl.constexpr,
              HAS_LAYOUT: tl.constexpr, AND_CAUSAL: tl.constexpr, DOC: tl.constexpr, USE_BITS: tl.constexpr,
              MBQ: tl.constexpr, MBK: tl.constexpr, KV_BOUNDS: tl.constexpr, lsh_q_chunk=0, lsh_k_chunk=0,
              LSH_EARLIER: tl.constexpr = 0, LSH_CHUNK: tl.constexpr = 0, LSH: tl.constexpr = False,
              LSH_NOT_SELF: tl.constexpr = False):
    """The kept pairs of a tile, from 2-D broadcastable operands (row/column vectors in either orientation):
    ``qi``/``ki`` query and key indices (bounds), ``qp``/``kp`` positions, ``rq``/``ck`` offsets inside the
    BlockMask block (bit lookup), ``tile`` the bitmask tile of this block, ``LAY`` the layout grid of this
    (batch, head) with rows ``stride_lay_q`` apart; ``lsh_*``: the ``LSH`` term's operands (``batch_rows``).

    Every term costs instructions on each element of a masked tile (a masked tile cost 1.5-1.7x an unmasked
    one in the dK/dV pass when every term was tested), so terms that cannot fail are left out: query rows past
    the sequence (no kernel stores them, and the backward gives them an LSE of ``+inf``: probabilities 0);
    keys past it unless ``KV_BOUNDS`` (a ragged last key tile)."""
    in_q = qi < seq_q
    in_kv = ki < seq_kv
    keep = tl.full(tl.broadcast(qp, kp)[0].shape, 1, tl.int1)
    if BAND:
        # both sides, even where one cannot fail: with a single comparison (one side, or both as one unsigned
        # comparison), LLVM packed half of a thread's predicates into bit vectors (Triton 3.6, sm90: 1.2x the
        # instructions of a masked tile)
        d = qp - kp
        inband = (d >= band_lo) & (d <= band_hi)
        if PREFIX:
            inband = inband | (kp < prefix)
        if Q_PREFIX:
            inband = inband | (qp < q_prefix)
        if HAS_FLAGS:
            kf = tl.load(IS_GLOBAL + kp, mask=in_kv & (kp < n_flags), other=0)
            qf = tl.load(IS_GLOBAL + qp, mask=in_q & (qp < n_flags), other=0)
            inband = inband | ((kf & 1) != 0) | ((qf & 2) != 0)
        if HAS_LAYOUT:
            cell = tl.load(LAY + (qp // lay_block) * stride_lay_q + kp // lay_block, mask=in_q & in_kv, other=0)
            inband = inband | (cell != 0)
        if AND_CAUSAL:
            inband = inband & (d >= 0)
        keep = inband
    if KV_BOUNDS:
        keep = keep & in_kv
    if DOC:
        qd = tl.load(DOC_IDS + qp, mask=in_q, other=-1)
        kd = tl.load(DOC_IDS + kp, mask=in_kv, other=-2)
        keep = keep & (qd == kd)
    if USE_BITS:
        WORDS: tl.constexpr = MBK // 32
        word = tl.load(BITS + tile.to(tl.int64) * (MBQ * WORDS) + rq * WORDS + ck // 32)
        keep = keep & (((word >> (ck % 32)) & 1) != 0)
    if LSH:
        # Reformer's hash rounds (subquad.ops.lsh): rows and columns are tokens sorted by bucket, at original
        # positions qp / kp. A round keeps the keys of the query's chunk of the sorted order and of the chunk
        # before (LSH_CHUNK tokens; 0 where the BlockMask's blocks are whole chunks, so that its listed blocks
        # hold no other key), less the pairs an earlier round kept (so that the rounds merge by LSE into one
        # softmax over their union), read from the tokens' chunks in those rounds. Those come in this round's
        # sorted order, one row per earlier round (LSH_EARLIER rows, a round with fewer fills the rest so that
        # no pair matches): contiguous loads in a loop unrolled at compile time. Read through the positions in a
        # loop over the element's rounds, they were two dependent gathers a round, and the inner loop kept the
        # tile loop from being software-pipelined (sm90, Triton 3.6: K and V loaded synchronously, no LDGSTS)
        if LSH_CHUNK:
            gap = qi // LSH_CHUNK - ki // LSH_CHUNK
            keep = keep & (gap >= 0) & (gap <= 1)
        if LSH_NOT_SELF:
            keep = keep & (qp != kp)
        for earlier in tl.static_range(LSH_EARLIER):
            gap = (tl.load(lsh_q_chunk + earlier * seq_q + qi, mask=in_q, other=0)
                   - tl.load(lsh_k_chunk + earlier * seq_kv + ki, mask=in_kv, other=0))
            keep = keep & ((gap < 0) | (gap > 1))
    return keep


@triton.jit
def batch_rows(Q_POS, KV_POS, LSH_Q_CHUNK, LSH_K_CHUNK, b, seq_q, seq_kv, BATCH_POS: tl.constexpr,
               LSH_EARLIER: tl.constexpr):
    """Batch element ``b``'s rows of the per-token tensors: ``(q_pos, kv_pos, lsh_q_chunk, lsh_k_chunk)``.
    ``BATCH_POS``: positions ``(batch, seq)``, a row per batch element (LSH's rounds, each sorted its own way),
    else one vector for all. ``LSH_EARLIER``: the batch elements are LSH's (sequence, head, round) triples and
    ``LSH_*_CHUNK`` ``(batch, LSH_EARLIER, seq)`` give, in the element's sorted order, each token's chunk in
    the rounds before (``keep_mask``'s ``LSH``). Without the switches the arguments come back as they are, so
    that ordinary launches compile as before."""
    q_pos = Q_POS
    kv_pos = KV_POS
    if BATCH_POS:
        q_pos = Q_POS + b.to(tl.int64) * seq_q
        kv_pos = KV_POS + b.to(tl.int64) * seq_kv
    lsh_q_chunk = LSH_Q_CHUNK
    lsh_k_chunk = LSH_K_CHUNK
    if LSH_EARLIER:
        lsh_q_chunk = LSH_Q_CHUNK + b.to(tl.int64) * (LSH_EARLIER * seq_q)
        lsh_k_chunk = LSH_K_CHUNK + b.to(tl.int64) * (LSH_EARLIER * seq_kv)
    return q_pos, kv_pos, lsh_q_chunk, lsh_k_chunk


@triton.jit
def list_row(start_m, b, h, mask_b, mask_h, n_qb, FULL_NUM, PART_NUM, MBQ: tl.constexpr):
    """The BlockMask list row of the query tile at ``start_m`` (a mask shared over batch or heads is indexed
    modulo its size): the row's first query, its offset into the lists, its full entries and all its entries."""
    qb = start_m // MBQ
    base = (((b % mask_b) * mask_h + h % mask_h) * n_qb + qb).to(tl.int64)
    n_full = tl.load(FULL_NUM + base)
    return qb * MBQ, base, n_full, n_full + tl.load(PART_NUM + base)


@triton.jit
def list_entry(j, n_full, base, FULL_IDX, full_width, PART_IDX, part_width, ok=True):
    """Entry ``j`` of a BlockMask row's blocks, its full ones first, then its partial ones: the block's index and
    whether it is partial (where ``ok`` is false: block 0, nothing read). One loop walks both lists, so that the
    pipeliner loads the first partial block during the last full one; except where the mask reads memory
    (global-token flags, a block layout, document ids, a bitmask: ``HAS_FLAGS or HAS_LAYOUT or DOC or USE_BITS``,
    the kernels' MASK_READS): loads inside the loop's branch stop Triton 3.6's software pipeliner (BigBird's
    forward ran 0.79x in one loop, H200), so there the full blocks keep a loop of their own, without the branch
    (``list_part``)."""
    partial = j >= n_full
    idx = tl.load(tl.where(partial, PART_IDX + base * part_width + (j - n_full), FULL_IDX + base * full_width + j),
                  mask=ok, other=0)
    return idx, partial


@triton.jit
def list_ahead(t, first, step, hi, SUBS: tl.constexpr, n_full, base, FULL_IDX, full_width, PART_IDX, part_width):
    """``list_entry`` of key tile ``t + 1`` of a walk over the entries ``first, first + step, ...`` below ``hi``
    (``SUBS`` tiles an entry; clamped into the row). The walks read each tile's entry an iteration ahead, into
    registers (before the loop with ``t = -1``). Read in the iteration that used it, the software pipeliner
    copied the entry through shared memory a stage ahead of the K/V copies, and a walk's first K/V copies waited
    for that round trip after Q's arrival (sm90, block-sparse 16k forward: a 4-byte ``LDGSTS``, ``DEPBAR``, a
    barrier, ``LDS``). Read ahead, they leave once Q is stored, and in the loop an entry arrives an iteration
    before its copies."""
    j = tl.minimum(first + ((t + 1) // SUBS) * step, hi - 1)
    return list_entry(j, n_full, base, FULL_IDX, full_width, PART_IDX, part_width, first < hi)


@triton.jit
def list_part(part: tl.constexpr, n_full, n_all, MASK_READS: tl.constexpr):
    """The entries ``[lo, hi)`` that loop ``part`` of a query block's walk takes (``1 + MASK_READS`` loops): all
    of them, or the full blocks (part 0) and then the partial ones (part 1)."""
    hi = n_all
    if MASK_READS and part == 0:
        hi = n_full
    return n_full * part, hi


@triton.jit
def second_walk(start_m, b, h, mask2_b, mask2_h, n_qb, FULL2_NUM, PART2_NUM, n2, MBQ: tl.constexpr,
                MBK: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK2: tl.constexpr):
    """A query tile's walk over a second, gathered key set (``TWO_SOURCES``: a plan's columns, in the forward and
    the dQ programs): its number of key tiles, its list row's offset and its full entries. Every listed block's
    tiles go in one loop, full blocks first, a tile an iteration (a loop per block paid a pipeline prologue per
    block: the fixed pattern's query tiles list up to one column block per 16 query tiles before them). A ragged
    last block's tiles wholly past the keys run masked to nothing; where all the columns are one block
    (``ONE_BLOCK2``: the strided pattern's 64 at 16k, half a 128-block, whose empty tile cost 5% of its forward
    on the H200) the loop goes over that block's tiles up to the keys' end instead: a branch around the empty
    tiles would stop the software pipeliner for the whole loop."""
    _, base2, n_full2, n_listed2 = list_row(start_m, b, h, mask2_b, mask2_h, n_qb, FULL2_NUM, PART2_NUM, MBQ)
    if ONE_BLOCK2:
        n_tiles = n_listed2 * tl.cdiv(n2, BLOCK_N)     # (the one block listed or not)
    else:
        n_tiles = n_listed2 * (MBK // BLOCK_N)
    return n_tiles, base2, n_full2, n_listed2


@triton.jit
def second_ahead(t, base2, n_full2, n_listed2, FULL2_IDX, full2_width, PART2_IDX, part2_width, MBK: tl.constexpr,
                 BLOCK_N: tl.constexpr, ONE_BLOCK2: tl.constexpr):
    """``list_ahead`` of ``second_walk``'s tile ``t + 1`` (``ONE_BLOCK2``: no list to read, block 0)."""
    if ONE_BLOCK2:
        kb = 0
        partial = n_full2 == 0
    else:
        kb, partial = list_ahead(t, 0, 1, n_listed2, MBK // BLOCK_N, n_full2, base2, FULL2_IDX, full2_width,
                                 PART2_IDX, part2_width)
    return kb, partial


@triton.jit
def second_tile(t, entry, MBK: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK2: tl.constexpr):
    """Tile ``t`` of ``second_walk`` from its entry read ahead (``second_ahead``): its first key and whether its
    block is partial."""
    kb, partial = entry
    if ONE_BLOCK2:
        start_n = t * BLOCK_N
    else:
        start_n = kb * MBK + (t % (MBK // BLOCK_N)) * BLOCK_N
    return start_n, partial


@triton.jit
def bitmask_tile(TILE_OF, row, n_kb, kb, partial, USE_BITS: tl.constexpr):
    """The bitmask tile of block ``kb`` in BlockMask row ``row`` where it is partial and the mask has bits, else 0."""
    tile = 0
    if USE_BITS:
        tile = tl.load(TILE_OF + row * n_kb + kb, mask=partial, other=0)
    return tile


@triton.jit
def list_edge(partial, start_n, seq_kv, BLOCK_N: tl.constexpr, MASK_READS: tl.constexpr, EVEN_KV: tl.constexpr):
    """Whether the key tile at ``start_n`` of a listed block takes the mask: a partial block's, or one past the
    keys' end (a loop of partial blocks only, with MASK_READS, takes it always; its full blocks' loop, none)."""
    edge = partial
    if MASK_READS:
        edge = True
    elif not EVEN_KV:
        edge = partial | (start_n + BLOCK_N > seq_kv)
    return edge


@triton.jit
def kv_range(start_m, seq_q, seq_kv, q_off, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query tile at ``start_m`` under a band: the key range ``[lo, hi)`` split as masked
    ``[lo, full_lo)``, unmasked ``[full_lo, full_hi)``, masked ``[full_hi, hi)``; all multiples of BLOCK_N
    except ``hi``."""
    p0 = start_m + q_off
    p1 = tl.minimum(start_m + BLOCK_M, seq_q) - 1 + q_off
    lo = tl.maximum(p0 - band_hi, 0)
    lo = (lo // BLOCK_N) * BLOCK_N
    hi = tl.minimum(p1 - band_lo + 1, seq_kv)
    hi = tl.maximum(hi, lo)
    # a key tile [n, n + BLOCK_N) is unmasked iff every row keeps it and it lies inside the keys
    full_lo = tl.maximum(p1 - band_hi, lo)
    full_lo = tl.minimum(((full_lo + BLOCK_N - 1) // BLOCK_N) * BLOCK_N, hi)
    full_hi = tl.minimum(p0 - band_lo + 1, seq_kv)
    full_hi = tl.maximum((full_hi // BLOCK_N) * BLOCK_N, full_lo)
    return lo, full_lo, full_hi, hi


@triton.jit
def q_range(start_n, seq_q, seq_kv, q_off, band_lo, band_hi, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Transposed ``kv_range``: for the key tile at ``start_n``, the query range ``[lo, hi)`` split as
    masked / unmasked / masked, in multiples of BLOCK_M except ``hi``."""
    k1 = tl.minimum(start_n + BLOCK_N, seq_kv) - 1
    lo = tl.maximum(start_n + band_lo - q_off, 0)
    lo = (lo // BLOCK_M) * BLOCK_M
    hi = tl.minimum(k1 + band_hi - q_off + 1, seq_q)
    hi = tl.maximum(hi, lo)
    full_lo = tl.maximum(k1 + band_lo - q_off, lo)
    full_lo = tl.minimum(((full_lo + BLOCK_M - 1) // BLOCK_M) * BLOCK_M, hi)
    full_hi = tl.minimum(start_n + band_hi - q_off + 1, seq_q)
    full_hi = tl.maximum((full_hi // BLOCK_M) * BLOCK_M, full_lo)
    if start_n + BLOCK_N > seq_kv:
        # a ragged key tile is masked everywhere (its padding keys must get no probability)
        full_hi = full_lo
    return lo, full_lo, full_hi, hi
