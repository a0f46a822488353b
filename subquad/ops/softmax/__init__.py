"""Exact softmax attention: one public function over every pattern, dispatched by device and ``backend``."""

from __future__ import annotations

import logging
import warnings

import torch

from ... import masks as _masks
from ...masks import composition, patterns as _patterns
from ..._checks import check_backend, check_qkv, check_scale_softcap, softcap_or_none
from ..grid import check_triton_device
from . import dispatch
from .dropout import check_dropout_p, new_rng
from .planned import plan_for, planned_attention
from .reference import Dropout, attention_reference, attention_traced
from .sinks import check_sinks, with_sinks

log = logging.getLogger("subquad")

BACKENDS = ("auto", "triton", "reference", "fa4", "cudnn", "flex")
#: prepared calls kept (see ``_call_facts``): a model has a few call signatures per attention layer
PREPARED_CALLS = 64


def _check_options(q, causal, scale, softcap, alibi_slopes):
    hq = q.shape[2]
    if not isinstance(causal, bool):
        raise ValueError(f"causal: expected a bool, got {causal!r}")
    check_scale_softcap(scale, softcap)
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, torch.Tensor) or alibi_slopes.dim() not in (1, 2) \
                or alibi_slopes.shape[-1] != hq or (alibi_slopes.dim() == 2 and alibi_slopes.shape[0] not in (1, q.shape[0])):
            shape = tuple(alibi_slopes.shape) if isinstance(alibi_slopes, torch.Tensor) else type(alibi_slopes).__name__
            raise ValueError(f"alibi_slopes: expected a tensor of shape ({hq},) or ({q.shape[0]}, {hq}), got {shape}")
        if not alibi_slopes.dtype.is_floating_point:
            raise ValueError(f"alibi_slopes: expected a floating-point tensor, got {alibi_slopes.dtype}")
        if alibi_slopes.device != q.device:
            raise ValueError(f"alibi_slopes: expected device {q.device}, got {alibi_slopes.device}")


def _pick_backend(backend: str, q: torch.Tensor) -> str:
    if backend == "triton" and q.dtype not in (torch.float16, torch.bfloat16):
        # the flash kernels take fp16/bf16; fp32 (and fp64) run the fp32-accumulating reference
        return "reference"
    if backend == "triton":
        check_triton_device(q, " (backend='auto' or 'reference' runs there)")
    if backend != "auto":
        return backend
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        try:
            from . import flash  # noqa: F401
        except ImportError:
            return "reference"
        return "triton"
    return "reference"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
              scale: float | None = None, softcap: float | None = None, alibi_slopes: torch.Tensor | None = None,
              return_lse: bool = False, backend: str = "auto", deterministic: bool | None = None,
              plan: bool | None = None, sinks: torch.Tensor | None = None, score_mod=None,
              window_size: tuple[int, int] = (-1, -1), dropout_p: float = 0.0):
    """Exact softmax attention, ``softmax(scale * q k^T [softcapped] + alibi, masked) v``.

    Args:
        q: ``(batch, seq_q, heads_q, head_dim)``.
        k, v: ``(batch, seq_kv, heads_kv, head_dim[_v])``; ``heads_q`` a multiple of ``heads_kv`` (GQA/MQA:
            K/V are never repeated in memory).
        causal: causal masking, queries aligned to the end of the keys (FlashAttention's convention: with
            more queries than keys the first ``seq_q - seq_kv`` see no key).
        mask: a ``subquad.masks`` pattern, a prebuilt ``BlockMask``, a bool tensor ``(seq_q, seq_kv)``
            (optionally with leading heads / batch), or a predicate ``fn(b, h, q_pos, k_pos)``. Combined with
            ``causal`` by intersection. The Triton kernels build a pattern's BlockMask at 128 x 128 or, for a
            pass where that visits markedly fewer pairs (BigBird's 64-wide random blocks, narrow windows with
            global tokens), 64 x 64; a prebuilt BlockMask runs at its own block size.
        scale: defaults to ``head_dim ** -0.5``.
        softcap: Gemma-2 style ``softcap * tanh(s / softcap)`` on the scaled scores (0, FlashAttention's
            default, or None: none).
        alibi_slopes: ``(heads_q,)`` or ``(batch, heads_q)``; adds ``-slope * |q_pos - k_pos|``.
        return_lse: also return the log-sum-exp of the scores, ``(batch, heads_q, seq_q)`` fp32
            (``-inf`` for a query that sees no key; its output is 0).
        backend: ``"auto"`` (the fastest backend that can run the call, from a table measured per device,
            dtype, head_dim, pattern and pass: ``subquad.ops.softmax.dispatch``; the reference on CPU; the
            Triton kernels inside ``torch.compile``),
            ``"triton"``, ``"fa4"`` (FlashAttention-4, where ``flash-attn-4`` is installed on sm90/sm100;
            ``ValueError`` for a call it cannot run), ``"cudnn"`` (PyTorch SDPA's cuDNN kernels: full or causal
            attention without softcap, ALiBi or LSE), ``"flex"`` (PyTorch's FlexAttention on subquad's block
            map: every structured pattern, softcap, ALiBi; compiled on CUDA, eager and slow on the CPU) or
            ``"reference"``. The Triton kernels take fp16/bf16: fp32 inputs run the reference (under
            ``"auto"`` and ``"triton"`` alike).
        deterministic: Triton backward without atomics (dQ programs beside the dK/dV programs, each row's dQ
            summed in one fixed order): bit-reproducible gradients; ``"auto"`` then runs the Triton kernels, and
            ``"fa4"`` / ``"cudnn"`` / ``"flex"`` refuse it. A planned pattern then runs its band and gathered
            columns as separate launches merged by LSE. ``None`` follows
            ``torch.use_deterministic_algorithms`` (in its warn-only mode a backend without a deterministic
            backward warns and runs).
        plan: patterns with scattered keys (strided, fixed, dilated, global tokens) run through the pattern
            planner (``subquad.masks.plan``: gathered columns, residue classes, LSE merge) when one applies
            (``None``); ``False`` forces the plain BlockMask path, ``True`` requires a plan.
        sinks: ``(heads_q,)`` finite logits of per-head attention sinks (GPT-OSS, StreamingLLM's learnable
            sink): one more key that every query sees, with a zero value; differentiable. Applied to the
            chosen backend's output and LSE (``subquad.ops.softmax.sinks``): a backend without an LSE (cuDNN)
            is not chosen.
        score_mod: FlexAttention's ``score_mod(score, b, h, q_pos, k_pos) -> score``, applied after softcap and
            ALiBi (T5 / relative-position biases, a bias tensor indexed by position): tensors it reads may
            require gradients. Positions as the mask sees them (query ``i`` at ``i + seq_kv - seq_q``). Runs on
            ``"flex"`` (``"auto"`` on CUDA, compiled: keep one function per model, a new one compiles again;
            the last 8 are kept alive with what they capture) or
            ``"reference"`` (``"auto"`` elsewhere and inside ``torch.compile``), which call it on broadcastable
            ``(b, h, q, k)`` index tensors; the Triton, FA4 and cuDNN kernels refuse it.
        window_size: FlashAttention's ``(left, right)``: keys from ``left`` positions before the query's to
            ``right`` after it, -1 unbounded (``masks.window``), intersected with ``mask`` and ``causal``.
        dropout_p: attention dropout, as FlashAttention's: each (query, key) probability dropped with this
            probability and the rest scaled by ``1 / (1 - p)`` (the LSE is the undropped one). Pass 0 at
            evaluation (``p if module.training else 0.0``). Each call draws a seed from PyTorch's generator of the
            device (``torch.manual_seed`` repeats a run); the Triton kernels and the reference drop the same
            pairs (``subquad.ops.softmax.dropout``). Runs on ``"triton"`` and ``"reference"`` (``"auto"`` picks
            them), the plain BlockMask path (no plan: a gathered key's draw would move).
    """
    dropout_p = check_dropout_p(dropout_p, backend)
    if dropout_p:
        if plan is True:
            raise ValueError("plan: dropout runs on the plain BlockMask path (a plan gathers keys, whose dropout "
                             "draws would move); got plan=True with dropout_p > 0")
        plan = False
    windowed = window_size != (-1, -1) and window_size != [-1, -1]
    if windowed:
        mask = _with_window(mask, window_size)
    if score_mod is not None and not callable(score_mod):
        raise ValueError(f"score_mod: expected a callable (score, b, h, q_pos, k_pos) -> score, got "
                         f"{type(score_mod).__name__}")
    softcap = softcap_or_none(softcap)
    if sinks is not None:
        check_qkv(q, k, v)
        check_sinks(sinks, q.shape[2], q.device)
        if backend == "cudnn":
            raise ValueError("sinks: expected a backend that returns the LSE they are applied to, got "
                             "backend='cudnn'")
        out, lse = attention(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap,
                             alibi_slopes=alibi_slopes, return_lse=True, backend=backend, deterministic=deterministic,
                             plan=plan, score_mod=score_mod, dropout_p=dropout_p)
        out, lse = with_sinks(out, lse, sinks)
        return (out, lse) if return_lse else out
    from_torch = deterministic is None
    if from_torch:
        deterministic = torch.are_deterministic_algorithms_enabled()
    # (a score_mod's closure may hold tensors: a call with one is prepared again each time)
    facts = None if score_mod is not None else _call_facts(q, k, v, causal, mask, scale, softcap, alibi_slopes,
                                                           return_lse, backend, deterministic, plan, dropout_p)
    cache = None if facts is None else _prepared()
    prepared = None
    if cache is not None:
        try:
            prepared = cache.get(facts)
        except TypeError:   # an argument of the wrong type (unhashable): the checks below say which
            cache = None
    if prepared is not None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("subquad.attention: backend=%s (asked %s), as before for this pattern and call", prepared[1],
                      backend)
        out, lse = prepared[2](q, k, v)
        return (out, lse) if return_lse else out
    check_backend(backend, BACKENDS)
    check_qkv(q, k, v)
    _check_options(q, causal, scale, softcap, alibi_slopes)
    bsz, seq_q, hq, d = q.shape
    seq_kv = k.shape[1]
    if isinstance(mask, _masks.BlockMask):
        _masks.check_prebuilt(mask, causal=causal, batch=bsz, heads=hq, seq_q=seq_q, seq_kv=seq_kv)
    if seq_q > seq_kv and causal and not isinstance(mask, _masks.BlockMask):
        # FlashAttention's bottom-right alignment: the first seq_q - seq_kv queries sit before every key and
        # see none (output 0, LSE -inf); the others are an ordinary call
        lead = seq_q - seq_kv
        result = attention(q[:, lead:], k, v, causal=True, mask=_rows_from(mask, lead), scale=scale,
                           softcap=softcap, alibi_slopes=alibi_slopes, return_lse=return_lse, backend=backend,
                           deterministic=deterministic, plan=plan, score_mod=score_mod, dropout_p=dropout_p)
        out, lse = result if return_lse else (result, None)
        out = torch.cat([out.new_zeros(bsz, lead, hq, out.shape[-1]), out], 1)
        if not return_lse:
            return out
        return out, torch.cat([lse.new_full((bsz, hq, lead), float("-inf")), lse], 2)
    if seq_q > seq_kv and windowed:
        raise ValueError(f"window_size: expected seq_q <= seq_kv={seq_kv} or causal=True (a window's first queries "
                         f"would sit before every key; varlen_attention runs this), got seq_q={seq_q}")
    if seq_q > seq_kv and mask is not None:
        raise ValueError(f"q: expected seq_q <= seq_kv={seq_kv} with a mask and causal=False (queries are aligned "
                         f"to the end of the keys: the first would sit before every key), got seq_q={seq_q}")
    scale_value = d ** -0.5 if scale is None else float(scale)
    # Under torch.compile, auto keeps to the Triton kernels (custom ops) and the reference (which dynamo traces
    # with graph breaks at its host-side block walk): the measured choice reads files and asks FA4/cuDNN, which
    # dynamo cannot trace.
    if score_mod is not None:
        chosen = _score_mod_backend(backend, q, k, v, causal, mask, alibi_slopes, deterministic, plan, dropout_p)
    elif backend == "auto" and plan is not True and not deterministic and not dropout_p \
            and not torch.compiler.is_compiling():
        chosen = dispatch.choose(q, k, v, causal=causal, mask=mask, softcap=softcap, alibi_slopes=alibi_slopes,
                                 return_lse=return_lse)
    else:
        chosen = _pick_backend(backend, q)
    if deterministic and chosen in ("fa4", "cudnn", "flex"):
        why = (f"deterministic: only the Triton and reference backends offer a deterministic backward, got "
               f"backend={backend!r} (use backend=" + ("'reference': a score_mod runs there or on flex)"
                                                        if score_mod is not None else "'auto' or 'triton')"))
        if not (from_torch and torch.is_deterministic_algorithms_warn_only_enabled()):
            raise ValueError(why + (" (asked by torch.use_deterministic_algorithms)" if from_torch else ""))
        if not torch.compiler.is_compiling():
            warnings.warn(why, stacklevel=2)
    if not torch.compiler.is_compiling() and log.isEnabledFor(logging.DEBUG):   # dynamo cannot trace loggers
        log.debug("subquad.attention: backend=%s (asked %s), q=%s %s, mask=%s", chosen, backend, tuple(q.shape),
                  q.dtype, "causal" if mask is None and causal else mask)
    if chosen == "triton" and dispatch.trainable_slopes(alibi_slopes):
        raise ValueError("alibi_slopes: slopes that require grad are differentiated by the reference backend only "
                         "(the Triton kernels take them as constants); pass alibi_slopes.detach() or "
                         "backend='reference'")
    if chosen in ("cudnn", "fa4", "flex") and backend == chosen:
        # auto asked already; a backend asked by name is checked here
        why = dispatch.unsupported_reason(chosen, q, k, v, causal=causal, mask=mask, softcap=softcap,
                                          alibi_slopes=alibi_slopes, return_lse=return_lse)
        if why is not None:
            raise ValueError(f"backend: {chosen!r} cannot run this call: {why}")
    planned = None
    if chosen not in ("cudnn", "fa4", "flex") and plan is not False and score_mod is None:
        planned = plan_for(mask, causal, seq_q, seq_kv, q.device, alibi_slopes is not None)
    if plan is True and chosen in ("cudnn", "fa4", "flex"):
        raise ValueError(f"backend: plan=True runs the Triton or reference kernels, got backend={backend!r}"
                         + (f" (auto chose {chosen!r})" if backend != chosen else ""))
    if plan is True and planned is None:
        raise ValueError(f"plan: expected a mask with scattered keys to plan (strided, fixed, dilated, global "
                         f"tokens), got {mask!r}")
    run = _prepare(chosen, planned, q, k, v, causal=causal, mask=mask, scale=scale_value, softcap=softcap,
                   alibi_slopes=alibi_slopes, return_lse=return_lse, deterministic=deterministic,
                   score_mod=score_mod, dropout_p=dropout_p)
    if cache is not None:
        # the mask kept alive so that its id is not reused
        dispatch.remember(cache, facts, (mask, chosen, run), PREPARED_CALLS)
    out, lse = run(q, k, v)
    return (out, lse) if return_lse else out


def _rows_from(mask, lead: int):
    """``mask`` for the queries from ``lead`` on (the bottom-right split of more queries than keys): a bool
    tensor's rows, also inside a pattern (``masks.from_tensor``, ``pattern & tensor``: its tensor has the whole
    call's rows, and was refused for the split call's). Other patterns see positions, the same in both calls.
    Kept on the pattern per ``lead``, so that what is derived from it (BlockMasks) is found on the next call."""
    if isinstance(mask, torch.Tensor):
        return mask[..., lead:, :]
    if not isinstance(mask, _masks.Pattern):
        return mask
    kept = mask.memo("_rows_from")
    if lead not in kept:
        if len(kept) > 64:
            kept.clear()
        kept[lead] = _sliced_rows(mask, lead)
    return kept[lead]


def _sliced_rows(p, lead: int):
    if isinstance(p, _masks.Tensor):
        return _masks.Tensor(p.mask[..., lead:, :])
    if isinstance(p, _patterns.Named):
        inner = _sliced_rows(p.inner, lead)
        return p if inner is p.inner else _patterns.Named(p.name, inner, p.params)
    if isinstance(p, composition.Complement):
        inner = _sliced_rows(p.inner, lead)
        return p if inner is p.inner else composition.Complement(inner)
    if isinstance(p, (composition.Union, composition.Intersection)):
        parts = [_sliced_rows(part, lead) for part in p.parts]
        return p if all(a is b for a, b in zip(parts, p.parts)) else type(p)(*parts)
    return p


_WINDOWS: dict = {}


def _with_window(mask, window_size):
    """``mask & masks.window(*window_size)``, one pattern object per (mask, window) so that what is kept on a
    pattern (BlockMasks, prepared calls) is found again on the next call. A bool tensor stays a tensor (the
    bottom-right split of more queries than keys slices it)."""
    if not (isinstance(window_size, (tuple, list)) and len(window_size) == 2):
        raise ValueError(f"window_size: expected (left, right), got {window_size!r}")
    key = tuple(window_size)
    if isinstance(mask, _masks.BlockMask):
        raise ValueError("window_size: expected no prebuilt BlockMask with it (build the BlockMask from "
                         "pattern & masks.window(left, right))")
    if mask is None:
        if key not in _WINDOWS:
            _WINDOWS[key] = _masks.window(*key)
        return _WINDOWS[key]
    if isinstance(mask, _masks.Pattern):
        kept = mask.memo("_with_window")
        if key not in kept:
            kept[key] = mask & _masks.window(*key)
        return kept[key]
    if isinstance(mask, torch.Tensor) and mask.dim() >= 2:
        seq_q, seq_kv = mask.shape[-2:]
        q_pos = torch.arange(seq_q, device=mask.device) + seq_kv - seq_q
        band = _masks.window(*key).inner
        return mask & band.predicate(None, None, q_pos.view(-1, 1), torch.arange(seq_kv, device=mask.device))
    return _masks.as_pattern(mask, False) & _masks.window(*key)


def _call_facts(q, k, v, causal, mask, scale, softcap, alibi_slopes, return_lse, backend, deterministic, plan,
                dropout_p):
    """What decides a call's backend and every argument made for it, or None where that includes tensor values
    (ALiBi slopes, mask tensors, predicates) or the call is being traced. Two calls with the same facts run the
    same prepared call: a model's repeated calls skip the checks, the choice and the pattern's lowering (tens
    of microseconds of host time; a 0.25 ms FA4 call is host-bound with them)."""
    if alibi_slopes is not None or not (mask is None or isinstance(mask, _masks.Pattern)) \
            or not (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)) \
            or torch.compiler.is_compiling():
        return None
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    # (torch's warn-only mode too: a backend that it lets run with a warning is refused in the strict mode; the
    # checked options' types too: True == 1, and a call prepared for one let the other skip the check refusing it)
    return (id(mask), causal, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            needs_grad, scale, softcap, type(causal), type(scale), type(softcap), return_lse, backend, deterministic,
            plan, dropout_p, torch.is_deterministic_algorithms_warn_only_enabled())


def _prepared() -> dict | None:
    """The prepared calls (facts -> (mask, backend, run)), kept on the measured table: a reloaded table starts
    with none (a stand-in table without the attribute keeps none)."""
    return getattr(dispatch.table(), "prepared", None)


def _score_mod_backend(backend, q, k, v, causal, mask, alibi_slopes, deterministic, plan, dropout_p) -> str:
    """The backend of a call with a ``score_mod``: FlexAttention or the reference, the two that take one (the
    reference alone with dropout)."""
    if plan is True:
        raise ValueError("plan: a score_mod runs on the 'flex' or 'reference' backend, which plan nothing; got "
                         "plan=True")
    if backend in ("triton", "fa4", "cudnn"):
        raise ValueError(f"backend: a score_mod runs on 'flex' or 'reference' (or 'auto'), got {backend!r}")
    if backend == "reference" or (backend == "auto" and (torch.compiler.is_compiling() or dropout_p)):
        # (traced, flex's checks would build the BlockMask on the host: auto keeps to the traced reference)
        return "reference"
    if torch.compiler.is_compiling():
        return backend
    from . import flex

    why = flex.unsupported_reason(q, k, v, causal=causal, mask=mask, alibi_slopes=alibi_slopes)
    if backend == "auto":
        return "flex" if q.is_cuda and why is None and not deterministic else "reference"
    if why is not None:
        raise ValueError(f"backend: 'flex' cannot run this call: {why}")
    return backend


def _prepare(chosen, planned, q, k, v, *, causal, mask, scale, softcap, alibi_slopes, return_lse, deterministic,
             score_mod=None, dropout_p=0.0):
    """``run(q, k, v) -> (out, lse)`` on the chosen backend, with what depends only on the call's facts made
    here (the FA4 route and its arguments, the reference's BlockMask). Holds no tensor of the call; with
    dropout, each run draws its own seed."""
    if chosen == "cudnn":
        from .cudnn import cudnn_attention

        return lambda q, k, v: (cudnn_attention(q, k, v, causal=causal, scale=scale), None)
    if chosen == "fa4":
        from .fa4 import prepare

        return prepare(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap)
    if chosen == "flex":
        from .flex import flex_attention

        return lambda q, k, v: flex_attention(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap,
                                              alibi_slopes=alibi_slopes, return_lse=return_lse,
                                              score_mod=score_mod)
    if planned is not None:
        return lambda q, k, v: planned_attention(q, k, v, planned, scale, softcap, alibi_slopes, backend=chosen,
                                                 deterministic=deterministic)
    if chosen == "triton":
        from .flash import flash_attention

        return lambda q, k, v: flash_attention(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap,
                                               alibi_slopes=alibi_slopes, deterministic=deterministic,
                                               dropout=(dropout_p, new_rng(q.device, dropout_p)) if dropout_p
                                               else None)
    bsz, seq_q, hq, _ = q.shape

    def dropout(q, k):
        return Dropout(dropout_p, new_rng(q.device, dropout_p), hq, seq_q, k.shape[1]) if dropout_p else None

    if torch.compiler.is_compiling() and not isinstance(mask, _masks.BlockMask):
        # (a BlockMask's build reads the pattern's values on the host: traced, the reference takes the pattern)
        pattern = None if mask is None and not causal else _masks.as_pattern(mask, causal).prepare(
            _masks.BuildContext(bsz, hq, seq_q, k.shape[1], q.device))
        return lambda q, k, v: attention_traced(q, k, v, pattern, scale, softcap, alibi_slopes,
                                                score_mod=score_mod, dropout=dropout(q, k))
    block_mask = _masks.resolve(mask, causal=causal, batch=bsz, heads=hq, seq_q=seq_q, seq_kv=k.shape[1],
                                device=q.device)
    return lambda q, k, v: attention_reference(q, k, v, block_mask, scale, softcap, alibi_slopes,
                                               score_mod=score_mod, dropout=dropout(q, k))


__all__ = ["attention", "attention_reference", "BACKENDS"]
