"""KV caches: the update/view contract per layout, memory, page bookkeeping, bad inputs."""

from __future__ import annotations

import pytest
import torch

from subquad.cache import LatentKVCache, PagedKVCache, RollingKVCache, StaticKVCache


def _stream(b=2, n=40, h=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, n, h, d, generator=g), torch.randn(b, n, h, d, generator=g)


def test_static_append_and_rewind():
    k, v = _stream()
    c = StaticKVCache(2, 32, 2, 8, torch.float32)
    c.update(k[:, :10], v[:, :10])
    view = c.update(k[:, 10:13], v[:, 10:13])
    assert c.seqlens.tolist() == [13, 13] and view.max_seqlen == 13
    kd, vd, n = view.dense()
    assert torch.equal(kd, k[:, :13]) and torch.equal(vd, v[:, :13])
    # rewind sequence 1 by two tokens (rejected draft) and write different ones there
    view = c.update(k[:, 20:22], v[:, 20:22], positions=torch.tensor([13, 11]))
    assert c.seqlens.tolist() == [15, 13]
    kd, _, n = view.dense()
    assert torch.equal(kd[0, 13:15], k[0, 20:22]) and torch.equal(kd[1, 11:13], k[1, 20:22])
    assert torch.equal(kd[1, :11], k[1, :11])
    c.reset()
    assert c.seqlens.tolist() == [0, 0]


def test_rolling_memory_is_o_window_and_slots_map_to_positions():
    k, v = _stream(n=100)
    w = 8
    c = RollingKVCache(2, w, 2, 8, torch.float32, max_step=2)
    sizes = set()
    for i in range(0, 100, 2):
        view = c.update(k[:, i:i + 2], v[:, i:i + 2])
        sizes.add(c.nbytes)
    assert len(sizes) == 1 and c.k.shape[1] == w + 1  # window + max_step - 1 slots, whatever the length
    length = 100
    for s in range(c.slots):  # the documented mapping: slot s holds L - 1 - ((L - 1 - s) mod slots)
        p = length - 1 - (length - 1 - s) % c.slots
        assert torch.equal(view.k[:, s], k[:, p])
    kd, _, n = view.dense()
    assert n.tolist() == [c.slots] * 2 and torch.equal(kd, k[:, length - c.slots:length])


def test_paged_pages_follow_lengths_and_are_reused():
    k, v = _stream(b=3, n=40)
    c = PagedKVCache(num_pages=12, page_size=4, heads_kv=2, head_dim=8, dtype=torch.float32, batch=3)
    view = c.update(k[:, :9], v[:, :9])
    assert c.pages_in_use == 3 * 3  # ceil(9 / 4)
    kd, vd, _ = view.dense()
    assert torch.equal(kd, k[:, :9]) and torch.equal(vd, v[:, :9])
    c.free(1)
    assert c.pages_in_use == 6 and c.seqlens.tolist() == [9, 0, 9]
    with pytest.raises(ValueError, match="out of pages"):
        c.update(k[:, :12], v[:, :12])  # needs 3 + 3 + 3 more pages, 6 are free
    assert c.pages_in_use == 6 and c.seqlens.tolist() == [9, 0, 9]  # a failed update changes nothing
    c.reset()
    assert c.pages_in_use == 0
    view = c.update(k[:, :16], v[:, :16])
    assert c.pages_in_use == 12 and torch.equal(view.dense()[0], k[:, :16])
    # pages of one sequence are scattered over the pool: the block table is what keeps them in order
    assert c.nbytes == 2 * 12 * 4 * 2 * 8 * 4 + c.block_table.numel() * 4 + 3 * 4


def test_latent_rows_share_storage():
    c = LatentKVCache(2, 16, kv_lora_rank=12, rope_dim=4, dtype=torch.float32)
    ckv, kr = torch.randn(2, 5, 12), torch.randn(2, 5, 4)
    view = c.update(ckv, kr)
    assert view.k.shape == (2, 16, 1, 16) and view.v.shape == (2, 16, 1, 12)
    assert view.v.data_ptr() == view.k.data_ptr()
    assert torch.equal(view.k[:, :5, 0], torch.cat([ckv, kr], -1))
    assert c.nbytes == 2 * 16 * 16 * 4 + 2 * 4  # one latent row per token, not per-head K and V


def test_bad_inputs():
    k, v = _stream()
    c = StaticKVCache(2, 16, 2, 8, torch.float32)
    with pytest.raises(ValueError, match="k: expected shape"):
        c.update(k[:, :, :1], v[:, :, :1])
    with pytest.raises(ValueError, match="overflow"):
        c.update(k[:, :17], v[:, :17])
    with pytest.raises(ValueError, match="positions"):
        c.update(k[:, :1], v[:, :1], positions=torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="positions"):
        c.update(k[:, :1], v[:, :1], positions=torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="max_len"):
        StaticKVCache(2, 0, 2, 8)
    for cls, args in ((StaticKVCache, (2, 8)), (RollingKVCache, (2, 4)), (PagedKVCache, (4, 4))):
        with pytest.raises(ValueError, match="head_dim_v"):
            cls(*args, 2, 8, head_dim_v=0)
    r = RollingKVCache(2, 4, 2, 8, torch.float32)
    r.update(k[:, :6], v[:, :6])
    with pytest.raises(ValueError, match="rewind"):
        r.update(k[:, :1], v[:, :1], positions=3)
    with pytest.raises(ValueError, match="c_kv"):
        LatentKVCache(2, 8, 4, 2).update(torch.randn(2, 1, 5), torch.randn(2, 1, 2))
    p = PagedKVCache(4, 4, 2, 8, torch.float32, batch=2, max_pages_per_seq=2)
    with pytest.raises(ValueError, match="max_pages_per_seq"):
        p.update(k[:, :9], v[:, :9])


def test_rolling_dense_after_rewound_drafts():
    """Window 4, drafts of up to 3 tokens (6 slots): two rejected drafts at positions 9-10 overwrite the slots
    of positions 3-4, and after the rewind to 9 the ring holds positions 5-9 only; ``dense`` listed a draft as
    position 4. Once the stream passes the drafts the ring is whole again."""
    k, _ = _stream(b=1, n=12, h=1, d=2)
    r = RollingKVCache(1, 4, 1, 2, torch.float32, max_step=3)
    r.update(k[:, :9], k[:, :9])
    draft = torch.full((1, 2, 1, 2), 99.0)
    r.update(draft, draft)
    kd, _, n = r.update(k[:, 9:10], k[:, 9:10], positions=9).dense()
    assert n.tolist() == [5] and torch.equal(kd[0, :5], k[0, 5:10])
    kd, _, n = r.update(k[:, 10:11], k[:, 10:11]).dense()
    assert n.tolist() == [6] and torch.equal(kd[0], k[0, 5:11])


@pytest.mark.parametrize("make", [lambda: StaticKVCache(2, 16, 2, 8, torch.float32),
                                  lambda: RollingKVCache(2, 4, 2, 8, torch.float32, max_step=3),
                                  lambda: PagedKVCache(8, 4, 2, 8, torch.float32, batch=2)])
def test_integer_tensors_and_bool_positions_are_refused(make):
    """Integer (or complex) K/V were cast into the cache silently, and a bool ``positions`` (a mask of accepted
    drafts passed by mistake) passed as an integer tensor: ``[False, False]`` rewound every sequence to 0."""
    k, v = _stream(n=3)
    c = make()
    c.update(k, v)
    with pytest.raises(ValueError, match="k: expected a floating-point dtype"):
        c.update(k.long(), v)
    with pytest.raises(ValueError, match="v: expected a floating-point dtype"):
        c.update(k, v.to(torch.complex64))
    for bad in (torch.tensor([False, False]), True):
        with pytest.raises(ValueError, match=r"positions: expected an int or an integer \(not bool\) tensor"):
            c.update(k[:, :1], v[:, :1], positions=bad)
    assert c.seqlens.tolist() == [3, 3]
    with pytest.raises(ValueError, match="k_rope: expected a floating-point dtype"):
        LatentKVCache(2, 8, 4, 2).update(torch.randn(2, 1, 4), torch.ones(2, 1, 2, dtype=torch.long))
