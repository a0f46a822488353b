"""Naive fp64 oracles: each mechanism written the slowest, most obvious way (dense scores with the mask
materialised, recurrences as Python loops). References are tested against these. One section per mechanism."""

from __future__ import annotations

import torch


# ---------------------------------------------------------------------------------------------------------------
# Linear attention, decayed recurrences and the delta rule (issue 6): token-by-token recurrences in fp64.
# ---------------------------------------------------------------------------------------------------------------

def gla_recurrence(q, k, v, log_decay=None, scale=1.0, initial_state=None):
    """S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t; o_t = scale q_t S_t. q, k (B, T, H, K), v (B, T, H, V),
    log_decay None | (B, T, H, 1) | (B, T, H, K). Returns o (B, T, H, V) and the final state, fp64."""
    q, k, v = q.double(), k.double(), v.double()
    b, t, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64) if initial_state is None \
        else initial_state.double().clone()
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        if log_decay is not None:
            state = log_decay[:, i].double().exp().unsqueeze(-1) * state
        state = state + k[:, i].unsqueeze(-1) * v[:, i].unsqueeze(-2)
        out[:, i] = scale * torch.einsum("bhk,bhkv->bhv", q[:, i], state)
    return out, state


def delta_rule_recurrence(q, k, v, beta, log_decay=None, scale=1.0, initial_state=None):
    """S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T; o_t = scale q_t S_t, written with the
    explicit (K, K) transition matrix. log_decay None | (B, T, H). Returns o and the final state, fp64."""
    q, k, v, beta = q.double(), k.double(), v.double(), beta.double()
    b, t, h, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[-1], dtype=torch.float64) if initial_state is None \
        else initial_state.double().clone()
    eye = torch.eye(dk, dtype=torch.float64)
    out = torch.zeros(b, t, h, v.shape[-1], dtype=torch.float64)
    for i in range(t):
        kt, bt = k[:, i], beta[:, i][..., None, None]
        transition = eye - bt * kt.unsqueeze(-1) * kt.unsqueeze(-2)
        if log_decay is not None:
            transition = log_decay[:, i].double().exp()[..., None, None] * transition
        state = transition @ state + bt * kt.unsqueeze(-1) * v[:, i].unsqueeze(-2)
        out[:, i] = scale * torch.einsum("bhk,bhkv->bhv", q[:, i], state)
    return out, state


def linear_attention_quadratic(fq, fk, v, weight=None, causal=True, normalize=True, eps=1e-6):
    """Dense form of feature-map attention: scores fq_i . fk_j (times weight[i, j] if given, e.g. cosFormer's
    cos((i - j) pi / 2M)), causal mask, optional normalisation by the row sum. fp64."""
    scores = torch.einsum("bihd,bjhd->bhij", fq.double(), fk.double())
    if weight is not None:
        scores = scores * weight.double()
    if causal:
        n = scores.shape[-1]
        scores = scores * torch.ones(n, n, dtype=torch.float64).tril()
    o = torch.einsum("bhij,bjhd->bihd", scores, v.double())
    if normalize:
        o = o / (scores.sum(-1).transpose(1, 2).unsqueeze(-1) + eps)
    return o


# ---------------------------------------------------------------------------------------------------------------
# Exact softmax attention (issue 3): dense fp64 scores, the mask materialised from the pattern's predicate.
# ---------------------------------------------------------------------------------------------------------------

def softmax_attention(q, k, v, *, mask=None, causal=False, scale=None, softcap=None, alibi_slopes=None,
                      q_pos=None, kv_pos=None, sinks=None, score_mod=None, dropout_keep=None, dropout_p=0.0):
    """Dense attention in fp64, differentiable. q (B, Nq, Hq, D), k/v (B, Nkv, Hkv, D*); K/V repeated for
    GQA/MQA. ``mask``: a pattern (materialised with ``pattern.to_dense``) or a bool tensor broadcastable to
    (B, Hq, Nq, Nkv); ``causal`` keeps k_pos <= q_pos. Query i sits at i + Nkv - Nq unless ``q_pos`` /
    ``kv_pos`` say otherwise (then the mask must be a bool tensor over those positions, or a pattern whose
    predicate is evaluated on them). ALiBi adds -slope * |q_pos - k_pos|. Returns (out (B, Nq, Hq, Dv),
    lse (B, Hq, Nq)) with out 0 and lse -inf on rows with no kept key. ``sinks`` (Hq,): one more key per head,
    seen by every query, with that logit and a zero value. ``score_mod(s, b, h, q_pos, k_pos)`` after ALiBi, on
    broadcast (B, Hq, Nq, Nkv) index tensors. ``dropout_keep`` (B, Hq, Nq, Nkv) bool: the probabilities it drops
    leave the output (not the LSE), the rest scaled by ``1 / (1 - dropout_p)``."""
    b, nq, hq, d = q.shape
    nkv, hkv = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    # on the CPU whatever the inputs' device (the masks below are built there), differentiable back to them
    qd, kd, vd = q.double().cpu(), k.double().cpu(), v.double().cpu()
    kd = kd.repeat_interleave(hq // hkv, dim=2)
    vd = vd.repeat_interleave(hq // hkv, dim=2)
    s = torch.einsum("bqhd,bkhd->bhqk", qd, kd) * scale
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    qp = torch.arange(nq) + nkv - nq if q_pos is None else q_pos.cpu().long()
    kp = torch.arange(nkv) if kv_pos is None else kv_pos.cpu().long()
    if alibi_slopes is not None:
        slopes = alibi_slopes.double().cpu().reshape(-1, hq)  # (1 or B, Hq)
        s = s - slopes[:, :, None, None] * (qp.view(-1, 1) - kp.view(1, -1)).abs().double()
    if score_mod is not None:
        s = score_mod(s, torch.arange(b).view(-1, 1, 1, 1), torch.arange(hq).view(1, -1, 1, 1), qp.view(1, 1, -1, 1),
                      kp.view(1, 1, 1, -1)).double().expand(b, hq, nq, nkv)
    keep = torch.ones(b, hq, nq, nkv, dtype=torch.bool)
    if causal:
        keep = keep & (kp.view(1, -1) <= qp.view(-1, 1))
    if mask is not None:
        if isinstance(mask, torch.Tensor):
            keep = keep & mask.cpu()
        elif q_pos is None and kv_pos is None:
            keep = keep & mask.to_dense(nq, nkv, batch=b, heads=hq)
        else:
            from subquad.masks import BuildContext

            pattern = mask.prepare(BuildContext(b, hq, nq, nkv, torch.device("cpu")))
            bi = torch.arange(b).view(-1, 1, 1, 1)
            hi = torch.arange(hq).view(1, -1, 1, 1)
            keep = keep & pattern.predicate(bi, hi, qp.view(1, 1, -1, 1), kp.view(1, 1, 1, -1))
    if sinks is not None:
        s = torch.cat([s, sinks.double().cpu().view(1, -1, 1, 1).expand(b, hq, nq, 1)], -1)
        keep = torch.cat([keep.expand(b, hq, nq, nkv), torch.ones(b, hq, nq, 1, dtype=torch.bool)], -1)
        vd = torch.cat([vd, vd.new_zeros(b, 1, hq, vd.shape[-1])], 1)
    s = s.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    empty = ~keep.any(-1)
    p = torch.exp(s - torch.where(empty, torch.zeros_like(lse), lse)[..., None])
    if dropout_keep is not None:
        kept = dropout_keep.cpu().double() / (1 - dropout_p)
        p = p * (torch.cat([kept, kept.new_ones(b, hq, nq, 1)], -1) if sinks is not None else kept)
    out = torch.einsum("bhqk,bkhd->bqhd", p, vd)
    lse = lse.masked_fill(empty, float("-inf"))
    return out, lse


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False, window_size=(-1, -1), scale=None,
                     softcap=None, alibi_slopes=None, sinks=None):
    """FlashAttention's varlen contract, one sequence at a time in fp64: q (total_q, Hq, D), k/v (total_k, Hkv,
    D*); sequence i's query t sits at t + n_i - m_i (bottom right) and key j at j; ``causal`` keeps k_pos <=
    q_pos, ``window_size=(left, right)`` keeps q_pos - left <= k_pos <= q_pos + right (-1: unbounded). Returns
    (out (total_q, Hq, Dv), lse (Hq, total_q)); a query with no kept key: out 0, lse -inf."""
    hq, dv = q.shape[1], v.shape[2]
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    outs, lses = [], []
    for i in range(len(cu_seqlens_q) - 1):
        q0, q1, k0, k1 = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(cu_seqlens_k[i]), int(cu_seqlens_k[i + 1])
        m, n = q1 - q0, k1 - k0
        if m == 0:
            continue
        if n == 0:
            out = torch.zeros(m, hq, dv, dtype=torch.float64)
            lse = torch.full((hq, m), float("-inf"), dtype=torch.float64)
            if sinks is not None:
                lse = sinks.double().cpu().view(-1, 1).expand(hq, m)
            outs.append(out)
            lses.append(lse)
            continue
        qp = torch.arange(m) + n - m
        kp = torch.arange(n)
        dist = qp.view(-1, 1) - kp.view(1, -1)
        keep = torch.ones(m, n, dtype=torch.bool)
        left, right = window_size
        if causal:
            keep &= dist >= 0
        if left >= 0:
            keep &= dist <= left
        if right >= 0:
            keep &= dist >= -right
        out, lse = softmax_attention(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], mask=keep, scale=scale,
                                     softcap=softcap, alibi_slopes=alibi_slopes, q_pos=qp, kv_pos=kp, sinks=sinks)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.cat(outs), torch.cat(lses, 1)


# ---------------------------------------------------------------------------------------------------------------
# Decoding over KV caches (issue 5): every token ever written, attended densely in fp64.
# ---------------------------------------------------------------------------------------------------------------

def decode_attention(q, k_stream, v_stream, seqlens, *, window=None, scale=None, softcap=None, alibi_slopes=None,
                     sinks=None):
    """The T new queries of each sequence (at positions seqlens[b] - T .. seqlens[b] - 1) against the whole
    stream of keys written so far, k_stream/v_stream (B, >= max(seqlens), Hkv, D*) in position order: causal,
    optional sliding window (keep 0 <= q_pos - k_pos < window), softcap, ALiBi. Returns out (B, T, Hq, Dv) fp64."""
    outs = []
    t = q.shape[1]
    for b, n in enumerate([int(x) for x in seqlens]):
        mask = None
        if window is not None:
            qp = torch.arange(n - t, n).view(-1, 1)
            kp = torch.arange(n).view(1, -1)
            mask = (qp - kp) < window
        slopes = None if alibi_slopes is None else alibi_slopes.reshape(-1, q.shape[2])[
            b if alibi_slopes.dim() == 2 and alibi_slopes.shape[0] > 1 else 0]
        o, _ = softmax_attention(q[b:b + 1], k_stream[b:b + 1, :n], v_stream[b:b + 1, :n], mask=mask, causal=True,
                                 scale=scale, softcap=softcap, alibi_slopes=slopes, sinks=sinks)
        outs.append(o)
    return torch.cat(outs)


# ---------------------------------------------------------------------------------------------------------------
# Top-k block selection and Native Sparse Attention: selections by Python loops over tokens and blocks, each
# branch as dense fp64 attention under a materialised mask.
# ---------------------------------------------------------------------------------------------------------------

def _top_blocks(importance, candidates, forced, top_k):
    """The forced blocks in their order, then candidates by importance (ties: lower index), the first top_k,
    increasing, padded with -1."""
    ranked = [j for i, j in enumerate(forced) if j in candidates and j not in forced[:i]]
    ranked += sorted((j for j in candidates if j not in ranked), key=lambda j: (-importance[j], j))
    kept = sorted(ranked[:top_k])
    return kept + [-1] * (top_k - len(kept))


def nsa_selection(q, k_cmp, seq_kv, *, block, compress_block, compress_stride, top_k, scale=None):
    """NSA's choice per (batch, query token, KV head): each query head's softmax over the compressed keys whose
    block [i*stride, i*stride + compress_block) has ended, summed over the GQA group; a selection block's
    importance is the sum over compression blocks of p_i * (tokens shared with the block) / stride; candidates
    start at or before the query; forced: own block, block 0, the block before the own. (B, Nq, Hkv, top_k)."""
    b_, nq, hq, d = q.shape
    m, hkv = k_cmp.shape[1], k_cmp.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    n_blocks = -(-seq_kv // block)
    out = torch.full((b_, nq, hkv, top_k), -1, dtype=torch.long)
    for b in range(b_):
        for i in range(nq):
            t = seq_kv - nq + i
            seen = [c for c in range(m) if c * compress_stride + compress_block - 1 <= t]
            for h in range(hkv):
                p = [0.0] * m
                for head in range(h * g, (h + 1) * g):
                    if seen:
                        s = torch.stack([q[b, i, head].double() @ k_cmp[b, c, h].double() * scale for c in seen])
                        for c, pc in zip(seen, torch.softmax(s, 0).tolist()):
                            p[c] += pc
                importance = []
                for j in range(n_blocks):
                    lo, hi = j * block, (j + 1) * block
                    importance.append(sum(p[c] * max(0, min(hi, c * compress_stride + compress_block)
                                                     - max(lo, c * compress_stride)) / compress_stride
                                          for c in range(m)))
                own = t // block
                candidates = [j for j in range(n_blocks) if j * block <= t]
                out[b, i, h] = torch.tensor(_top_blocks(importance, candidates, [own, 0, own - 1], top_k))
    return out


def topk_block_selection(q, k, *, block, top_k, causal, scale=None):
    """topk_block_attention's choice: each query head's softmax over the blocks' mean keys (causal: the blocks
    complete at the query), summed over the GQA group; causal: candidates start at or before the query and its
    own block is forced. (B, Nq, Hkv, top_k)."""
    b_, nq, hq, d = q.shape
    nkv, hkv = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d ** -0.5 if scale is None else scale
    n_blocks = -(-nkv // block)
    means = torch.stack([k[:, j * block:(j + 1) * block].double().mean(1) for j in range(n_blocks)], 1)
    out = torch.full((b_, nq, hkv, top_k), -1, dtype=torch.long)
    for b in range(b_):
        for i in range(nq):
            t = nkv - nq + i
            seen = [j for j in range(n_blocks) if not causal or min((j + 1) * block, nkv) - 1 <= t]
            candidates = [j for j in range(n_blocks) if not causal or j * block <= t]
            for h in range(hkv):
                importance = [0.0] * n_blocks
                for head in range(h * g, (h + 1) * g):
                    if seen:
                        s = torch.stack([q[b, i, head].double() @ means[b, j, h] * scale for j in seen])
                        for j, pj in zip(seen, torch.softmax(s, 0).tolist()):
                            importance[j] += pj
                forced = [t // block] if causal else []
                out[b, i, h] = torch.tensor(_top_blocks(importance, candidates, forced, top_k))
    return out


def selected_blocks_mask(indices, heads_q, seq_kv, block, causal):
    """(B, Hq, Nq, Nkv) bool: key j kept for query i when its block is among indices[b, i, h // G] (causal: and
    j <= the query's position)."""
    b_, nq, hkv, _ = indices.shape
    blocks = torch.arange(seq_kv) // block
    keep = (indices.unsqueeze(-1) == blocks).any(3)                      # (B, Nq, Hkv, Nkv)
    keep = keep.repeat_interleave(heads_q // hkv, dim=2).permute(0, 2, 1, 3)
    if causal:
        keep = keep & (torch.arange(seq_kv).view(1, -1) <= torch.arange(nq).view(-1, 1) + seq_kv - nq)
    return keep


def nsa_attention(q, k, v, gates, k_cmp, v_cmp, indices, *, block, compress_block, compress_stride, window,
                  scale=None):
    """NSA's output in fp64 given its selection: gates[..., 0] * compressed + gates[..., 1] * selected +
    gates[..., 2] * window, each branch dense softmax attention under its mask (a row with no key gives 0)."""
    nq, hq, nkv = q.shape[1], q.shape[2], k.shape[1]
    q_pos = torch.arange(nkv - nq, nkv)
    ends = torch.arange(k_cmp.shape[1]) * compress_stride + compress_block - 1
    o_cmp, _ = softmax_attention(q, k_cmp, v_cmp, mask=ends.view(1, -1) <= q_pos.view(-1, 1), scale=scale,
                                 q_pos=q_pos, kv_pos=ends)
    o_slc, _ = softmax_attention(q, k, v, mask=selected_blocks_mask(indices, hq, nkv, block, True), scale=scale)
    o_win, _ = softmax_attention(q, k, v, mask=window_mask(nq, nkv, window), scale=scale)
    w = gates.double()
    return w[..., 0:1] * o_cmp + w[..., 1:2] * o_slc + w[..., 2:3] * o_win


def window_mask(nq, nkv, window):
    """(Nq, Nkv) bool: the window most recent keys of each query, itself included."""
    dist = (torch.arange(nq) + nkv - nq).view(-1, 1) - torch.arange(nkv).view(1, -1)
    return (dist >= 0) & (dist < window)
# Reformer LSH attention: each round's pairs as a dense (N, N) mask from the same sorts, their union attended
# densely in fp64.
# ---------------------------------------------------------------------------------------------------------------

def lsh_round_masks(q_rank, k_rank, chunk):
    """(B, H, rounds, N, N) bool: round r pairs query position i with key position j when j's chunk in the keys'
    sorted order is i's chunk in the queries' sorted order or the one before. Ranks (B, H, rounds, N): the sorted
    index of each position, per query head."""
    q_chunk = (q_rank // chunk).unsqueeze(-1)
    k_chunk = (k_rank // chunk).unsqueeze(-2)
    return (k_chunk <= q_chunk) & (k_chunk >= q_chunk - 1)


def lsh_attention(q, k, v, q_rank, k_rank, chunk, *, causal=False, shared_qk=False, scale=None):
    """Softmax over the union of the rounds' pairs, each pair once, in fp64. ``k`` is the keys as attended
    (length-normalised for shared QK); ranks per query head. Shared QK: the self pair is dropped, unless the
    query has no other key, then it is the only one. Returns (out (B, N, Hq, Dv), lse (B, Hq, N))."""
    n = q.shape[1]
    pairs = lsh_round_masks(q_rank.cpu(), k_rank.cpu(), chunk).any(2)
    position = torch.arange(n)
    if causal:
        pairs = pairs & (position.view(-1, 1) >= position.view(1, -1))
    if shared_qk:
        own = position.view(-1, 1) == position.view(1, -1)
        pairs = pairs & ~own
        pairs = pairs | (own & ~pairs.any(-1, keepdim=True))
    return softmax_attention(q, k, v, mask=pairs, scale=scale)
