"""Building blocks for attention benchmark cases: inputs, exact-row references, effective FLOPs."""

from __future__ import annotations

import torch

from .. import masks
from .harness import Case, attention_flops


def qkv_inputs(batch: int, seqlen: int, heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype,
               grad: bool, seed: int = 0):
    """A ``make_inputs`` function: unit-scale random q, k, v (never zeros, see METHOD.md)."""

    def make(device: torch.device) -> dict:
        gen = torch.Generator(device=device).manual_seed(seed)
        shape_q = (batch, seqlen, heads_q, head_dim)
        shape_kv = (batch, seqlen, heads_kv, head_dim)
        out = {name: torch.randn(shape, generator=gen, device=device, dtype=dtype).requires_grad_(grad)
               for name, shape in (("q", shape_q), ("k", shape_kv), ("v", shape_kv))}
        return out

    return make


def sample_rows(seqlen: int, count: int = 48) -> torch.Tensor:
    """Query rows where errors are checked: spread over the sequence, the first and the last included."""
    rows = torch.linspace(0, seqlen - 1, steps=min(count, seqlen)).round().long()
    return torch.unique(rows)


def exact_rows(pattern: masks.Pattern | None, rows: torch.Tensor):
    """A reference ``fn(inputs)``: exact attention in fp64 at the sampled query rows, mask materialised
    from the pattern's predicate for those rows only (O(rows x N) memory)."""

    def ref(inputs: dict) -> torch.Tensor:
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        n, g = k.shape[1], q.shape[2] // k.shape[2]
        r = rows.to(q.device)
        qr = q[:, r].double()
        kk = k.double().repeat_interleave(g, dim=2)
        vv = v.double().repeat_interleave(g, dim=2)
        s = torch.einsum("bqhd,bkhd->bhqk", qr, kk) * q.shape[-1] ** -0.5
        if pattern is not None:
            b = torch.arange(q.shape[0], device=q.device).view(-1, 1, 1, 1)
            h = torch.arange(q.shape[2], device=q.device).view(1, -1, 1, 1)
            keep = pattern.prepare(masks.BuildContext(q.shape[0], q.shape[2], q.shape[1], n, q.device)).predicate(
                b, h, r.view(1, 1, -1, 1), torch.arange(n, device=q.device).view(1, 1, 1, -1))
            s = s.masked_fill(~keep, float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        return torch.einsum("bhqk,bkhd->bqhd", p, vv)

    return ref


def kept_pairs(pattern: masks.Pattern | None, seqlen: int, device) -> float:
    """Kept (query, key) pairs of one (batch, head) slice, counted exactly from the BlockMask."""
    if pattern is None:
        return float(seqlen) * seqlen
    bm = masks.BlockMask.build(pattern, batch=1, heads=1, seq_q=seqlen, seq_kv=seqlen, device=device)
    return float(bm.kept_pairs())


def attention_case(name: str, pattern: masks.Pattern | None, mode: str, *, batch: int, seqlen: int,
                   heads_q: int, heads_kv: int, head_dim: int, dtype: torch.dtype, impls: dict,
                   device="cpu", extra: dict | None = None) -> Case:
    """A case of exact attention under ``pattern`` (None: full), errors checked against fp64 on sampled
    rows, FLOPs counted on kept pairs only."""
    rows = sample_rows(seqlen)
    pairs = kept_pairs(pattern, seqlen, device)
    return Case(case=name, mode=mode, batch=batch, seqlen=seqlen, heads_q=heads_q, heads_kv=heads_kv,
                head_dim=head_dim, dtype=dtype,
                make_inputs=qkv_inputs(batch, seqlen, heads_q, heads_kv, head_dim, dtype, grad=mode == "fwdbwd"),
                impls=impls, flops=attention_flops(batch, heads_q, pairs, head_dim, mode),
                reference=exact_rows(pattern, rows), error_rows=rows,
                extra={"density": round(pairs / (seqlen * seqlen), 5), **(extra or {})})
