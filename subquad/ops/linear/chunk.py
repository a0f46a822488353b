"""The chunked engine on Triton: launches, the autograd Function, and the log-decay gradient.

Batches are flattened into packed sequences (``(B, T)`` is ``cu_seqlens = [0, T, 2T, ...]``), so plain and
varlen calls run the same kernels. The state at each chunk start is recomputed in the backward pass rather than
kept (it would be ``T / C * H * K * V`` elements).

Log-decay gradient: with ``B_t`` the cumulative log-decay over the sequence, the op is a function of
``q e^{B}``, ``k e^{-B}`` and the final state ``e^{B_T} (...)``, so ``dB_t = q_t . dq_t - k_t . dk_t`` (+ ``S_T . dS_T``
at the last token) and ``dg`` is its reverse cumulative sum per sequence.
"""

from __future__ import annotations

import functools

import torch

from ..autotuned import Autotuned
from ..first_order import first_order
from ..grid import cdiv, launch_split, next_power_of_2
from . import chunk_bwd, chunk_fwd, chunk_intra
from .chunk_split import final_states, segment_split
from .chunk_intra import chunk_cumsum, decay_grad

# the autotuned kernels, launched without the autotuner's per-call Python (subquad/ops/autotuned.py)
state_fwd, output_fwd = Autotuned(chunk_fwd.state_fwd), Autotuned(chunk_fwd.output_fwd)
fused_fwd = Autotuned(chunk_fwd.fused_fwd)
state_bwd, dv_bwd, dqk_bwd = Autotuned(chunk_bwd.state_bwd), Autotuned(chunk_bwd.dv_bwd), Autotuned(chunk_bwd.dqk_bwd)
intra_fwd, intra_bwd = Autotuned(chunk_intra.intra_fwd), Autotuned(chunk_intra.intra_bwd)

SUB_BLOCK = 16  # rows of the element-wise diagonal blocks for a decay per key dimension


class ChunkTables:
    """Packed-sequence bookkeeping: ``cu`` (N+1) int32, ``chunk_indices`` (n_chunks, 2) = (sequence, chunk in
    it), ``chunk_offsets`` (N+1) first global chunk of each sequence; ``lengths`` on the host."""

    def __init__(self, cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int, device):
        self.chunk_size = chunk_size
        if cu_seqlens is None:
            n = cdiv(seq_len, chunk_size)
            self.n_seqs = batch
            self.lengths = [seq_len] * batch
            self.cu = torch.arange(batch + 1, device=device, dtype=torch.int32) * seq_len
            seq = torch.arange(batch, device=device).repeat_interleave(n)
            within = torch.arange(n, device=device).repeat(batch)
            self.chunk_offsets = torch.arange(batch + 1, device=device, dtype=torch.int32) * n
            self.n_chunks = batch * n
        else:
            self.cu = cu_seqlens.to(device=device, dtype=torch.int32)
            self.lengths = lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
            self.n_seqs = len(lengths)
            counts = [cdiv(n, chunk_size) for n in lengths]
            seq = torch.repeat_interleave(torch.arange(self.n_seqs), torch.tensor(counts)).to(device)
            within = torch.cat([torch.arange(c) for c in counts]).to(device)
            self.chunk_offsets = torch.tensor([0] + counts, device=device).cumsum(0).to(torch.int32)
            self.n_chunks = sum(counts)
        self.chunk_indices = torch.stack([seq, within], dim=1).to(torch.int32).contiguous()
        # Autotuning key of the chunk kernels: their best tiles depend on how much parallel work there is
        # (sequences for the state passes, chunks for the tile passes), so they are tuned per power-of-two
        # bucket of both, not once for whatever shape came first.
        self.tune_key = {"SEQS": next_power_of_2(self.n_seqs), "CHUNKS": next_power_of_2(self.n_chunks)}


@functools.lru_cache(maxsize=64)
def _fixed_length_tables(batch: int, seq_len: int, chunk_size: int, device: torch.device) -> ChunkTables:
    return ChunkTables(None, batch, seq_len, chunk_size, device)


def chunk_tables(cu_seqlens: torch.Tensor | None, batch: int, seq_len: int, chunk_size: int, device) -> ChunkTables:
    """The call's ChunkTables; for equal-length sequences made once per shape (read-only afterwards): building
    them is eight small launches per call (a few us of GPU time each) and 50-100 us of host time (CI machine)."""
    if cu_seqlens is None:
        return _fixed_length_tables(batch, seq_len, chunk_size, torch.device(device))
    return ChunkTables(cu_seqlens, batch, seq_len, chunk_size, device)


def _tile(n: int) -> int:
    """A tile of a feature dimension of ``n``: a power of two from 16 to 64."""
    return min(64, max(16, next_power_of_2(n)))


def block_sizes(dk: int, dv: int) -> tuple[int, int]:
    return _tile(dk), _tile(dv)


def gate_kind(g) -> int:
    """0: no decay, 1: a scalar per token (T_total, H), 2: a vector per token (T_total, H, K), 3: a constant per
    head (H,)."""
    return 0 if g is None else {1: 3, 2: 1, 3: 2}[g.dim()]


def _segment_args(segments, tables, start, like, heads, dk, dv):
    """The walk's segment arguments (local, trans, seq, first) and its per-sequence output: ``segments`` is None
    (the walk is over ``tables``' sequences) or ``(split, local, trans)`` (over ``split.tables``' segments,
    chunk_split; ``trans`` the delta rule's segment transitions, else None)."""
    if segments is None:
        return (None, None, None, None), like.new_empty(tables.n_seqs, heads, dk, dv, dtype=torch.float32)
    split, local, trans = segments
    return (local, trans, split.seq, split.first), final_states(like, split, heads, dk, dv, start)


def launch_state_fwd(k, v, g, h0, tables, chunk_size, *, w=None, store_h=True, segments=None):
    """Returns (h per chunk start or None, final state fp32, v_new or None). k, v, w: (T_total, H, ·)
    contiguous; g the in-chunk cumulative log-decay (``launch_chunk_cumsum``) or None. The delta rule (w given)
    needs the whole key dimension in one block. ``segments``: as ``_segment_args``."""
    t_total, heads, dk = k.shape
    dv = v.shape[-1]
    bk = max(16, next_power_of_2(dk)) if w is not None else block_sizes(dk, dv)[0]
    h = k.new_empty(tables.n_chunks, heads, dk, dv) if store_h else None
    seg_args, ht = _segment_args(segments, tables, h0, k, heads, dk, dv)
    v_new = torch.empty_like(v) if w is not None and store_h else None
    grid = lambda n: lambda meta: (cdiv(dk, bk), cdiv(dv, meta["BV"]), n)  # noqa: E731
    launch_split(state_fwd, grid, tables.n_seqs * heads, k, v, g, h, h0, ht, w, v_new, *seg_args, tables.cu,
                 tables.chunk_offsets, unit=heads, H=heads, K=dk, V=dv, C=chunk_size, BK=bk, GATE=gate_kind(g),
                 DELTA=w is not None, **tables.tune_key, HAS_H0=h0 is not None, STORE_H=store_h, STORE_HT=True,
                 SPLIT=segments is not None, TRANSITION=False, IEEE=k.dtype == torch.float32)
    return h, ht, v_new


def launch_transition(k, w, g, tables, chunk_size):
    """The delta rule's transition matrix over each of ``tables``' sequences (the segments of a split), fp32
    ``(n_seqs, H, K, K)``: ``S_end = M S_start + (S_end from zero)``."""
    t_total, heads, dk = k.shape
    bk = max(16, next_power_of_2(dk))
    trans = k.new_empty(tables.n_seqs, heads, dk, dk, dtype=torch.float32)
    grid = lambda n: lambda meta: (1, cdiv(dk, meta["BV"]), n)  # noqa: E731
    launch_split(state_fwd, grid, tables.n_seqs * heads, k, None, g, None, None, trans, w, None, None, None, None,
                 None, tables.cu, tables.chunk_offsets, unit=heads, H=heads, K=dk, V=dk, C=chunk_size, BK=bk,
                 GATE=gate_kind(g), DELTA=True, **tables.tune_key, HAS_H0=False, STORE_H=False, STORE_HT=True,
                 SPLIT=False, TRANSITION=True, IEEE=k.dtype == torch.float32)
    return trans


def launch_chunk_cumsum(g, tables, chunk_size):
    """In-chunk cumulative log-decay, fp32, of the shape of ``g``: (T_total, H) or (T_total, H, K); None for
    None. The forward kernels take this form."""
    if g is None:
        return None
    t_total, heads, dk = g.shape if g.dim() == 3 else (*g.shape, 1)
    gc = torch.empty_like(g)
    bk = _tile(dk)
    chunk_cumsum[(tables.n_chunks, heads, cdiv(dk, bk))](g, gc, tables.cu, tables.chunk_indices, H=heads,
                                                         K=dk, C=chunk_size, BK=bk, num_warps=4)
    return gc


def _max_spread(dtype) -> float:
    """Widest in-chunk range of the cumulative log-decay for which chunk_intra takes one matmul per chunk: its
    factors reach e^{spread / 2}, so 1e13 in bf16 / fp32 and 55 in fp16 (whose largest value is 65,504)."""
    return 8.0 if dtype == torch.float16 else 60.0


def launch_intra_fwd(q, k, gc, tables, chunk_size):
    """Decayed intra-chunk scores A (n_chunks, H, C, C) fp32 for a vector decay."""
    t_total, heads, dk = q.shape
    scores = q.new_empty(tables.n_chunks, heads, chunk_size, chunk_size, dtype=torch.float32)
    intra_fwd[(tables.n_chunks, heads)](
        q, k, gc, scores, tables.cu, tables.chunk_indices, _max_spread(q.dtype),
        H=heads, K=dk, C=chunk_size, BC=SUB_BLOCK, BK=max(16, next_power_of_2(dk)),
        IEEE=q.dtype == torch.float32)
    return scores


def launch_intra_bwd(q, k, gc, d_scores, dq, dk, tables, chunk_size):
    """Adds the intra-chunk parts of dq, dk (in place) for a vector decay."""
    t_total, heads, dk_ = q.shape
    intra_bwd[(tables.n_chunks, heads)](
        q, k, gc, d_scores, dq, dk, tables.cu, tables.chunk_indices,
        _max_spread(q.dtype), H=heads, K=dk_, C=chunk_size,
        BC=SUB_BLOCK, BK=max(16, next_power_of_2(dk_)), IEEE=q.dtype == torch.float32)


def launch_output_fwd(q, k, v, g, h, tables, scale, chunk_size, scores=None):
    """g: the in-chunk cumulative log-decay (``launch_chunk_cumsum``) or None."""
    t_total, heads, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty_like(v)
    grid = lambda n: lambda meta: (cdiv(dv, meta["BV"]), n, heads)  # noqa: E731
    launch_split(output_fwd, grid, tables.n_chunks, q, k, v, g, h, scores, o, tables.cu, tables.chunk_indices, scale,
                 H=heads, K=dk, V=dv, C=chunk_size, GATE=gate_kind(g), IEEE=q.dtype == torch.float32,
                 **tables.tune_key)
    return o


# Programs (sequences x heads x 64-wide value tiles) from which the fused forward beats the two passes (H100,
# 2026-11-24-linear-fused-*: at 64 fused 410 us against 515 for linear attention at 2 x 16k, at 32 slower, 800
# against 593 at 1 x 32k). The delta rule's state pass needs the whole key dimension, so its two passes have no
# more programs than the fused one: fused from one (32: 1,427 against 1,815 us for gated DeltaNet).
FUSED_MIN_PROGRAMS = 64
FUSED_MIN_PROGRAMS_DELTA = 1


def fused_forward(tables, heads, dk, dv, *, delta: bool = False) -> bool:
    """Whether the forward takes ``fused_fwd`` (the state kept in registers whole along K: K <= 128)."""
    least = FUSED_MIN_PROGRAMS_DELTA if delta else FUSED_MIN_PROGRAMS
    return dk <= 128 and tables.n_seqs * heads * cdiv(dv, 64) >= least


def launch_fused_fwd(q, k, v, g, scores, h0, tables, scale, chunk_size, *, w=None, segments=None):
    """Returns (o, final state fp32); g as launch_output_fwd's, scores the intra-chunk A of a vector decay, w the
    delta rule's (then v holds u), segments as ``_segment_args``."""
    t_total, heads, dk = q.shape
    dv = v.shape[-1]
    o = torch.empty_like(v)
    seg_args, ht = _segment_args(segments, tables, h0, q, heads, dk, dv)
    grid = lambda n: lambda meta: (cdiv(dv, meta["BV"]), n)  # noqa: E731
    launch_split(fused_fwd, grid, tables.n_seqs * heads, q, k, v, g, scores, w, o, h0, ht, *seg_args, tables.cu,
                 tables.chunk_offsets, scale, unit=heads, H=heads, K=dk, V=dv, C=chunk_size,
                 BK=max(16, next_power_of_2(dk)), GATE=gate_kind(g), DELTA=w is not None, HAS_H0=h0 is not None,
                 SPLIT=segments is not None, IEEE=q.dtype == torch.float32, **tables.tune_key)
    return o, ht


def launch_state_bwd(q, k, do, g, dht, tables, scale, chunk_size, *, w=None, dv_local=None, need_dh0=True,
                     store_dh=True, segments=None):
    """Returns (dh per chunk end or None, d initial_state fp32 or None, dv_new or None). The backward launches
    take ``g`` in the cumulative form (``launch_chunk_cumsum``), as the forward ones do; segments as
    ``_segment_args``."""
    t_total, heads, dk = q.shape
    dv = do.shape[-1]
    bk = max(16, next_power_of_2(dk)) if w is not None else block_sizes(dk, dv)[0]
    dh = q.new_empty(tables.n_chunks, heads, dk, dv) if store_dh else None
    seg_args, dh0 = _segment_args(segments, tables, dht, q, heads, dk, dv)
    dh0 = dh0 if need_dh0 else None
    dv_new = torch.empty_like(do) if w is not None and store_dh else None
    grid = lambda n: lambda meta: (cdiv(dk, bk), cdiv(dv, meta["BV"]), n)  # noqa: E731
    launch_split(state_bwd, grid, tables.n_seqs * heads, q, k, w, do, dv_local, dv_new, g, dh, dh0, dht, *seg_args,
                 tables.cu, tables.chunk_offsets, scale, unit=heads, H=heads, K=dk, V=dv, C=chunk_size, BK=bk,
                 GATE=gate_kind(g), DELTA=w is not None, HAS_DHT=dht is not None, STORE_DH=store_dh, STORE_DH0=need_dh0,
                 SPLIT=segments is not None, IEEE=q.dtype == torch.float32, **tables.tune_key)
    return dh, dh0, dv_new


def launch_dv_bwd(q, k, g, do, dh, tables, scale, chunk_size, scores=None):
    """dh None: the local (intra-chunk) part only. scores: the forward A for a vector decay."""
    t_total, heads, dk = q.shape
    dv = do.shape[-1]
    out = torch.empty_like(do)
    grid = lambda n: lambda meta: (cdiv(dv, meta["BV"]), n, heads)  # noqa: E731
    launch_split(dv_bwd, grid, tables.n_chunks, q, k, g, scores, do, dh, out, tables.cu, tables.chunk_indices, scale,
                 H=heads, K=dk, V=dv, C=chunk_size, GATE=gate_kind(g), USE_DH=dh is not None,
                 IEEE=q.dtype == torch.float32, **tables.tune_key)
    return out


def launch_dqk_bwd(q, k, v, g, h, do, dh, tables, scale, chunk_size, *, dv_new=None, u=None):
    """Returns dq, dk, dw (delta rule) or None, dB = q.dq - k.dk per token (T_total, H) fp32 for a scalar decay
    (None otherwise) and, for the gated delta rule, sum_v dv_new (v_new - u) per token.
    For a vector decay the intra-chunk parts of dq, dk are added here (chunk_intra)."""
    t_total, heads, dk = q.shape
    dv = v.shape[-1]
    bk = block_sizes(dk, dv)[0]
    n_kb = cdiv(dk, bk)
    dq, dk_ = torch.empty_like(q), torch.empty_like(k)
    dw = torch.empty_like(k) if dv_new is not None else None
    gate = gate_kind(g)
    db = q.new_empty(t_total, heads, n_kb, dtype=torch.float32) if gate == 1 else None
    d_scores = q.new_empty(tables.n_chunks, heads, chunk_size, chunk_size, dtype=torch.float32) if gate == 2 else None
    dvu = q.new_empty(t_total, heads, dtype=torch.float32) if dv_new is not None and gate == 1 else None
    launch_split(dqk_bwd, lambda n: (n_kb, n, heads), tables.n_chunks, q, k, v, g, h, do, dh, dv_new, u, dq, dk_, dw,
                 db, d_scores, dvu, tables.cu, tables.chunk_indices, scale, H=heads, K=dk, V=dv, C=chunk_size,
                 BK=bk, GATE=gate, DELTA=dv_new is not None, IEEE=q.dtype == torch.float32, **tables.tune_key)
    if gate == 2:
        launch_intra_bwd(q, k, g, d_scores, dq, dk_, tables, chunk_size)
    return dq, dk_, dw, None if db is None else db.sum(-1), dvu


def log_decay_grad(q, k, dq, dk, db, ht, dht, tables, chunk_size):
    """dg from dB (given per token for a scalar decay, db (T_total, H); from q dq - k dk for a vector one, db None)
    and the final-state term ``S_T . dS_T`` at each sequence's last token: a per-sequence reverse cumulative sum."""
    t_total, heads, dk_ = q.shape
    vector = db is None
    final = None
    if dht is not None:
        final = (ht * dht).sum(-1)                                        # (N, H, K)
        final = (final if vector else final.sum(-1)).contiguous()
    width = dk_ if vector else 1
    dg = q.new_empty(t_total, heads, width, dtype=torch.float32)
    bk = _tile(dk_) if vector else 1
    launch_split(decay_grad, lambda n: (cdiv(width, bk), n), tables.n_seqs * heads, q, k, dq, dk, db, final, dg,
                 tables.cu, tables.chunk_offsets, unit=heads, H=heads, K=width, C=chunk_size, BK=bk, VECTOR=vector,
                 HAS_FINAL=final is not None, num_warps=4)
    return dg if vector else dg[..., 0]


class ChunkGLAFunction(torch.autograd.Function):
    """q, k (B, T, H, K), v (B, T, H, V), g None | (H,) (constant) | (B, T, H) | (B, T, H, K) fp32, h0 None |
    (N, H, K, V)."""

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, cu_seqlens, chunk_size):
        bsz, seq_len, heads, dk = q.shape
        dv = v.shape[-1]
        tables = chunk_tables(cu_seqlens, bsz, seq_len, chunk_size, q.device)
        flat = lambda t: None if t is None else t.reshape(bsz * seq_len, heads, -1).contiguous()  # noqa: E731
        qf, kf, vf = flat(q), flat(k), flat(v)
        constant = g is not None and g.dim() == 1
        gf = None if g is None or constant else g.reshape(bsz * seq_len, *g.shape[2:]).contiguous()
        h0c = None if h0 is None else h0.float().contiguous()
        # a constant decay goes to the forward kernels as it is (GATE 3): no (T, H) tensor, no cumsum
        gc = g.contiguous() if constant else launch_chunk_cumsum(gf, tables, chunk_size)
        scores = None
        if gate_kind(gf) == 2:
            scores = launch_intra_fwd(qf, kf, gc, tables, chunk_size)
        split = segment_split(tables, heads, dk, dv)
        walk_tables, segments, local = tables, None, None
        if split is not None:
            # each segment's own final state, then the walk over the segments
            _, local, _ = launch_state_fwd(kf, vf, gc, None, split.tables, chunk_size, store_h=False)
            walk_tables, segments = split.tables, (split, local, None)
        if fused_forward(walk_tables, heads, dk, dv):
            o, ht = launch_fused_fwd(qf, kf, vf, gc, scores, h0c, walk_tables, scale, chunk_size, segments=segments)
        else:
            h, ht, _ = launch_state_fwd(kf, vf, gc, h0c, walk_tables, chunk_size, segments=segments)
            o = launch_output_fwd(qf, kf, vf, gc, h, tables, scale, chunk_size, scores)
        ctx.save_for_backward(qf, kf, vf, gc, h0c, local, ht, scores)
        ctx.meta = (tables, split, scale, chunk_size, q.shape, v.shape, h0 is not None,
                    h0.dtype if h0 is not None else None)
        return o.view(bsz, seq_len, heads, dv), ht

    @staticmethod
    @first_order
    def backward(ctx, do, dht):
        qf, kf, vf, gc, h0c, local, ht, scores = ctx.saved_tensors
        tables, split, scale, chunk_size, q_shape, v_shape, has_h0, h0_dtype = ctx.meta
        bsz, seq_len, heads, dk = q_shape
        constant = gc is not None and gc.dim() == 1
        if constant and ctx.needs_input_grad[3]:
            # the decay's gradient is summed from the per-token one: the kernels take the per-token form
            gc = launch_chunk_cumsum(gc.expand(bsz * seq_len, heads).contiguous(), tables, chunk_size)
        dof = do.reshape(bsz * seq_len, heads, -1).contiguous()
        dht_c = None if dht is None else dht.float().contiguous()
        need_dh0 = has_h0 and ctx.needs_input_grad[4]
        if split is None:
            h, _, _ = launch_state_fwd(kf, vf, gc, h0c, tables, chunk_size)
            dh, dh0, _ = launch_state_bwd(qf, kf, dof, gc, dht_c, tables, scale, chunk_size, need_dh0=need_dh0)
        else:
            h, _, _ = launch_state_fwd(kf, vf, gc, h0c, split.tables, chunk_size, segments=(split, local, None))
            # each segment's own d initial_state, then the reverse walk over the segments
            _, local_d, _ = launch_state_bwd(qf, kf, dof, gc, None, split.tables, scale, chunk_size, store_dh=False)
            dh, dh0, _ = launch_state_bwd(qf, kf, dof, gc, dht_c, split.tables, scale, chunk_size,
                                          need_dh0=need_dh0, segments=(split, local_d, None))
        dv = launch_dv_bwd(qf, kf, gc, dof, dh, tables, scale, chunk_size, scores)
        dq, dk, _, db, _ = launch_dqk_bwd(qf, kf, vf, gc, h, dof, dh, tables, scale, chunk_size)
        dg = None
        if gc is not None and ctx.needs_input_grad[3]:
            dg = log_decay_grad(qf, kf, dq, dk, db, ht, dht_c, tables, chunk_size)
            dg = dg.sum(0) if constant else dg.view(bsz, seq_len, *gc.shape[1:])
        return (dq.view(q_shape), dk.view(q_shape), dv.view(v_shape), dg,
                None if dh0 is None else dh0.to(h0_dtype), None, None, None)


def chunk_gla(q, k, v, g, scale, initial_state, cu_seqlens, chunk_size):
    """g: None | (B, T, H, 1) | (B, T, H, K) fp32 (expanded; one the same at every token, as ``gla`` makes of a
    ``(H,)`` decay, is taken as a constant per head). Returns (o, final_state fp32)."""
    if g is not None and g.shape[-1] == 1:
        g = g[..., 0]
    if g is not None and g.dim() == 3 and all(st == 0 or n == 1 for n, st in zip(g.shape[:2], g.stride()[:2])):
        g = g[0, 0]
    return ChunkGLAFunction.apply(q, k, v, g, initial_state, scale, cu_seqlens, chunk_size)
