"""State passing for the decayed linear family over gloo on the CPU: spawned ranks each hold one contiguous shard
of a sequence; the concatenated outputs, the final state and the gradients of q, k, v, the decay and the initial
state must equal ``subquad.gla`` / ``retention`` / ``linear_attention`` over the whole sequence (and the fp64
recurrence), for per-key, per-token, per-head and no decay. Each world size is spawned once and runs every case;
the tests below check what its ranks saved."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import subquad

from distributed import assert_gathered, run_ranks, value_errors
from oracles import gla_recurrence

# shard length 13: not a multiple of the engine's chunks; `state_on`: the rank whose loss holds the final state
CASES = {
    "gla-per-key": dict(op="gla", decay="key", initial=True, state_on=0),
    "gla-per-token": dict(op="gla", decay="token", initial=False, state_on=-1),
    "retention": dict(op="retention", decay="gamma", initial=True, state_on=-1),
    "linear-no-decay": dict(op="linear", decay=None, initial=True, state_on=0),
}
WORLDS = (1, 2, 4)
B, SHARD, H, DK, DV = 2, 13, 2, 16, 8


def _whole(name: str, world: int) -> dict:
    """The case's whole-sequence inputs and the weights of its loss, ``sum(out * w_out) + sum(state * w_state)``."""
    case = CASES[name]
    g = torch.Generator().manual_seed(sorted(CASES).index(name))
    n = world * SHARD
    x = dict(q=torch.randn(B, n, H, DK, generator=g), k=torch.randn(B, n, H, DK, generator=g),
             v=torch.randn(B, n, H, DV, generator=g))
    if case["decay"] == "key":
        x["decay"] = F.logsigmoid(torch.randn(B, n, H, DK, generator=g) + 2)
    elif case["decay"] == "token":
        x["decay"] = F.logsigmoid(torch.randn(B, n, H, generator=g) + 2)
    elif case["decay"] == "gamma":
        x["decay"] = 0.8 + 0.19 * torch.rand(H, generator=g)
    if case["initial"]:
        x["initial"] = torch.randn(B, H, DK, DV, generator=g)
    x["w_out"] = torch.randn(B, n, H, DV, generator=g)
    x["w_state"] = torch.randn(B, H, DK, DV, generator=g)
    return x


def _elu1(x):
    return F.elu(x) + 1


def _sharded_call(name, q, k, v, decay, initial, group):
    op = CASES[name]["op"]
    if op == "retention":
        return subquad.sharded_retention(q, k, v, decay, group, initial_state=initial, output_state=True)
    if op == "linear":
        return subquad.sharded_gla(_elu1(q), _elu1(k), v, None, group, initial_state=initial, output_state=True)
    return subquad.sharded_gla(q, k, v, decay, group, initial_state=initial, output_state=True)


def _whole_call(name, q, k, v, decay, initial):
    op = CASES[name]["op"]
    if op == "retention":
        return subquad.retention(q, k, v, decay, initial_state=initial, output_state=True)
    if op == "linear":
        return subquad.linear_attention(q, k, v, "elu1", normalize=False, initial_state=initial, output_state=True)
    return subquad.gla(q, k, v, decay, initial_state=initial, output_state=True)


def _sharded_decay(decay, rank, world):
    """A per-token decay is sharded with the sequence; a per-head one (gamma) is every rank's."""
    if decay is None:
        return None
    return (decay.chunk(world, 1)[rank] if decay.dim() > 1 else decay.clone()).requires_grad_()


def _bad_inputs(rank: int) -> dict:
    """The ValueError message of each bad call on this rank."""
    def qkv(n=6):
        return [torch.randn(1, n, 2, 8) for _ in range(3)]

    calls = {
        # rank 1's shard is longer than rank 0's
        "unequal-shards": lambda: subquad.sharded_gla(*qkv(6 + 2 * rank)),
        # each rank's decay is valid alone, but their forms differ: their states could not be combined
        "decay-forms-differ": lambda: subquad.sharded_gla(*qkv(), torch.zeros((1, 6, 2) + (8,) * rank)),
        # only rank 1's is wrong: rank 0 must raise too rather than wait in the gather
        "decay-on-one-rank": lambda: subquad.sharded_gla(*qkv(), torch.zeros(2 + rank)),
        "gamma-on-one-rank": lambda: subquad.sharded_retention(*qkv(), torch.full((2 + rank,), 0.9)),
        "initial-state-on-one-rank": lambda: subquad.sharded_gla(
            *qkv(), initial_state=None if rank else torch.zeros(1, 2, 8, 8)),
        # only rank 0 wants gradients: rank 1 would not join the backward's collective
        "grad-on-one-rank": lambda: subquad.sharded_gla(*[t.requires_grad_(rank == 0) for t in qkv()]),
        "scale-differs": lambda: subquad.sharded_gla(*qkv(), scale=0.5 + rank),
    }
    return value_errors(calls)


def _rank_case(name: str, rank: int, world: int, group=None) -> dict:
    """What the case's call on ``rank`` of ``world`` (its rank in ``group``) saves."""
    x = _whole(name, world)
    q, k, v, w_out = (x[key].chunk(world, 1)[rank].requires_grad_(key != "w_out") for key in ("q", "k", "v", "w_out"))
    decay = _sharded_decay(x.get("decay"), rank, world)
    initial = x["initial"].clone().requires_grad_() if "initial" in x else None
    out, state = _sharded_call(name, q, k, v, decay, initial, group)
    loss = (out * w_out).sum()
    if rank == CASES[name]["state_on"] % world:
        loss = loss + (state * x["w_state"]).sum()
    loss.backward()
    return dict(out=out.detach(), state=state.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                d_decay=None if decay is None else decay.grad, d_initial=None if initial is None else initial.grad)


def _rank_cases(rank: int, world: int) -> dict:
    saved = {name: _rank_case(name, rank, world) for name in CASES}
    if world == 2:
        saved["bad"] = _bad_inputs(rank)
        # q, k, v frozen, the initial state learnt: rank 1's output must want its gradient too, or it skips the
        # backward's collective and rank 0 waits there
        x = _whole("gla-per-key", 2)
        initial = x["initial"].clone().requires_grad_()
        out = subquad.sharded_gla(*(x[key].chunk(2, 1)[rank] for key in ("q", "k", "v", "decay")),
                                  initial_state=initial)
        (out * x["w_out"].chunk(2, 1)[rank]).sum().backward()
        saved["frozen-qkv-initial-grad"] = initial.grad
    if world == 4:
        # every rank makes the group; ranks 1 and 3 hold the two shards of world 2's sequence
        group = dist.new_group([1, 3])
        if rank in (1, 3):
            saved["group-of-ranks-1-3"] = _rank_case("gla-per-key", rank // 2, 2, group)
        else:
            q = torch.randn(1, 4, 2, 8)
            saved["not-in-group"] = value_errors({"call": lambda: subquad.sharded_gla(q, q, q, group=group)})
    return saved


def _whole_sequence(name: str, world: int, oracle: bool = False) -> dict:
    """out, the final state and the gradients over the whole sequence, from the subquad op or the fp64
    recurrence."""
    x = _whole(name, world)
    dtype = torch.float64 if oracle else torch.float32
    q, k, v = (x[key].to(dtype).requires_grad_() for key in ("q", "k", "v"))
    decay = x["decay"].to(dtype).requires_grad_() if "decay" in x else None
    initial = x["initial"].to(dtype).requires_grad_() if "initial" in x else None
    if oracle:
        op = CASES[name]["op"]
        log_decay = decay.log().view(1, 1, H, 1).expand(B, world * SHARD, H, 1) if op == "retention" else decay
        fq, fk = (_elu1(q), _elu1(k)) if op == "linear" else (q, k)
        out, state = gla_recurrence(fq, fk, v, log_decay, DK ** -0.5, initial)
    else:
        out, state = _whole_call(name, q, k, v, decay, initial)
    ((out * x["w_out"].to(dtype)).sum() + (state * x["w_state"].to(dtype)).sum()).backward()
    return dict(out=out.detach(), state=state.detach(), dq=q.grad, dk=k.grad, dv=v.grad,
                d_decay=None if decay is None else decay.grad, d_initial=None if initial is None else initial.grad)


def _gathered(ranks: list[dict], name: str, key: str):
    """The whole sequence's value of ``key`` from the ranks': concatenated shards, the sum of every rank's
    gradient of a per-head decay, rank 0's final state (every rank's is compared to it) and initial-state
    gradient (its initial state is the one used)."""
    got = [r[name][key] for r in ranks]
    if key in ("state", "d_initial"):
        return got[0]
    if key == "d_decay" and got[0] is not None and got[0].dim() == 1:
        return torch.stack(got).sum(0)
    return None if got[0] is None else torch.cat(got, 1)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", list(CASES))
def test_sharded_equals_whole_sequence(name, world, tmp_path_factory):
    ranks = run_ranks(_rank_cases, world, tmp_path_factory)
    # world 1 adds what a zero entering state adds: nothing
    assert_gathered(_whole_sequence(name, world), lambda key: _gathered(ranks, name, key),
                    1e-6 if world == 1 else 2e-5, f"{name}, world {world}")
    for rank, saved in enumerate(ranks):
        torch.testing.assert_close(saved[name]["state"], ranks[0][name]["state"], atol=0, rtol=0,
                                   msg=lambda m: f"{name}, world {world}: rank {rank}'s final state: {m}")
        if rank:
            assert saved[name]["d_initial"] is None, f"{name}: rank {rank}'s initial state, not read, got a gradient"


@pytest.mark.parametrize("name", ["gla-per-key", "retention", "linear-no-decay"])
def test_sharded_equals_fp64_recurrence(name, tmp_path_factory):
    ranks = run_ranks(_rank_cases, 4, tmp_path_factory)
    assert_gathered(_whole_sequence(name, 4, oracle=True), lambda key: _gathered(ranks, name, key), 5e-5, name)


def test_sharded_in_a_group_of_some_ranks(tmp_path_factory):
    """A group other than the default group's first ranks (gloo's differentiable all-gather failed there)."""
    ranks = run_ranks(_rank_cases, 4, tmp_path_factory)
    members = [{"gla-per-key": ranks[r]["group-of-ranks-1-3"]} for r in (1, 3)]
    assert_gathered(_whole_sequence("gla-per-key", 2), lambda key: _gathered(members, "gla-per-key", key), 2e-5,
                    "ranks 1 and 3 of 4")
    for rank in (0, 2):
        assert ranks[rank]["not-in-group"]["call"].startswith(
            "group: expected a process group that this rank belongs to"), ranks[rank]["not-in-group"]


def test_initial_state_learnt_with_qkv_frozen(tmp_path_factory):
    """Rank 0's initial state gets the whole sequence's gradient; rank 1's copy enters nowhere (zero)."""
    ranks = run_ranks(_rank_cases, 2, tmp_path_factory)
    x = _whole("gla-per-key", 2)
    initial = x["initial"].clone().requires_grad_()
    out = subquad.gla(x["q"], x["k"], x["v"], x["decay"], initial_state=initial)
    (out * x["w_out"]).sum().backward()
    torch.testing.assert_close(ranks[0]["frozen-qkv-initial-grad"], initial.grad, atol=2e-5, rtol=2e-5)
    assert torch.equal(ranks[1]["frozen-qkv-initial-grad"], torch.zeros_like(initial.grad))


def test_bad_input_raises_on_every_rank(tmp_path_factory):
    ranks = run_ranks(_rank_cases, 2, tmp_path_factory)
    for rank, saved in enumerate(ranks):
        bad = saved["bad"]
        assert set(bad) == {"unequal-shards", "decay-forms-differ", "decay-on-one-rank", "gamma-on-one-rank",
                            "initial-state-on-one-rank", "grad-on-one-rank", "scale-differs"}, \
            f"rank {rank} did not raise: {bad}"
        assert bad["grad-on-one-rank"].startswith("q, k, v, log_decay, initial_state: expected gradients wanted"), \
            bad["grad-on-one-rank"]
        assert bad["scale-differs"].startswith("scale, output_state: expected the same on every rank"), \
            bad["scale-differs"]
        assert bad["unequal-shards"].startswith("q: expected the same shape on every rank"), bad["unequal-shards"]
        assert bad["decay-forms-differ"].startswith("log_decay: expected the same shape on every rank"), \
            bad["decay-forms-differ"]
        assert bad["initial-state-on-one-rank"].startswith("initial_state: expected the same shape on every rank"), \
            bad["initial-state-on-one-rank"]
        assert "None on rank" in bad["initial-state-on-one-rank"], bad["initial-state-on-one-rank"]
    assert ranks[1]["bad"]["decay-on-one-rank"].startswith("log_decay: expected None or a tensor of shape (2,)")
    assert ranks[1]["bad"]["gamma-on-one-rank"].startswith("gamma: expected a tensor of shape (2,)")
    for name in ("decay-on-one-rank", "gamma-on-one-rank"):
        assert "rank 1 of the group was given input it rejects" in ranks[0]["bad"][name], ranks[0]["bad"][name]


def test_without_a_process_group_raises():
    q = torch.randn(1, 4, 2, 8)
    with pytest.raises(ValueError, match="group: expected an initialized torch.distributed process group"):
        subquad.sharded_gla(q, q, q)
