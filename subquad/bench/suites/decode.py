"""Decode suite (GPU): one new token against a long KV cache, a memory-bandwidth problem.

* GQA decode, B=8, H_q=32, H_kv=8, D=128, bf16, contexts 8k / 32k / 128k: subquad's split-KV kernel over a
  static cache and over a paged cache (pages of 16 tokens, shuffled in the pool as a running server leaves
  them), beside SDPA's flash and cuDNN backends and flash-attn's ``flash_attn_with_kvcache`` when installed.
  GB/s counts K and V read once.
* MLA absorbed decode, B=64, 128 heads, latent 512 + 64 (K = [c_kv, k_rope], V = c_kv): GB/s on the
  latent cache.
* The device-to-device copy bandwidth of the same run (1 GiB copy, bytes read + written): the ceiling the
  decode rows are compared with.
"""

from __future__ import annotations

import torch

from ...cache import KVView
from ...ops.decode import decode
from .. import peers
from ..harness import Case, suite

PAGE = 16


def _gqa_inputs(batch, seqlen, hq, hkv, d, dtype):
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, 1, hq, d, generator=gen, device=device, dtype=dtype)
        k = torch.randn(batch, seqlen, hkv, d, generator=gen, device=device, dtype=dtype)
        v = torch.randn(batch, seqlen, hkv, d, generator=gen, device=device, dtype=dtype)
        pages = seqlen // PAGE
        table = torch.randperm(batch * pages, generator=gen, device=device).view(batch, pages).to(torch.int32)
        k_pool = torch.empty(batch * pages, PAGE, hkv, d, device=device, dtype=dtype)
        v_pool = torch.empty_like(k_pool)
        k_pool[table.long()] = k.view(batch, pages, PAGE, hkv, d)
        v_pool[table.long()] = v.view(batch, pages, PAGE, hkv, d)
        seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        paged = KVView(k_pool, v_pool, seqlens, "paged", block_table=table, max_seqlen=seqlen)
        return {"q": q, "k": k, "v": v, "paged": paged}

    return make


def _flash_attn_kvcache(inputs):
    from flash_attn import flash_attn_with_kvcache

    return flash_attn_with_kvcache(inputs["q"], inputs["k"], inputs["v"])


def _gqa_reference(inputs):
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    g = q.shape[2] // k.shape[2]
    qf = q.float().view(q.shape[0], q.shape[2] // g, g, -1)
    s = torch.einsum("bhgd,bnhd->bhgn", qf, k.float()) * q.shape[-1] ** -0.5
    o = torch.einsum("bhgn,bnhd->bhgd", torch.softmax(s, -1), v.float())
    return o.reshape(q.shape)       # fp32: the error column against the rounded output was one bf16 step for all


def _mla_inputs(batch, seqlen, heads, rank, rope, dtype):
    def make(device):
        gen = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(batch, 1, heads, rank + rope, generator=gen, device=device, dtype=dtype)
        latent = torch.randn(batch, seqlen, 1, rank + rope, generator=gen, device=device, dtype=dtype)
        seqlens = torch.full((batch,), seqlen, dtype=torch.int32, device=device)
        view = KVView(latent, latent[..., :rank], seqlens, "dense", max_seqlen=seqlen)
        return {"q": q, "latent": latent, "view": view}

    return make


def _mla_reference(rank):
    def ref(inputs):
        q, lat = inputs["q"][:, 0].float(), inputs["latent"][:, :, 0].float()
        s = torch.einsum("bhd,bnd->bhn", q, lat) * q.shape[-1] ** -0.5
        o = torch.einsum("bhn,bnd->bhd", torch.softmax(s, -1), lat[..., :rank])
        return o.unsqueeze(1)

    return ref


@suite("decode", device="cuda")
def decode_cases(quick: bool):
    gib = 1 << 28 if quick else 1 << 30
    yield Case(case="device-copy", mode="fwd", batch=1, seqlen=gib // 2**20, heads_q=1, heads_kv=1, head_dim=1,
               dtype=torch.bfloat16, bytes=2.0 * gib,
               make_inputs=lambda device: {"src": torch.randn(gib // 2, device=device, dtype=torch.bfloat16),
                                           "dst": torch.empty(gib // 2, device=device, dtype=torch.bfloat16)},
               impls={"torch-copy": lambda i: i["dst"].copy_(i["src"])},
               extra={"note": "seqlen = MiB copied; GB/s counts read + written"})

    b, hq, hkv, d, dtype = 8, 32, 8, 128, torch.bfloat16
    for n in ([4096] if quick else [8192, 32768, 131072]):
        yield Case(case="gqa-decode", mode="decode", batch=b, seqlen=n, heads_q=hq, heads_kv=hkv, head_dim=d,
                   dtype=dtype, bytes=2.0 * b * n * hkv * d * 2, make_inputs=_gqa_inputs(b, n, hq, hkv, d, dtype),
                   impls={"subquad-static": lambda i: decode(i["q"], i["k"], i["v"]),
                          "subquad-paged": lambda i: decode(i["q"], i["paged"]),
                          "sdpa-flash": peers.sdpa("flash", enable_gqa=True),
                          "sdpa-cudnn": peers.sdpa("cudnn", enable_gqa=True),
                          "flash-attn-kvcache": _flash_attn_kvcache},
                   reference=_gqa_reference, extra={"page_size": PAGE, "new_tokens": 1})

    b, heads, rank, rope = 64, 128, 512, 64
    for n in ([1024] if quick else [4096, 16384]):
        yield Case(case="mla-absorbed-decode", mode="decode", batch=b, seqlen=n, heads_q=heads, heads_kv=1,
                   head_dim=rank + rope, dtype=dtype, bytes=2.0 * b * n * (rank + rope),
                   make_inputs=_mla_inputs(b, n, heads, rank, rope, dtype),
                   impls={"subquad-triton": lambda i: decode(i["q"], i["view"])},
                   reference=_mla_reference(rank), extra={"kv_lora_rank": rank, "rope_dim": rope})
