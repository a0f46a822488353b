"""Ring attention over gloo on the CPU: spawned ranks each hold one shard of a sequence; the unsharded outputs,
LSE and gradients must equal ``subquad.attention`` over the whole sequence (and the fp64 oracle), for causal and
full attention, zig-zag and contiguous layouts, GQA/MQA and softcap. Each world size is spawned once and runs
every case; the tests below check what its ranks saved."""

from __future__ import annotations

import pytest
import torch

import subquad
from subquad.ops.ring.layout import block_calls, shard_chunks

from distributed import assert_gathered, run_ranks, value_errors
from oracles import softmax_attention

# shard lengths 7 x 2 (zig-zag: two chunks of 7) and 13 (contiguous): multiples of nothing the kernels tile by
CASES = {
    "causal-zigzag-gqa": dict(causal=True, zigzag=True, hq=4, hkv=2, shard=14),
    "causal-contiguous": dict(causal=True, zigzag=False, hq=2, hkv=2, shard=13),
    "full-zigzag-mqa": dict(causal=False, zigzag=True, hq=3, hkv=1, shard=10),
    "full-contiguous": dict(causal=False, zigzag=False, hq=2, hkv=2, shard=13),
    "causal-zigzag-softcap": dict(causal=True, zigzag=True, hq=2, hkv=1, shard=14, softcap=2.0),
}
WORLDS = (1, 2, 4)


def _whole(name: str, world: int):
    """The case's whole-sequence q, k, v and the weights of its loss, ``sum(out * w_out) + sum(lse * w_lse)``."""
    case = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    n = world * case["shard"]
    q = torch.randn(2, n, case["hq"], 16, generator=g)
    k = torch.randn(2, n, case["hkv"], 16, generator=g)
    v = torch.randn(2, n, case["hkv"], 16, generator=g)
    return q, k, v, torch.randn(2, n, case["hq"], 16, generator=g), torch.randn(2, case["hq"], n, generator=g)


def _shard(x, rank, world, zigzag, dim=1):
    return subquad.zigzag_shard(x, rank, world, dim) if zigzag else x.chunk(world, dim)[rank]


def _unshard(shards, zigzag, dim=1):
    return subquad.zigzag_unshard(shards, dim) if zigzag else torch.cat(shards, dim)


def _bad_inputs(rank: int) -> dict:
    """The ValueError message of each bad call on this rank."""
    def ring(q, k, v):
        return subquad.ring_attention(q, k, v, causal=True)

    return value_errors({
        # rank 1's shard is longer than rank 0's
        "unequal-shards": lambda: ring(*[torch.randn(1, 6 + 2 * rank, 2, 8) for _ in range(3)]),
        "heads": lambda: ring(torch.randn(1, 6, 3, 8), torch.randn(1, 6, 2, 8), torch.randn(1, 6, 2, 8)),
        # only rank 1's k has the wrong heads: rank 0 must raise too rather than wait on the ring
        "heads-on-one-rank": lambda: ring(torch.randn(1, 6, 3, 8), *[torch.randn(1, 6, 2 if rank else 1, 8)] * 2),
        # only rank 0 wants gradients: rank 1 would not join the backward's passes, and rank 0 would wait there
        "grad-on-one-rank": lambda: ring(torch.randn(1, 6, 2, 8, requires_grad=rank == 0),
                                         *[torch.randn(1, 6, 2, 8)] * 2),
        # each rank's call is valid alone, but rank 1 masks causally and rank 0 does not: a wrong result
        "causal-on-one-rank": lambda: subquad.ring_attention(*[torch.randn(1, 6, 2, 8)] * 3, causal=bool(rank)),
    })


def _rank_cases(rank: int, world: int) -> dict:
    saved = {}
    for name, case in CASES.items():
        whole = _whole(name, world)
        q, k, v, w_out = (_shard(t, rank, world, case["zigzag"]).requires_grad_(i < 3) for i, t in enumerate(whole[:4]))
        w_lse = _shard(whole[4], rank, world, case["zigzag"], dim=2)
        out, lse = subquad.ring_attention(q, k, v, causal=case["causal"], zigzag=case["zigzag"],
                                          softcap=case.get("softcap"), return_lse=True)
        ((out * w_out).sum() + (lse * w_lse).sum()).backward()
        saved[name] = dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)
    if world == 2:
        saved["bad"] = _bad_inputs(rank)
    return saved


def _gathered(ranks, name, key):
    dim = 2 if key == "lse" else 1
    return _unshard([r[name][key] for r in ranks], CASES[name]["zigzag"], dim)


def _whole_sequence(name, world, oracle=False):
    """out, lse and the gradients of q, k, v over the whole sequence, from subquad.attention or the fp64
    oracle."""
    case = CASES[name]
    q, k, v, w_out, w_lse = _whole(name, world)
    if oracle:
        q, k, v = (t.double().requires_grad_() for t in (q, k, v))
        out, lse = softmax_attention(q, k, v, causal=case["causal"], softcap=case.get("softcap"))
    else:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
        out, lse = subquad.attention(q, k, v, causal=case["causal"], softcap=case.get("softcap"), return_lse=True)
    ((out * w_out.to(out.dtype)).sum() + (lse * w_lse.to(lse.dtype)).sum()).backward()
    return dict(out=out.detach(), lse=lse.detach(), dq=q.grad, dk=k.grad, dv=v.grad)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_ring_equals_whole_sequence_attention(name, world, tmp_path_factory):
    ranks = run_ranks(_rank_cases, world, tmp_path_factory)
    # world 1 is one block merged with nothing: the plain call's values (its backward goes through the LSE
    # weights, which are exactly 1)
    assert_gathered(_whole_sequence(name, world), lambda key: _gathered(ranks, name, key),
                    1e-6 if world == 1 else 2e-5, f"{name}, world {world}")


@pytest.mark.parametrize("name", ["causal-zigzag-gqa", "causal-contiguous", "full-zigzag-mqa"])
def test_ring_equals_fp64_oracle(name, tmp_path_factory):
    ranks = run_ranks(_rank_cases, 4, tmp_path_factory)
    assert_gathered(_whole_sequence(name, 4, oracle=True), lambda key: _gathered(ranks, name, key), 5e-5, name)


def test_bad_input_raises_on_every_rank(tmp_path_factory):
    ranks = run_ranks(_rank_cases, 2, tmp_path_factory)
    for rank, saved in enumerate(ranks):
        bad = saved["bad"]
        assert set(bad) == {"unequal-shards", "heads", "heads-on-one-rank", "grad-on-one-rank",
                            "causal-on-one-rank"}, f"rank {rank} did not raise: {bad}"
        assert bad["grad-on-one-rank"].startswith("q, k, v: expected gradients wanted on every rank or on none"), \
            bad["grad-on-one-rank"]
        assert bad["causal-on-one-rank"].startswith("causal, scale, softcap, zigzag: expected the same on every "
                                                    "rank"), bad["causal-on-one-rank"]
        assert bad["unequal-shards"].startswith("q: expected the same shape on every rank"), bad["unequal-shards"]
        assert bad["heads"].startswith("k: expected H_kv dividing H_q=3"), bad["heads"]
    assert ranks[1]["bad"]["heads-on-one-rank"].startswith("k: expected H_kv dividing H_q=3")
    assert "rank 1" in ranks[0]["bad"]["heads-on-one-rank"]


def test_zigzag_shard_round_trip_and_order():
    x = torch.arange(24).view(1, 24, 1, 1)
    shards = [subquad.zigzag_shard(x, r, 3) for r in range(3)]
    # 6 chunks of 4: rank 0 holds chunks 0 and 5, rank 1 chunks 1 and 4, rank 2 chunks 2 and 3
    assert shards[0].flatten().tolist() == [0, 1, 2, 3, 20, 21, 22, 23]
    assert shards[2].flatten().tolist() == [8, 9, 10, 11, 12, 13, 14, 15]
    assert torch.equal(subquad.zigzag_unshard(shards), x)
    with pytest.raises(ValueError, match="x: expected a length along dim 1 divisible by 2 \\* world = 6"):
        subquad.zigzag_shard(x[:, :20], 0, 3)
    with pytest.raises(ValueError, match="x: expected a torch.Tensor, got list"):
        subquad.zigzag_shard(x.flatten().tolist(), 0, 3, 0)
    with pytest.raises(ValueError, match="dim: expected a dimension of x, got '1'"):
        subquad.zigzag_shard(x, 0, 3, "1")
    with pytest.raises(ValueError, match="dim: expected a dimension of the shards, got 1.0"):
        subquad.zigzag_unshard(shards, 1.0)


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("zigzag", [True, False])
def test_causal_block_calls_cover_exactly_the_causal_pairs(world, zigzag):
    """Every (query, key) pair of the whole sequence is computed once, under the right mask, by the calls of
    the steps; and zig-zag gives every rank the same number of pairs."""
    chunk = 3
    n_chunks = 2 * world if zigzag else world
    shard = n_chunks // world * chunk
    seen = torch.zeros(n_chunks * chunk, n_chunks * chunk, dtype=torch.int64)
    work = []

    def positions(rank):
        return torch.cat([torch.arange(c * chunk, (c + 1) * chunk) for c in shard_chunks(rank, world, zigzag)])

    for rank in range(world):
        pairs = 0
        for owner in range(world):
            for call in block_calls(shard_chunks(rank, world, zigzag), shard_chunks(owner, world, zigzag), shard,
                                    True):
                qp, kp = positions(rank)[call.q_start:call.q_stop], positions(owner)[:call.kv_stop]
                keep = torch.ones(len(qp), len(kp), dtype=torch.bool)
                if call.causal:
                    keep = keep.tril(len(kp) - len(qp))
                seen[qp.view(-1, 1).expand_as(keep)[keep], kp.view(1, -1).expand_as(keep)[keep]] += 1
                pairs += int(keep.sum())
        work.append(pairs)
    assert torch.equal(seen, torch.ones_like(seen).tril())
    if zigzag:
        assert len(set(work)) == 1, work


def test_without_a_process_group_raises():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="group: expected an initialized torch.distributed process group"):
        subquad.ring_attention(q, q, q)


def _gpu_rank_cases(rank: int, world: int) -> dict:
    """bf16 on this rank's GPU over NCCL, the Triton kernels for every block: causal zig-zag GQA, 4k tokens.
    Each rank also runs the whole sequence through ``subquad.attention`` and keeps its own rows of that."""
    g = torch.Generator(device="cuda").manual_seed(0)
    n, dev = 4096, torch.device("cuda", rank)
    q, k, v, w_out = (torch.randn(1, n, h, 128, generator=g, device="cuda").to(dev, torch.bfloat16)
                      for h in (8, 2, 2, 8))
    shards = [subquad.zigzag_shard(t, rank, world).detach().requires_grad_() for t in (q, k, v)]
    out = subquad.ring_attention(*shards, causal=True, backend="triton")
    (out.float() * subquad.zigzag_shard(w_out, rank, world).float()).sum().backward()
    whole = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = subquad.attention(*whole, causal=True, backend="triton")
    (ref.float() * w_out.float()).sum().backward()
    mine = [subquad.zigzag_shard(t, rank, world) for t in (ref, *(t.grad for t in whole))]
    return {name: (a.float() - b.float()).abs().max().item() / max(b.float().abs().max().item(), 1e-6)
            for name, a, b in zip(("out", "dq", "dk", "dv"), (out, *(t.grad for t in shards)), mine)}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_gpu_ring_over_nccl(tmp_path_factory):
    """Two GPUs: the ring's outputs and gradients (dK/dV summed over both ranks' queries) are the single-GPU
    call's within bf16 rounding (relative to each tensor's largest entry)."""
    for rank, errors in enumerate(run_ranks(_gpu_rank_cases, 2, tmp_path_factory, backend="nccl")):
        for name, err in errors.items():
            assert err < 2e-2, f"rank {rank}, {name}: max error {err:.2e} of the largest entry"
