"""Varlen suite (GPU): chunked prefill through ``varlen_attention``, whose query and key lengths differ.

Eight sequences, each 1,024 new queries over 8,192 keys (a cached prefix of 7,168 and the new tokens), causal
aligned bottom-right; 32 query heads over 8 KV heads, D = 128, bf16; fwd and fwd+bwd. Every sequence has the
same lengths so that the batched peers can run it:

* ``subquad-varlen``: packed, ``varlen_attention`` (the flash kernels at the sequences' positions, with the
  document term keeping them apart);
* ``subquad-batched``: the same as a batch ``(8, 1024)`` x ``(8, 8192)`` through ``attention(causal=True)`` (a
  band, no positions, no documents): what packing costs the kernels;
* ``sdpa-flash``, ``sdpa-efficient``: SDPA with ``causal_lower_right``;
* ``fa4-varlen``: FlashAttention-4's varlen kernels through ``varlen_attention(backend="fa4")``, where installed.
"""

from __future__ import annotations

import torch

from ... import attention, varlen_attention
from ..attention_cases import sample_rows
from ..harness import Case, attention_flops, suite

SEQS, NEW, KEYS, HEADS_Q, HEADS_KV, DIM, DTYPE = 8, 1024, 8192, 32, 8, 128, torch.bfloat16


def _inputs(seqs: int, new: int, keys: int, grad: bool):
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        shapes = {"q": (seqs, new, HEADS_Q, DIM), "k": (seqs, keys, HEADS_KV, DIM), "v": (seqs, keys, HEADS_KV, DIM)}
        return {name: torch.randn(shape, generator=gen, device=device, dtype=DTYPE).requires_grad_(grad)
                for name, shape in shapes.items()}

    return make


def _packed(backend: str):
    def run(inputs):
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        seqs, new, keys = q.shape[0], q.shape[1], k.shape[1]
        cu_q = torch.arange(seqs + 1, device=q.device, dtype=torch.int32) * new
        cu_k = torch.arange(seqs + 1, device=q.device, dtype=torch.int32) * keys
        out = varlen_attention(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, causal=True,
                               backend=backend)
        return out.view(seqs, new, *out.shape[1:])

    return run


def _batched(inputs):
    return attention(inputs["q"], inputs["k"], inputs["v"], causal=True, backend="triton")


def _sdpa(backend: str):
    def run(inputs):
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right
        from torch.nn.functional import scaled_dot_product_attention

        q, k, v = (inputs[x].transpose(1, 2) for x in ("q", "k", "v"))
        # (SDPA's flash and efficient kernels take a causal_lower_right bias, not GQA's enable_gqa with it)
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            out = scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]))
        return out.transpose(1, 2)

    return run


def _reference(rows: torch.Tensor):
    """Exact fp64 rows of bottom-right causal GQA attention."""

    def ref(inputs):
        q, k, v = inputs["q"], inputs["k"], inputs["v"]
        new, keys, g = q.shape[1], k.shape[1], q.shape[2] // k.shape[2]
        r = rows.to(q.device)
        s = torch.einsum("bqhd,bkhd->bhqk", q[:, r].double(), k.double().repeat_interleave(g, 2)) * DIM ** -0.5
        keep = torch.arange(keys, device=q.device).view(1, -1) <= (r + keys - new).view(-1, 1)
        p = torch.softmax(s.masked_fill(~keep, float("-inf")), -1)
        return torch.einsum("bhqk,bkhd->bqhd", p, v.double().repeat_interleave(g, 2))

    return ref


@suite("varlen", device="cuda")
def varlen_cases(quick: bool):
    from ...ops.softmax import fa4

    seqs, new, keys = (2, 256, 1024) if quick else (SEQS, NEW, KEYS)
    pairs = new * (keys - new) + new * (new + 1) / 2          # per sequence and head
    rows = sample_rows(new)
    for mode in ("fwd", "fwdbwd"):
        impls = {"subquad-varlen": _packed("auto"), "subquad-batched": _batched,
                 "sdpa-flash": _sdpa("FLASH_ATTENTION"), "sdpa-efficient": _sdpa("EFFICIENT_ATTENTION")}
        if fa4.is_installed():
            impls["fa4-varlen"] = _packed("fa4")
        yield Case(case=f"prefill{new}over{keys}", mode=mode, batch=seqs, seqlen=keys, heads_q=HEADS_Q,
                   heads_kv=HEADS_KV, head_dim=DIM, dtype=DTYPE, make_inputs=_inputs(seqs, new, keys, mode == "fwdbwd"),
                   impls=impls, flops=attention_flops(seqs, HEADS_Q, pairs, DIM, mode), reference=_reference(rows),
                   error_rows=rows, extra={"new_tokens": new, "density": round(pairs / (new * keys), 5)})
