"""``backend="auto"`` for exact attention: the fastest backend that can run a call, by measurement.

A call's *signature* is (device capability, dtype, head_dim, pattern kind, pass). ``dispatch_table.json``
(shipped in the package, made by ``python -m subquad.ops.softmax.dispatch RESULTS.json`` from a
``subquad bench --suite backends`` run, or refreshed signature by signature with ``--merge`` from a run of a few
cases, each entry then naming its own run) ranks the backends measured for each signature, fastest first.

The rule, in order:

1. the measured ranking of the exact signature;
2. else the measured ranking of the nearest signature on the same device capability, pattern kind and pass
   (fp16 and bf16 count as one; the closest head_dim, the smaller one on a tie);
3. else, unmeasured: FA4 first for the patterns whose FA4 route is checked on the H100 and needs no gathering
   (``FA4_FIRST``: dense, windows, documents, Longformer, BigBird, prefix-LM, block layouts; FA4 beat the
   Triton kernel on every signature measured, 1.3-6x) and then SDPA's cuDNN kernels (dense only:
   ``cudnn.py``); the own Triton kernel first for the rest (the scattered-key patterns strided/fixed/dilated,
   which the planner gathers while FA4 would load a whole key block per kept column; compositions; user
   masks); the reference last. FlexAttention (``flex``) is in no unmeasured order: it runs only where a
   measured ranking puts it;

and the first backend of that order that *can run the call* wins (``unsupported_reason``: installed, right device,
dtype, head_dim, pattern expressible), so a measured favourite that cannot run a call is skipped, never
forced. The reference runs everything and ends every order. The choice is logged at DEBUG level on the
``subquad`` logger, with the signature and the rule that decided.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ... import masks as _masks
from ...masks import composition, patterns as P
from . import cudnn, fa4, flex

log = logging.getLogger("subquad")

#: the backends of exact attention in the order that unmeasured signatures outside FA4_FIRST try them;
#: ``flex`` (FlexAttention) is in no unmeasured order: auto runs it only where the measured table ranks it
BACKENDS = ("triton", "fa4", "cudnn", "reference")
MEASURED_ONLY = ("flex",)
#: pattern kinds that an unmeasured signature runs on FA4 first (see the module docstring)
FA4_FIRST = ("full", "causal", "window", "document", "longformer", "bigbird", "prefix_lm", "block_sparse")
TABLE_PATH = Path(__file__).with_name("dispatch_table.json")
#: choices remembered per table (``remember``)
CHOICES_KEPT = 64
#: largest forward error (vs fp64, sampled rows) of a benchmark row that may enter the table, per dtype
MAX_ERR = {"bfloat16": 6e-2, "float16": 1e-2, "float32": 1e-4}
#: bench implementation name -> backend
BENCH_IMPLS = {"subquad-triton": "triton", "subquad-fa4": "fa4", "subquad-cudnn": "cudnn",
               "subquad-flex": "flex", "subquad-reference": "reference"}


# ----------------------------------------------------------------------------------------------------------
# Signatures


@dataclass(frozen=True)
class Signature:
    capability: str     # "cpu", "sm90", ...
    dtype: str          # "bfloat16", ...
    head_dim: int
    pattern: str        # see pattern_kind
    mode: str           # "fwd" | "fwdbwd"

    def key(self) -> str:
        return f"{self.capability}/{self.dtype}/d{self.head_dim}/{self.pattern}/{self.mode}"


#: names of subquad.masks constructors that are pattern kinds of their own
_NAMED_KINDS = ("sliding_window", "strided", "fixed", "dilated", "longformer", "bigbird", "prefix_lm")


def _parts(p) -> list:
    """The parts of an intersection (nested ones flattened), named patterns kept whole."""
    if isinstance(p, composition.Intersection):
        return [x for part in p.parts for x in _parts(part)]
    return [p]


def _is_causal_band(p) -> bool:
    return isinstance(p, P.Band) and p.lo == 0 and p.hi >= fa4._UNBOUNDED


def pattern_kind(mask, causal: bool) -> str:
    """A short name for the pattern of a call: ``full``, ``causal``, ``window``, ``document``, the named
    patterns (``longformer``, ``bigbird``, ``prefix_lm``, ``strided``, ``fixed``, ``dilated``),
    ``block_sparse``, ``tensor``, ``predicate`` or ``composite``. Intersecting with causal keeps the kind
    of the other part."""
    if mask is None:
        return "causal" if causal else "full"
    if isinstance(mask, _masks.BlockMask):
        return pattern_kind(mask.pattern, False)
    if isinstance(mask, torch.Tensor):
        return "tensor"
    if not isinstance(mask, P.Pattern):
        return "predicate"
    parts = [p for p in _parts(mask) if not _is_causal_band(p)]
    if not parts:
        return "causal"
    if all(isinstance(p, P.Band) for p in parts):
        if max(p.lo for p in parts) <= -fa4._UNBOUNDED and min(p.hi for p in parts) >= fa4._UNBOUNDED:
            return "causal" if causal or len(parts) < len(_parts(mask)) else "full"
        return "window"
    if all(isinstance(p, (P.Band, P.Segments)) or (isinstance(p, P.Named) and p.name in ("sliding_window", "window"))
           for p in parts) and any(isinstance(p, P.Segments) for p in parts):
        return "document"
    if len(parts) == 1:
        p = parts[0]
        if isinstance(p, P.Named):
            if p.name in _NAMED_KINDS:
                return "window" if p.name == "sliding_window" else p.name
            return pattern_kind(p.inner, False)
        if isinstance(p, (P.BlockLayout, P.RandomBlocks)):
            return "block_sparse"
        if isinstance(p, P.Tensor):
            return "tensor"
        if isinstance(p, P.Predicate):
            return "predicate"
    return "composite"


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> str:
    major, minor = torch.cuda.get_device_capability(device_index)
    return f"sm{major}{minor}"


def capability(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def signature(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None) -> Signature:
    """The signature of a call; the pass is ``fwdbwd`` when autograd will need the backward."""
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    return Signature(capability(q.device), str(q.dtype).replace("torch.", ""), q.shape[-1],
                     pattern_kind(mask, causal), "fwdbwd" if needs_grad else "fwd")


# ----------------------------------------------------------------------------------------------------------
# The measured table


class Table:
    """Measured rankings: signature key -> backends, fastest first (with their times in ms)."""

    def __init__(self, data: dict | None = None):
        data = data or {}
        self.meta = data.get("measured", {})
        self.entries: dict[Signature, list[tuple[str, float]]] = {}
        #: choices made from this table: call facts -> (the pattern, kept alive so that its id is not reused,
        #: and the backend); a reloaded table starts empty
        self.chosen: dict = {}
        #: ``attention``'s prepared calls per call facts (see ``subquad.ops.softmax._call_facts``)
        self.prepared: dict = {}
        for e in data.get("entries", []):
            self.entries[_signature_of(e)] = [(name, float(ms)) for name, ms in e["ranking"]]

    @classmethod
    def load(cls, path: Path | str = TABLE_PATH) -> "Table":
        path = Path(path)
        if not path.exists():
            return cls()
        return cls(json.loads(path.read_text()))

    def ranking(self, sig: Signature) -> tuple[list[str], str]:
        """Backends in measured order for ``sig`` and the rule that gave them (``exact``, ``nearest <key>``
        or ``unmeasured``)."""
        if sig in self.entries:
            return [name for name, _ in self.entries[sig]], "exact"
        half = {"float16", "bfloat16"}

        def same_family(a: str, b: str) -> bool:
            return a == b or (a in half and b in half)

        near = [s for s in self.entries if s.capability == sig.capability and s.pattern == sig.pattern
                and s.mode == sig.mode and same_family(s.dtype, sig.dtype)]
        if near:
            best = min(near, key=lambda s: (s.dtype != sig.dtype, abs(s.head_dim - sig.head_dim), s.head_dim))
            return [name for name, _ in self.entries[best]], f"nearest {best.key()}"
        if sig.pattern in FA4_FIRST:
            return ["fa4", "cudnn", "triton", "reference"], "unmeasured"
        return list(BACKENDS), "unmeasured"


@functools.lru_cache(maxsize=1)
def table() -> Table:
    return Table.load()


def _signature_of(row: dict) -> Signature:
    """The signature of a bench row or of a table entry (they name its fields alike)."""
    return Signature(row["capability"], row["dtype"], int(row["head_dim"]), row["pattern"], row["mode"])


def _usable(row: dict) -> bool:
    """The row ran and its output was right (forward error vs fp64 within ``MAX_ERR``)."""
    return "error" not in row and row.get("ms") is not None and row.get("max_err") is not None \
        and row["max_err"] <= MAX_ERR.get(row["dtype"], 6e-2)


def build_table(rows: list[dict], *, source: str = "") -> dict:
    """The JSON table from benchmark rows of the ``backends`` suite (``extra``: ``capability``,
    ``pattern``): per signature, the backends that ran right on every shape measured for it, ranked by
    their total time over those shapes."""
    ours = [r for r in rows if BENCH_IMPLS.get(r.get("impl", "")) and "capability" in r]
    shapes: dict[Signature, set] = {}
    times: dict[Signature, dict[str, list[float]]] = {}
    meta = {}
    for r in ours:
        sig = _signature_of(r)
        shapes.setdefault(sig, set()).add((r.get("batch"), r.get("seqlen")))
        if _usable(r):
            times.setdefault(sig, {}).setdefault(BENCH_IMPLS[r["impl"]], []).append(float(r["ms"]))
            meta = {"device": r.get("device"), "date": r.get("date"), "versions": r.get("versions")}
    entries = []
    for sig in sorted(times, key=Signature.key):
        ranking = sorted((sum(ms), name) for name, ms in times[sig].items() if len(ms) == len(shapes[sig]))
        if ranking:
            entries.append({"capability": sig.capability, "dtype": sig.dtype, "head_dim": sig.head_dim,
                            "pattern": sig.pattern, "mode": sig.mode,
                            "ranking": [[name, round(total, 4)] for total, name in ranking]})
    return {"measured": {**meta, "source": source}, "entries": entries}


# ----------------------------------------------------------------------------------------------------------
# What can run, and the choice


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        from . import flash  # noqa: F401
    except ImportError:
        return False
    return True


def trainable_slopes(alibi_slopes) -> bool:
    """ALiBi slopes that a backward would have to differentiate (only the reference does)."""
    return alibi_slopes is not None and alibi_slopes.requires_grad and torch.is_grad_enabled()


def unsupported_reason(backend: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                       mask=None, softcap=None, alibi_slopes=None, return_lse: bool = False) -> str | None:
    """Why ``backend`` cannot run this call, or None if it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        if trainable_slopes(alibi_slopes):
            return "the Triton kernels take the ALiBi slopes as constants: no gradient would reach them"
        if not q.is_cuda:
            return "the Triton kernels run on CUDA (the CPU runs the reference)"
        if q.dtype not in (torch.float16, torch.bfloat16):
            return f"the Triton kernels run fp16/bf16, got {q.dtype}"
        if not _triton_importable():
            return "the Triton flash kernels are not importable here"
        return None
    if backend == "fa4":
        return fa4.unsupported_reason(q, k, v, causal=causal, mask=mask, softcap=softcap, alibi_slopes=alibi_slopes)
    if backend == "cudnn":
        return cudnn.unsupported_reason(q, k, v, causal=causal, mask=mask, softcap=softcap,
                                        alibi_slopes=alibi_slopes, return_lse=return_lse)
    if backend == "flex":
        return flex.unsupported_reason(q, k, v, causal=causal, mask=mask, alibi_slopes=alibi_slopes)
    raise ValueError(f"backend: expected one of {BACKENDS + MEASURED_ONLY}, got {backend!r}")


def remember(store: dict, key, value, limit: int) -> None:
    """``store[key] = value`` with at most ``limit`` entries, the oldest evicted first: the values keep their
    pattern objects (and so the patterns' BlockMasks) alive, and a model that builds a pattern per call would
    otherwise keep every one."""
    if key not in store and len(store) >= limit:
        del store[next(iter(store))]
    store[key] = value


def choose(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None, softcap=None,
           alibi_slopes=None, return_lse: bool = False) -> str:
    """The backend ``backend="auto"`` runs for this call (see the module docstring for the rule). Memoised per
    pattern object and call shape, so a model's repeated calls pay one dictionary lookup."""
    measured = table()
    memo = None
    if mask is None or isinstance(mask, P.Pattern):
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        # (None kept as itself: torch 2.11's dynamo traces id() of objects, not of None)
        memo = (None if mask is None else id(mask), causal, q.shape, k.shape, v.shape, q.dtype, q.device,
                needs_grad, softcap is None, alibi_slopes is None, trainable_slopes(alibi_slopes), return_lse)
        hit = measured.chosen.get(memo)
        if hit is not None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("subquad.attention auto -> %s (as before for this pattern and shape)", hit[1])
            return hit[1]
    sig = signature(q, k, v, causal=causal, mask=mask)
    order, rule = measured.ranking(sig)
    order = list(dict.fromkeys([*order, *BACKENDS]))
    skipped = []
    for backend in order:
        why = unsupported_reason(backend, q, k, v, causal=causal, mask=mask, softcap=softcap,
                                 alibi_slopes=alibi_slopes, return_lse=return_lse)
        if why is None:
            if log.isEnabledFor(logging.DEBUG):
                log.debug("subquad.attention auto -> %s for %s (%s%s)", backend, sig.key(), rule,
                          "".join(f"; skipped {b}: {w}" for b, w in skipped))
            if memo is not None:
                remember(measured.chosen, memo, (mask, backend), CHOICES_KEPT)
            return backend
        skipped.append((backend, why))
    raise AssertionError("the reference runs every call")  # pragma: no cover


def available_backends(device=None) -> list[str]:
    """The exact-attention backends this machine can run on ``device`` (default: CUDA if present) for
    some call, in the unmeasured order: ``triton``, ``fa4`` and ``cudnn`` need a CUDA device (FA4: installed,
    sm90 or sm100; cuDNN: PyTorch built with it); ``reference`` always runs; then ``flex`` (FlexAttention,
    on CUDA where this PyTorch has it), which ``auto`` runs only where the measured table ranks it."""
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return ["reference"]
    out = []
    for backend in BACKENDS:
        if backend == "reference":
            out.append(backend)
        elif device.type == "cuda":
            if backend == "triton" and _triton_importable():
                out.append(backend)
            elif backend == "fa4" and fa4.is_installed() and fa4._arch(
                    device.index if device.index is not None else torch.cuda.current_device()) // 10 in (9, 10):
                out.append(backend)
            elif backend == "cudnn" and torch.backends.cudnn.is_available():
                out.append(backend)
    if device.type == "cuda" and flex.is_available():
        out.append("flex")
    return out


def merge_tables(base: dict, update: dict) -> dict:
    """``base`` with the signatures that ``update`` measured replaced by ``update``'s rankings; each replaced
    entry carries ``update``'s provenance (``measured``: device, date, versions, source), the rest keep the base
    table's (its top-level ``measured``). A run of a few cases refreshes those without discarding the others."""
    new = {_signature_of(e): {**e, "measured": update.get("measured", {})} for e in update.get("entries", [])}
    entries = [e for e in base.get("entries", []) if _signature_of(e) not in new] + list(new.values())
    return {"measured": base.get("measured", {}), "entries": sorted(entries, key=lambda e: _signature_of(e).key())}


def _main(argv: list[str]) -> None:
    """``python -m subquad.ops.softmax.dispatch RESULTS.json [OUT.json] [--merge]``: the table from a bench run;
    ``--merge``: only the signatures it measured are replaced in OUT (default: the shipped table)."""
    merge = "--merge" in argv
    argv = [a for a in argv if a != "--merge"]
    if not argv:
        print(_main.__doc__)
        raise SystemExit(2)
    rows = json.loads(Path(argv[0]).read_text())
    data = build_table(rows, source=str(argv[0]))
    out = Path(argv[1]) if len(argv) > 1 else TABLE_PATH
    if merge and out.exists():
        data = merge_tables(json.loads(out.read_text()), data)
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out}: {len(data['entries'])} signatures")


if __name__ == "__main__":
    _main(sys.argv[1:])
