"""MLA: the absorbed decode form over the latent cache equals the decompressed (training) form."""

from __future__ import annotations

import pytest
import torch

from subquad.cache import LatentKVCache
from subquad.nn.mla import MLA
from subquad.ops.grid import interpreting


def _layer(q_lora_rank=24, seed=0):
    torch.manual_seed(seed)
    return MLA(64, 4, kv_lora_rank=32, q_lora_rank=q_lora_rank, qk_nope_dim=16, rope_dim=8, v_dim=16)


@pytest.mark.parametrize("q_lora_rank", [24, None])
def test_absorbed_decode_equals_decompressed(q_lora_rank):
    """Whole sequence without a cache (decompressed) vs prefill of 20 tokens then steps of 1 and 3 tokens
    through the latent cache (absorbed)."""
    m = _layer(q_lora_rank)
    x = torch.randn(2, 30, 64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 32)
        outs = [m(x[:, :20], cache)]
        for a, b in ((20, 21), (21, 24), (24, 25), (25, 28), (28, 30)):
            outs.append(m(x[:, a:b], cache))
    assert cache.seqlens.tolist() == [30, 30]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_absorbed_form_is_not_trivially_equal():
    """The comparison above can fail: a wrong RoPE position on the cached keys changes the output."""
    m = _layer()
    x = torch.randn(1, 12, 64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(1, 16)
        m(x[:, :10], cache)
        cache.seqlens.add_(1)  # the device copy of the lengths drives RoPE positions: shift it
        step = m(x[:, 10:11], cache)
    assert not torch.allclose(step, full[:, 10:11], atol=1e-4)


@pytest.mark.skipif(not interpreting() and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 or a GPU")
def test_absorbed_with_the_decode_kernel():
    """The absorbed steps through the split-KV kernel's latent layout (K = [c_kv, k_rope], V = c_kv): under
    the interpreter on the CPU, else compiled on the GPU (fp32: full-precision products there too)."""
    dev = "cpu" if interpreting() else "cuda"
    m = _layer().to(dev)
    x = torch.randn(2, 14, 64, device=dev)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 16)
        m(x[:, :12], cache)
        m.backend = "triton"
        step = m(x[:, 12:14], cache)
    torch.testing.assert_close(step, full[:, 12:14], atol=1e-5, rtol=1e-5)


def test_new_cache_holds_latent_rows_only():
    m = _layer()
    cache = m.new_cache(3, 100)
    assert isinstance(cache, LatentKVCache)
    assert cache.latent.shape == (3, 100, 1, 32 + 8)
    # per token: kv_lora_rank + rope_dim values, vs 2 * heads * head_dim for a per-head cache
    assert cache.nbytes == 3 * 100 * 40 * 4 + 3 * 4


def test_bad_inputs():
    m = _layer()
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 5, 63))
    with pytest.raises(ValueError, match="cache"):
        m(torch.randn(2, 5, 64), LatentKVCache(2, 8, 16, 8, torch.float32))
    with pytest.raises(ValueError, match="rope_dim"):
        MLA(64, 4, rope_dim=7)


def test_prefill_over_a_cache_of_rows_of_different_lengths():
    """A chunk of more than 16 tokens over a cache whose rows hold different lengths (a row rewound through
    ``cache.update(positions=...)``, as after rejected draft tokens) attends, per row, over that row's own keys,
    as the absorbed steps and the softmax layers' caches do: row 1 must not see row 0's longer tail."""
    from subquad.nn.mla import _rotary
    m = _layer()
    torch.manual_seed(1)
    x = torch.randn(2, 20, 64)
    extra = torch.randn(2, 1, 64)
    new = torch.randn(2, 17, 64)

    def latent(tok, pos):
        kv = m.wkv_a(tok)
        return m.kv_norm(kv[..., :32]), _rotary(kv[..., 32:], torch.tensor([[pos[0]], [pos[1]]]), m.rope_base)

    with torch.no_grad():
        cache = m.new_cache(2, 48)
        m(x, cache)
        # row 0 appends a 21st token; row 1 is rewound to 12 tokens and writes its 13th
        c0, r0 = latent(extra[:1], (20, 20))
        c1, r1 = latent(extra[1:], (12, 12))
        cache.update(torch.cat([c0, c1]), torch.cat([r0[:1], r1[1:]]), positions=torch.tensor([20, 12]))
        assert cache.seqlens.tolist() == [21, 13]
        out = m(new, cache)
        want0 = m(torch.cat([x[:1], extra[:1], new[:1]], 1))[:, -17:]
        want1 = m(torch.cat([x[1:, :12], extra[1:], new[1:]], 1))[:, -17:]
    torch.testing.assert_close(out[:1], want0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1:], want1, atol=1e-5, rtol=1e-5)


def test_prefill_over_a_cache_of_another_dtype():
    """A bf16 latent cache under an fp32 layer (``new_cache(dtype=...)``, as the softmax layers take): a
    chunk of more than 16 tokens decompresses the cached rows through ``wkv_b``, which failed on the dtype."""
    m = _layer()
    x = torch.randn(2, 21, 64)
    with torch.no_grad():
        full = m(x)
        cache = m.new_cache(2, 24, dtype=torch.bfloat16)
        assert cache.latent.dtype == torch.bfloat16
        out = torch.cat([m(x[:, :3], cache), m(x[:, 3:20], cache), m(x[:, 20:], cache)], 1)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, full, atol=2e-2, rtol=0)
