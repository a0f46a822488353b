"""Execution of a pattern plan (``subquad.masks.plan``): gather, attend per component, merge by LSE.

Each component is one call of the softmax engine (the Triton flash kernel on CUDA, the reference
otherwise) on a BlockMask built for the positions that component sees:

* ``local``: q, k, v as they are;
* ``columns``: K/V gathered with ``index_select`` (its backward scatters the key gradients back to the
  original positions), the original positions passed as ``kv_pos``;
* ``rows``: the global queries gathered, against a contiguous key range (a view); split over the keys into
  chunks that run as extra batch entries and are merged by LSE, so a few long rows do not serialise;
* ``classes``: q, k, v viewed as ``(batch, seq / d, d * heads, dim)`` — residue class ``r`` of head ``h``
  becomes head ``r * heads + h`` — with no copy; ALiBi slopes are scaled by ``d`` (a class step is ``d``
  positions).

On the Triton backend a ``local`` component and ``columns`` kept by a band (the strided and fixed patterns) run
as one flash launch with two key sources (``flash_attention_with_columns``): no second read of Q, no second
output, no merge; in the backward both key sets' dK/dV passes read the one LSE, and the local part's dQ programs
walk the columns too, storing one dQ (``launch.backward_two_sources``).
Columns in whole periods (``Component.kv_stride``: the strided and fixed patterns) are gathered, and their key
gradients added back, through strided views of K and V, with no index kernels.
A deterministic call keeps them apart (each component's backward then sums its dQ in a fixed order; the gathers'
backward adds each gradient row once, their indices being unique, and the merges are elementwise).

A plan whose components all lie on the sequence as it is (``Plan.natural``: BigBird's band and random blocks) is
differentiated on the Triton backend as one backward launch of the whole pattern over the merged output and
LSE (``flash_attention_given_forward``): the gradients depend only on the pairs kept, O, LSE and dO, so the
components' own backward passes, the merge's backward and the sums of their gradients are not needed. Its
forward merges nothing: each launch after the first goes on from the output and LSE so far, in place
(``flash_attention``'s ``into``).

Results without gathered rows merge as ``out = sum_i exp(lse_i - lse) out_i``, ``lse = logsumexp_i lse_i``
(``lse_merge``: one fused Triton pass each way on the Triton backend); a row that no component reaches
stays 0 with LSE -inf, and no NaN reaches the gradients. Row components then replace their rows
(``index_copy``, differentiable in both operands).
"""

from __future__ import annotations

import functools

import torch

from ...masks.patterns import Band, BuildContext, INF, Pattern
from ...masks.plan import Component, Plan, plan
from .lse_merge import merge_lse, merge_lse_fused, merge_lse_stacked
from .reference import attention_reference


def _engine(backend: str, deterministic: bool):
    """The softmax engine: ``fn(q, k, v, block_mask, scale, softcap, alibi, q_pos, kv_pos) -> (out, lse)``."""
    if backend == "triton":
        from .flash import flash_attention_masked

        return functools.partial(flash_attention_masked, deterministic=deterministic)
    return attention_reference


def _alibi_for(alibi: torch.Tensor | None, fold: int, batch: int) -> torch.Tensor | None:
    if alibi is None or fold == 1:
        return alibi
    # head r * H + h of the folded view is head h of class r; a class step is ``fold`` positions
    return alibi.float().repeat(*([1] * (alibi.dim() - 1)), fold) * fold


def _plain_band(c: Component) -> bool:
    """A band on natural positions: the flash kernel's list-free band path runs it (no BlockMask lists). (The
    planner gives a local component its own pattern as the grid pattern: that is still a plain band.)"""
    return isinstance(c.pattern, Band) and (c.grid_pattern is None or c.grid_pattern is c.pattern) \
        and c.q_pos is None and c.kv_pos is None


def _run(c: Component, plan: Plan, q, k, v, scale, softcap, alibi, engine, deterministic, into=None):
    """``(out, lse)`` of component ``c``; ``into``: an earlier natural component's, which a natural component
    on the Triton engine goes on from in place (``flash_attention``'s ``into``)."""
    bsz, seq_q, hq, d = q.shape
    hkv = k.shape[2]
    tracing = torch.compiler.is_compiling()
    ctx = BuildContext(bsz, hq, plan.seq_q, plan.seq_kv, q.device)
    bm = c.block_mask(ctx, plan.block_q, plan.block_kv, q.device)
    if c.fold > 1:
        f = c.fold
        qf = q.reshape(bsz, seq_q // f, f * hq, d)
        kf = k.reshape(bsz, k.shape[1] // f, f * hkv, d)
        vf = v.reshape(bsz, v.shape[1] // f, f * hkv, v.shape[3])
        if engine is attention_reference:
            o, lse = engine(qf, kf, vf, bm, scale, softcap, _alibi_for(alibi, f, bsz), None, None)
        else:
            from .flash import flash_attention

            o, lse = flash_attention(qf, kf, vf, mask=c.pattern, scale=scale, softcap=softcap,
                                     alibi_slopes=_alibi_for(alibi, f, bsz), deterministic=deterministic)
        lse = lse.view(bsz, f, hq, seq_q // f).permute(0, 2, 3, 1).reshape(bsz, hq, seq_q)
        return o.reshape(bsz, seq_q, hq, v.shape[3]), lse
    qq = q if c.q_index is None else q.index_select(1, c.q_index)
    if c.kv_index is not None:
        kk, vv = k.index_select(1, c.kv_index), v.index_select(1, c.kv_index)
    elif c.kv_slice is not None:
        kk, vv = k[:, c.kv_slice[0]:c.kv_slice[1]], v[:, c.kv_slice[0]:c.kv_slice[1]]
    else:
        kk, vv = k, v
    if c.split == 1:
        if engine is not attention_reference and (_plain_band(c) or (c.natural and not tracing)):
            # the engine's own walk of the pattern: a band without lists, a BlockMask at the block size each
            # pass runs fastest (a ``blocks`` component's 64-key random blocks at 64, the local band at 128);
            # traced calls keep the plan's BlockMasks, which an eager call has built
            from .flash import flash_attention

            return flash_attention(qq, kk, vv, mask=c.pattern, scale=scale, softcap=softcap, alibi_slopes=alibi,
                                   deterministic=deterministic, into=into)
        assert into is None, "into: a natural component on the Triton engine only"
        return engine(qq, kk, vv, bm, scale, softcap, alibi, c.q_pos, c.kv_pos)
    # Key chunks as extra batch entries (the pattern is position-free here: every pair).
    s, nr = c.split, qq.shape[1]
    qs = qq.unsqueeze(1).expand(bsz, s, nr, hq, d).reshape(bsz * s, nr, hq, d)
    ks = kk.reshape(bsz * s, kk.shape[1] // s, hkv, d)
    vs = vv.reshape(bsz * s, vv.shape[1] // s, hkv, vv.shape[3])
    o, lse = engine(qs, ks, vs, bm, scale, softcap, None, None, None)
    return merge_lse_stacked(o.view(bsz, s, nr, hq, -1), lse.view(bsz, s, hq, nr), o.dtype)


def _run_together(local: Component, columns: Component, plan: Plan, q, k, v, scale, softcap, alibi):
    """The local component and the gathered columns in one forward launch (no merge); their backward passes
    share the merged LSE and one dQ."""
    from .flash import flash_attention_with_columns

    ctx = BuildContext(q.shape[0], q.shape[2], plan.seq_q, plan.seq_kv, q.device)
    if _plain_band(local):
        first = (local.pattern.lo, local.pattern.hi)
    else:
        first = local.block_mask(ctx, plan.block_q, plan.block_kv, q.device)
    return flash_attention_with_columns(q, k, v, first, columns.kv_index,
                                        columns.block_mask(ctx, plan.block_q, plan.block_kv, q.device),
                                        columns.q_pos, columns.kv_pos, (columns.pattern.lo, columns.pattern.hi),
                                        scale, softcap, alibi, columns.kv_stride)


def plan_for(mask, causal: bool, seq_q: int, seq_kv: int, device, exact_positions: bool,
             block_q: int = 128, block_kv: int = 128) -> Plan | None:
    """The plan of ``attention``'s ``mask``/``causal`` arguments, or None (not a plannable pattern);
    cached on the pattern object per call signature, like its BlockMasks."""
    if not isinstance(mask, Pattern):
        return None
    key = (causal, seq_q, seq_kv, str(torch.device(device)), exact_positions, block_q, block_kv)
    cache = mask.memo("_plans")
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        pattern = mask & Band(0, INF, name="causal") if causal else mask
        cache[key] = plan(pattern, seq_q, seq_kv, block_q=block_q, block_kv=block_kv,
                          exact_positions=exact_positions, device=device)
    return cache[key]


def planned_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: Plan, scale: float,
                      softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
                      backend: str = "reference", deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention under ``plan`` (built for these lengths); returns ``(out, lse)`` like the engine.

    ``backend``: ``"triton"`` (the flash kernel) or ``"reference"``; ``deterministic``: bit-reproducible
    gradients (the Triton backward without atomics). Arguments are assumed checked.
    """
    if alibi_slopes is not None and not plan.exact_positions:
        raise ValueError("alibi_slopes: this plan moves positions (built with exact_positions=False); plan the "
                         "pattern with exact_positions=True to use ALiBi")
    engine = _engine(backend, deterministic)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    if needs_grad and backend == "triton" and plan.natural and len(plan.components) > 1 \
            and not torch.compiler.is_compiling():
        # BigBird's band and random blocks: one backward launch of the whole pattern instead of one per
        # component, their merge's backward and the sums of their gradients (H100, fwd+bwd: 4.92 -> 3.79 ms at
        # 2 x 16k, 10.39 -> 7.52 at 1 x 64k; 2026-12-06-natural-backward-ab-h100.json)
        from .flash import flash_attention_given_forward

        def forward(q, k, v):
            return planned_attention(q, k, v, plan, scale, softcap, alibi_slopes, backend, deterministic)

        return flash_attention_given_forward(q, k, v, forward, plan.pattern, scale, softcap, alibi_slopes,
                                             deterministic)
    if backend == "triton" and plan.natural and len(plan.components) > 1 and not needs_grad \
            and not torch.compiler.is_compiling():
        # (also the forward of the one-launch backward above, which runs without grad) each launch after the
        # first goes on from the result so far, in place: no output per component and no merge
        into = None
        for c in plan.components:
            into = _run(c, plan, q, k, v, scale, softcap, alibi_slopes, engine, deterministic, into=into)
        return into
    # the two-source launch has no custom op: traced calls (torch.compile) keep the components and the merge
    together = None
    if backend == "triton" and not deterministic and not torch.compiler.is_compiling():
        together = plan.local_and_columns
    base, rows = [], []
    for c in plan.components:
        if together is not None and any(c is t for t in together):
            continue
        o, lse = _run(c, plan, q, k, v, scale, softcap, alibi_slopes, engine, deterministic)
        (rows if c.overrides_rows else base).append((c, o, lse))
    bsz, seq_q, hq, _ = q.shape
    if together is not None:
        out, lse = _run_together(*together, plan, q, k, v, scale, softcap, alibi_slopes)
    elif len(base) == 2 and backend == "triton" and not torch.compiler.is_compiling():
        # (a traced call merges in PyTorch, which the compiler fuses: the fused kernel is a raw Triton launch)
        (_, o1, l1), (_, o2, l2) = base
        out, lse = merge_lse_fused(o1, l1, o2, l2, q.dtype)
    elif base:
        out, lse = merge_lse([o for _, o, _ in base], [l for _, _, l in base], q.dtype)
    else:
        out = q.new_zeros(bsz, seq_q, hq, v.shape[3])
        lse = torch.full((bsz, hq, seq_q), float("-inf"), device=q.device)
    # in place when nothing will differentiate: out of place, each copies the whole output (45 us at 16k on the H100)
    inplace = not needs_grad
    for c, o, l in rows:
        if inplace:
            out.index_copy_(1, c.q_index, o.to(out.dtype))
            lse.index_copy_(2, c.q_index, l)
        else:
            out = out.index_copy(1, c.q_index, o.to(out.dtype))
            lse = lse.index_copy(2, c.q_index, l)
    return out, lse


__all__ = ["planned_attention", "plan_for", "merge_lse"]
