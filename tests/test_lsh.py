"""Reformer LSH attention: the hashing's properties, the reference against the dense fp64 oracle (outputs, LSE,
gradients), the Triton path against the reference (under TRITON_INTERPRET=1 on CPU), the rules that make it one
softmax over the rounds' union (each pair once, the self pair, queries with no key), the one-bucket limit (exact
attention), bad input, and the LSHAttention layer's cached decoding."""

from __future__ import annotations

import os

import pytest
import torch

import subquad
from subquad.masks import PARTIAL
from subquad.nn import LSHAttention
from subquad.ops.grid import interpreting
from subquad.ops.lsh import default_chunk
from subquad.ops.lsh.flash import chunk_block_mask, earlier_chunks
from subquad.ops.lsh.hashing import buckets, draw_rotations, length_normalized, sort_rounds
from subquad.ops.lsh.reference import by_query_head

import oracles

os.environ.setdefault("SUBQUAD_FLASH_AUTOTUNE", "0")
TRITON = interpreting() or torch.cuda.is_available()
needs_triton = pytest.mark.skipif(not TRITON, reason="needs TRITON_INTERPRET=1 or a GPU")
DEV = "cuda" if torch.cuda.is_available() else "cpu"

# Triton against the reference: max |err| <= ATOL + RTOL * max |ref|, for outputs and gradients; LSE absolute (the
# shared-QK keys are normalised in fp32 for the reference's fp32 inputs, and rounded to the kernels' dtype)
TOL = {torch.float16: (2e-3, 5e-3), torch.bfloat16: (1e-2, 2e-2)}
LSE_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _qkv(bsz, seq, hq, hkv, d, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(bsz, seq, h, d, generator=g).to(device, dtype).requires_grad_() for h in (hq, hkv, hkv)]


def _oracle(q, k, v, *, n_buckets, n_hashes, chunk, causal, shared_qk, seed):
    """The oracle on the sorts that ``lsh_attention(seed=seed)`` makes (hashing is shared code)."""
    hq, hkv, d = q.shape[2], k.shape[2], q.shape[3]
    rotations = draw_rotations(hkv, n_hashes, d, n_buckets, "cpu", torch.Generator().manual_seed(seed))
    k_rounds = sort_rounds(buckets(k, rotations, n_buckets))
    q_rounds = k_rounds if shared_qk else sort_rounds(buckets(q, rotations, n_buckets))
    keys = length_normalized(k) if shared_qk else k
    return oracles.lsh_attention(q, keys, v, by_query_head(q_rounds, hq).rank, by_query_head(k_rounds, hq).rank,
                                 chunk, causal=causal, shared_qk=shared_qk)


def _grads(out, lse, inputs, seed=1):
    """d/d(q, k, v) of a random projection of the output plus the finite LSEs (both outputs carry gradient)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.device)
    loss = (out.double() * w.double()).sum() + torch.where(torch.isfinite(lse), lse, 0).double().sum()
    return torch.autograd.grad(loss, inputs)


def _close(name, got, ref, atol, rtol):
    got, ref = got.double().cpu(), ref.double().cpu()
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = (got - ref).abs().max().item()
    bound = atol + rtol * ref.abs().max().item()
    assert err <= bound, f"{name}: max err {err:.3e} > {bound:.3e}"


def _lse_close(got, ref, atol):
    got, ref = got.cpu(), ref.cpu()
    assert torch.equal(torch.isneginf(got), torch.isneginf(ref)), "lse: the rows with no key differ"
    finite = torch.isfinite(ref)
    assert (got[finite].double() - ref[finite].double()).abs().max().item() <= atol


# ---- hashing ---------------------------------------------------------------------------------------------------

def test_hashes_are_angular_and_reproducible():
    x = torch.randn(2, 50, 3, 8, dtype=torch.float64)
    rot = draw_rotations(3, 4, 8, 6, "cpu", torch.Generator().manual_seed(5))
    b = buckets(x, rot, 6)
    assert b.shape == (2, 3, 4, 50) and int(b.min()) >= 0 and int(b.max()) < 6
    assert torch.equal(buckets(3.5 * x, rot, 6), b)                   # the direction decides, not the length
    assert torch.equal(buckets(-x, rot, 6), (b + 3) % 6)              # antipodes: the other half of [xR; -xR]
    assert torch.equal(draw_rotations(3, 4, 8, 6, "cpu", torch.Generator().manual_seed(5)), rot)
    assert not torch.equal(buckets(x, draw_rotations(3, 4, 8, 6, "cpu", torch.Generator().manual_seed(6)), 6), b)


def test_buckets_are_the_argmax_over_the_rotations_and_their_negation_to_the_last_tie():
    """``buckets`` takes the argmax of ``[xR; -xR]`` without concatenating: the same index wherever extremes tie
    (integer rotations of integer vectors tie often, between + and - too), with zero rows and NaN."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-2, 3, (2, 64, 2, 4), generator=g).double()
    x[0, :8] = 0.0
    x[1, 3, 1, 2] = float("nan")
    rot = torch.randint(-1, 2, (2, 3, 4, 5), generator=g).float()
    rotated = torch.einsum("bnhd,hrdk->bhrnk", x.float(), rot)
    assert torch.equal(buckets(x, rot, 10), torch.cat([rotated, -rotated], -1).argmax(-1))


def test_rounds_sort_by_bucket_then_position():
    bucket = torch.randint(0, 4, (2, 3, 2, 40))
    rounds = sort_rounds(bucket)
    sorted_buckets = bucket.gather(-1, rounds.order)
    assert (sorted_buckets[..., 1:] >= sorted_buckets[..., :-1]).all()
    ties = sorted_buckets[..., 1:] == sorted_buckets[..., :-1]
    assert (rounds.order[..., 1:] > rounds.order[..., :-1])[ties].all()
    assert torch.equal(rounds.order.gather(-1, rounds.rank), torch.arange(40).expand(2, 3, 2, 40))


def test_seed_and_generator_give_the_same_hashes_and_the_default_generator_follows_manual_seed():
    q, k, v = _qkv(1, 24, 2, 2, 8)
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=4)
    a = subquad.lsh_attention(q, k, v, seed=7, **kw)
    assert torch.equal(a, subquad.lsh_attention(q, k, v, generator=torch.Generator().manual_seed(7), **kw))
    assert not torch.equal(a, subquad.lsh_attention(q, k, v, seed=8, **kw))
    torch.manual_seed(3)
    b = subquad.lsh_attention(q, k, v, **kw)
    torch.manual_seed(3)
    assert torch.equal(b, subquad.lsh_attention(q, k, v, **kw))


# ---- the reference against the dense oracle ----------------------------------------------------------------------

@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("shared_qk", [True, False])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 2), (2, 1)], ids=["gqa", "mqa"])
def test_reference_matches_the_oracle(causal, shared_qk, n_hashes, heads):
    """37 tokens in chunks of 5 (the last one short), 4 buckets: outputs, LSE and gradients."""
    q, k, v = _qkv(2, 37, *heads, 8, seed=n_hashes)
    kw = dict(n_buckets=4, n_hashes=n_hashes, causal=causal, shared_qk=shared_qk, seed=11)
    out, lse = subquad.lsh_attention(q, k, v, chunk_size=5, return_lse=True, backend="reference", **kw)
    ref_out, ref_lse = _oracle(q, k, v, chunk=5, **kw)
    _close("out", out, ref_out, 1e-5, 1e-5)
    _lse_close(lse, ref_lse, 1e-5)
    for name, got, ref in zip("qkv", _grads(out, lse, (q, k, v)), _grads(ref_out, ref_lse, (q, k, v))):
        _close(f"d{name}", got, ref, 1e-5, 1e-5)


def test_more_rounds_add_pairs_and_approach_exact_attention():
    """One seed's first rounds are the same whatever their number, so more rounds only add pairs to each query's
    union: its LSE grows towards exact attention's, and so does the output."""
    q, k, v = _qkv(1, 64, 2, 2, 8)
    kw = dict(n_buckets=8, chunk_size=4, causal=True, seed=2, return_lse=True, backend="reference")
    exact, exact_lse = subquad.attention(q, k, v, causal=True, return_lse=True, backend="reference")
    errors, lses = [], []
    for n_hashes in (1, 4, 16):
        out, lse = subquad.lsh_attention(q, k, v, n_hashes=n_hashes, **kw)
        errors.append((out - exact).abs().mean().item())
        lses.append(lse)
    assert (lses[0] <= lses[1] + 1e-6).all() and (lses[1] <= lses[2] + 1e-6).all()
    assert (lses[2] <= exact_lse + 1e-6).all() and (lses[2] > lses[0] + 1e-3).any()
    assert errors[0] > errors[1] > errors[2]


# ---- each pair once; the one-bucket limit ------------------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_one_bucket_and_one_chunk_is_exact_attention(causal):
    """n_buckets=1 puts every token in one bucket; a chunk over the whole sequence then sees every pair, and
    four identical rounds must count each pair once (the LSE would be log 4 too high otherwise)."""
    q, k, v = _qkv(2, 30, 4, 2, 8)
    out, lse = subquad.lsh_attention(q, k, v, n_buckets=1, n_hashes=4, chunk_size=30, causal=causal,
                                     return_lse=True, backend="reference")
    exact, exact_lse = subquad.attention(q, k, v, causal=causal, return_lse=True, backend="reference")
    _close("out", out, exact, 1e-5, 1e-5)
    _lse_close(lse, exact_lse, 1e-5)


def test_identical_rounds_count_each_pair_once():
    """One bucket and short chunks: every round finds the same pairs (chunks of the natural order), so any
    number of rounds gives the one-round result."""
    q, k, v = _qkv(1, 30, 2, 2, 8)
    kw = dict(n_buckets=1, chunk_size=8, causal=True, shared_qk=True, return_lse=True, backend="reference")
    one, one_lse = subquad.lsh_attention(q, k, v, n_hashes=1, **kw)
    three, three_lse = subquad.lsh_attention(q, k, v, n_hashes=3, **kw)
    _close("out", three, one, 1e-6, 1e-6)
    _lse_close(three_lse, one_lse, 1e-6)


def test_shared_qk_drops_the_self_pair_and_keeps_it_for_a_query_with_no_other_key():
    """Causal, shared QK: token 0 has no other key, so it attends to itself alone (Reformer's rule); the others
    never see themselves."""
    q, k, v = _qkv(2, 20, 2, 2, 8)
    qk = k.detach().clone().requires_grad_()
    out, lse = subquad.lsh_attention(qk, qk, v, n_buckets=1, n_hashes=1, chunk_size=20, causal=True, shared_qk=True,
                                     return_lse=True, backend="reference")
    keys = length_normalized(qk)
    _close("token 0", out[:, 0], v[:, 0], 1e-6, 0)
    own = (qk[:, 0] * keys[:, 0]).sum(-1) * 8 ** -0.5
    _close("token 0's LSE", lse[:, :, 0], own, 1e-5, 0)
    no_self = ~torch.eye(20, dtype=torch.bool) & torch.ones(20, 20, dtype=torch.bool).tril()
    no_self[0, 0] = True
    ref, ref_lse = oracles.softmax_attention(qk, keys, v, mask=no_self)
    _close("out", out, ref, 1e-5, 1e-5)
    _lse_close(lse, ref_lse, 1e-5)
    assert all(torch.isfinite(g).all() for g in _grads(out, lse, (qk, v)))


def test_a_query_with_no_key_gets_zeros_and_no_nan():
    """Causal without shared QK: a query whose rounds put no earlier key near it gets 0 and LSE -inf, and finite
    gradients."""
    q, k, v = _qkv(1, 40, 2, 2, 8, seed=4)
    out, lse = subquad.lsh_attention(q, k, v, n_buckets=8, n_hashes=1, chunk_size=2, causal=True, seed=1,
                                     return_lse=True, backend="reference")
    empty = torch.isneginf(lse)
    assert empty.any() and not empty.all()
    assert (out.transpose(1, 2)[empty] == 0).all()
    assert all(torch.isfinite(g).all() for g in _grads(out, lse, (q, k, v)))


def test_default_chunk_and_short_sequences():
    """The default chunk is at least 64 tokens: a shorter sequence is one chunk, exact attention."""
    assert default_chunk(4096, 64) == 128 and default_chunk(1000, 64) == 64 and default_chunk(30, 64) == 30
    q, k, v = _qkv(1, 50, 2, 2, 8)
    _close("out", subquad.lsh_attention(q, k, v, causal=True, backend="reference"),
           subquad.attention(q, k, v, causal=True, backend="reference"), 1e-5, 1e-5)


# ---- the Triton path -------------------------------------------------------------------------------------------

def test_the_chunk_block_mask_visits_exactly_the_blocks_with_pairs():
    seq, chunk, block = 100, 8, 32
    kind = chunk_block_mask(seq, chunk, block, True, torch.device("cpu")).kind[0, 0]
    index = torch.arange(seq)
    gap = index.view(-1, 1) // chunk - index.view(1, -1) // chunk
    rows, cols = ((gap >= 0) & (gap <= 1)).nonzero(as_tuple=True)
    blocks = torch.zeros(4, 4, dtype=torch.bool)
    blocks[rows // block, cols // block] = True
    assert torch.equal(kind == PARTIAL, blocks) and not blocks.all()


def test_the_earlier_chunk_tables_hold_each_sorted_tokens_chunk_in_the_rounds_before():
    """The kernels' tables (``earlier_chunks``): row ``s`` of round ``r``'s element at sorted index ``i`` is the
    chunk in round ``s`` of the token that round ``r`` sorts to ``i``; the queries' rows of rounds not before
    ``r`` find no pair (``0 <= q - k <= 1`` fails against any chunk)."""
    rounds = sort_rounds(torch.randint(0, 4, (2, 3, 4, 40)))
    chunk = 6
    q_table = earlier_chunks(rounds.rank, rounds.order, chunk, True).view(2, 3, 4, 3, 40)
    k_table = earlier_chunks(rounds.rank, rounds.order, chunk, False).view(2, 3, 4, 3, 40)
    assert q_table.dtype == k_table.dtype == torch.int32
    for r in range(4):
        for s in range(3):
            want = (rounds.rank[:, :, s] // chunk).gather(-1, rounds.order[:, :, r])
            assert torch.equal(k_table[:, :, r, s].long(), want)
            if s < r:
                assert torch.equal(q_table[:, :, r, s].long(), want)
            else:
                gap = q_table[:, :, r, s].reshape(-1, 1) - k_table.reshape(1, -1)
                assert ((gap < 0) | (gap > 1)).all()


CASES = [  # (dtype, causal, shared_qk, (heads_q, heads_kv), seq, chunk, n_hashes)
    (torch.float16, True, True, (4, 2), 45, 12, 2),
    (torch.bfloat16, False, False, (4, 2), 45, 12, 2),
    (torch.float16, True, False, (2, 1), 100, 8, 3),
    (torch.bfloat16, False, True, (2, 2), 40, 16, 2),
    (torch.float16, False, False, (2, 2), 80, 32, 3),     # chunks of whole 32-blocks: the window from the blocks
    (torch.bfloat16, True, False, (2, 2), 64, 16, 4),     # three earlier rounds in the chunk tables
    (torch.float16, True, True, (2, 1), 40, 8, 1),        # one round: no tables
]


@needs_triton
@pytest.mark.parametrize("dtype, causal, shared_qk, heads, seq, chunk, n_hashes", CASES,
                         ids=[f"{str(c[0])[6:]}-{'causal' if c[1] else 'full'}-{'shared' if c[2] else 'qk'}-"
                              f"{c[3][0]}x{c[3][1]}-n{c[4]}" for c in CASES])
def test_triton_matches_the_reference(dtype, causal, shared_qk, heads, seq, chunk, n_hashes):
    q, k, v = _qkv(1, seq, *heads, 16, dtype, DEV)
    kw = dict(n_buckets=4, n_hashes=n_hashes, chunk_size=chunk, causal=causal, shared_qk=shared_qk, seed=3,
              return_lse=True)
    out, lse = subquad.lsh_attention(q, k, v, backend="triton", **kw)
    ref_in = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, ref_lse = subquad.lsh_attention(*ref_in, backend="reference", **kw)
    atol, rtol = TOL[dtype]
    _close("out", out, ref, atol, rtol)
    _lse_close(lse, ref_lse, LSE_TOL[dtype])
    for name, got, want in zip("qkv", _grads(out, lse, (q, k, v)), _grads(ref, ref_lse, ref_in)):
        _close(f"d{name}", got, want, atol, rtol)


@needs_triton
def test_triton_deterministic_backward_matches_the_atomic_one():
    """Under torch.use_deterministic_algorithms the backward's dQ programs walk the rounds as the forward does."""
    q, k, v = _qkv(1, 45, 4, 2, 16, torch.float16, DEV)
    kw = dict(n_buckets=4, n_hashes=2, chunk_size=12, causal=True, shared_qk=True, seed=3, backend="triton")
    atomic = torch.autograd.grad(subquad.lsh_attention(q, k, v, **kw).float().square().sum(), (q, k, v))
    torch.use_deterministic_algorithms(True)
    try:
        programs = torch.autograd.grad(subquad.lsh_attention(q, k, v, **kw).float().square().sum(), (q, k, v))
    finally:
        torch.use_deterministic_algorithms(False)
    for name, got, want in zip("qkv", programs, atomic):
        _close(f"d{name}", got, want, *TOL[torch.float16])


@needs_triton
def test_triton_one_bucket_is_exact_attention():
    q, k, v = _qkv(1, 40, 2, 1, 16, torch.float16, DEV)
    out, lse = subquad.lsh_attention(q, k, v, n_buckets=1, n_hashes=2, chunk_size=40, causal=True,
                                     return_lse=True, backend="triton")
    exact, exact_lse = subquad.attention(q, k, v, causal=True, return_lse=True, backend="triton")
    _close("out", out, exact, *TOL[torch.float16])
    _lse_close(lse, exact_lse, 2e-3)


# ---- bad input ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, match", [
    (dict(k=torch.randn(1, 12, 2, 8), v=torch.randn(1, 12, 2, 8)), r"k: expected shape \(1, 16, heads_kv, 8\)"),
    (dict(q=torch.randn(16, 2, 8)), r"q: expected shape \(batch, seq, heads, head_dim\)"),
    (dict(k=torch.randn(1, 16, 3, 8), v=torch.randn(1, 16, 3, 8)), "k: expected H_kv dividing"),
    (dict(n_buckets=3), "n_buckets: expected 1 or a positive even int"),
    (dict(n_buckets=0), "n_buckets"),
    (dict(n_hashes=0), "n_hashes: expected a positive int"),
    (dict(chunk_size=0), "chunk_size: expected None or a positive int"),
    (dict(causal="yes"), "causal: expected a bool"),
    (dict(seed=1, generator=torch.Generator()), "seed, generator: pass one of them"),
    (dict(backend="fa4"), "backend: expected one of"),
])
def test_bad_input(change, match):
    args = {**dict(q=torch.randn(1, 16, 2, 8), k=torch.randn(1, 16, 2, 8), v=torch.randn(1, 16, 2, 8)), **change}
    with pytest.raises(ValueError, match=match):
        subquad.lsh_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


# ---- the layer ---------------------------------------------------------------------------------------------------

def test_layer_cached_decoding_is_the_forward_over_each_prefix():
    """With chunks shorter than the sequence, a cached step at position t gives what the layer's forward over
    tokens 0..t gives at t (later tokens move the chunks, so not the whole sequence's forward)."""
    torch.manual_seed(0)
    layer = LSHAttention(16, 2, n_buckets=4, n_hashes=2, chunk_size=3).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    cache = layer.new_cache(2, 16)
    steps = [layer(x[:, :5], cache)] + [layer(x[:, t:t + 1], cache) for t in range(5, 12)]
    prefixes = [layer(x[:, :5])] + [layer(x[:, :t + 1])[:, t:] for t in range(5, 12)]
    for got, want in zip(steps, prefixes):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    assert not torch.allclose(torch.cat(steps, 1), layer(x), atol=1e-4)


def test_layer_matches_the_op_on_its_projections():
    torch.manual_seed(1)
    layer = LSHAttention(16, 2, n_buckets=4, n_hashes=3, chunk_size=4, position="none", seed=9).double()
    x = torch.randn(1, 13, 16, dtype=torch.float64)
    qk = layer.qk_proj(x).view(1, 13, 2, 8)
    v = layer.v_proj(x).view(1, 13, 2, 8)
    o = subquad.lsh_attention(qk, qk, v, n_buckets=4, n_hashes=3, chunk_size=4, causal=True, shared_qk=True, seed=9)
    torch.testing.assert_close(layer(x), layer.o_proj(o.reshape(1, 13, 16)))
