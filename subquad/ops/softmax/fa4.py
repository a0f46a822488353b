"""FlashAttention-4 as a backend of ``subquad.attention`` (optional: ``pip install subquad[fa4]``).

FA4 (the ``flash-attn-4`` package, CuTe DSL kernels for Hopper and Blackwell) takes the same
``(batch, seq, heads, head_dim)`` tensors as subquad, so the adapter's work is to express a subquad call in
FA4's arguments. A call is *lowered* to one of three routes:

* ``dense``: no mask, causal, or one band ``lo <= q - k <= hi`` (sliding windows), through
  ``flash_attn_func(causal=..., window_size=(hi, -lo))``: FA4's native masking, no block map.
* ``varlen``: ``masks.document`` (packed sequences, each a contiguous run of ids), optionally intersected
  with bands, through ``flash_attn_varlen_func`` with ``cu_seqlens`` derived from the ids.
* ``sparse``: every other pattern built from subquad's structured pieces (Longformer, BigBird, prefix-LM,
  block layouts, strided/fixed/dilated, user bool tensors...). Its ``BlockMask`` (128 x 128 blocks) becomes
  FA4's block-sparse tensors — full blocks run unmasked, partial blocks apply a CuTe DSL ``mask_mod``
  generated from the pattern — forward *and* backward (the transposed lists drive dK/dV).

Patterns that no piece can express (Python predicates) and ALiBi cannot run here: ``unsupported_reason``
says why, and ``backend="auto"`` then picks another backend.

The mask_mod is generated in two steps so that the CPU can test it: ``mask_spec`` turns the prepared pattern
into a small nested tuple plus the tensors it reads (document ids, block layouts, global-token flags), and
``emit`` evaluates a spec with a given set of operations — torch ops in the tests, CuTe DSL ops in the
kernel (``_cute_mask_mod``) — so the code that builds the kernel's predicate is the code the tests check.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from ... import masks as _masks
from ...masks import composition, patterns as P

#: positions are int32 inside the kernel; bands wider than this are unbounded
_UNBOUNDED = P.INF // 2
#: block sizes of the BlockMask handed to FA4 (its Hopper tiles for head_dim <= 128)
BLOCK_Q, BLOCK_KV = 128, 128
_DTYPES = (torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------
# Availability


@functools.lru_cache(maxsize=None)
def is_installed() -> bool:
    """FA4's Python package can be found (importing it is deferred to the first call)."""
    return importlib.util.find_spec("flash_attn") is not None and \
        importlib.util.find_spec("flash_attn.cute") is not None


def version() -> str | None:
    try:
        return importlib.metadata.version("flash-attn-4")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=None)
def _interface():
    """FA4's entry points, imported once (the import loads the CuTe DSL: seconds)."""
    from flash_attn.cute.block_sparsity import BlockSparseTensorsTorch
    from flash_attn.cute.interface import flash_attn_func, flash_attn_varlen_func

    return flash_attn_func, flash_attn_varlen_func, BlockSparseTensorsTorch


@functools.lru_cache(maxsize=None)
def _arch(device_index: int) -> int:
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


# ----------------------------------------------------------------------------------------------------------
# Lowering: which FA4 route runs a (causal, mask) pair


@dataclass(frozen=True)
class Lowering:
    """How FA4 runs a call. ``window`` is FA4's ``(left, right)`` (None: unbounded side);
    ``document`` the Document leaf for the varlen route; ``pattern`` what the sparse route masks."""

    route: str                                  # "dense" | "varlen" | "sparse"
    causal: bool = False
    window: tuple[int | None, int | None] = (None, None)
    document: P.Segments | None = None
    pattern: object = None                      # Pattern or BlockMask (sparse route)


def _strip(p):
    while isinstance(p, P.Named):
        p = p.inner
    return p


def _conjuncts(p) -> list:
    """The parts of an intersection (Named wrappers removed), or the pattern itself."""
    p = _strip(p)
    if isinstance(p, composition.Intersection):
        out = []
        for part in p.parts:
            out.extend(_conjuncts(part))
        return out
    return [p]


def band_window(lo: int, hi: int) -> tuple[bool, tuple[int | None, int | None]] | None:
    """FA4's ``(causal, (left, right))`` for the band ``lo <= q - k <= hi``, or None if FA4's window
    cannot hold it (a band that excludes the diagonal). FA4 keeps ``q - left <= k <= q + right``."""
    left = None if hi >= _UNBOUNDED else hi
    right = None if lo <= -_UNBOUNDED else -lo
    if (left is not None and left < 0) or (right is not None and right < 0):
        return None
    if left is None and right == 0:
        return True, (None, None)
    return False, (left, right)


def lower(mask, causal: bool) -> Lowering:
    """The FA4 route of ``attention(..., causal=causal, mask=mask)`` (shape-independent: decided on the
    pattern's structure alone; kept on a pattern object per ``causal``: a small FA4 call is host-bound, and
    walking the pattern cost ~9 us of the CI machine's time per call)."""
    if not isinstance(mask, P.Pattern):
        return _lower(mask, causal)
    cache = mask.memo("_fa4_lowering")
    hit = cache.get(bool(causal))
    if hit is None:
        hit = cache[bool(causal)] = _lower(mask, causal)
    return hit


def _lower(mask, causal: bool) -> Lowering:
    if isinstance(mask, _masks.BlockMask):
        return Lowering("sparse", pattern=mask)
    if mask is None:
        return Lowering("dense", causal=bool(causal))
    pattern = mask if isinstance(mask, P.Pattern) else P._coerce(mask)
    parts = _conjuncts(pattern) + ([P.Band(0, P.INF)] if causal else [])
    bands = [p for p in parts if isinstance(p, P.Band)]
    docs = [p for p in parts if isinstance(p, P.Segments)]
    if len(bands) + len(docs) == len(parts) and len(docs) <= 1:
        lo = max([b.lo for b in bands], default=-P.INF)
        hi = min([b.hi for b in bands], default=P.INF)
        win = band_window(lo, hi) if lo <= hi else None
        if win is not None:
            is_causal, window = win
            if docs:
                return Lowering("varlen", causal=is_causal, window=window, document=docs[0])
            return Lowering("dense", causal=is_causal, window=window)
    return Lowering("sparse", pattern=pattern & P.Band(0, P.INF, name="causal") if causal else pattern)


# ----------------------------------------------------------------------------------------------------------
# mask_mod: pattern -> spec (pure Python + the tensors it reads) -> predicate (torch or CuTe DSL ops)


class NotExpressible(ValueError):
    """The pattern holds a piece that the generated mask_mod cannot evaluate (a Python predicate)."""


def _runs(values: list[int]) -> tuple[tuple[int, int], ...]:
    """Sorted integers as inclusive runs ``((a, b), ...)``."""
    out = []
    for v in values:
        if out and v == out[-1][1] + 1:
            out[-1][1] = v
        else:
            out.append([v, v])
    return tuple((a, b) for a, b in out)


def mask_spec(pattern, seq_kv: int, aux: list[torch.Tensor], flag_dtype: torch.dtype = torch.int32) -> tuple:
    """A nested tuple describing ``pattern`` (prepared: tensors on the device, random blocks drawn).

    Tensors the predicate reads are appended to ``aux`` (contiguous; document ids int32, 0/1 flags --
    global tokens, block layouts, bool masks -- ``flag_dtype``: int32 for the CuTe loads, bool for flex) and
    named by their index; everything else is a compile-time constant, so ``repr(spec)`` identifies the
    generated kernel. Raises ``NotExpressible`` for pieces with no generated form. Band bounds that an
    enclosing intersection already enforces are dropped (``_tighten``)."""
    return _tighten(_spec_of(pattern, seq_kv, aux, flag_dtype))


def _tighten(spec: tuple, lo: int | None = None, hi: int | None = None) -> tuple:
    """``spec`` with the bounds of bands inside a union dropped where the bands of an enclosing intersection
    (``lo <= q - k <= hi``) already imply them: BigBird under causality, ``(|q - k| <= 256 | ...) & q >= k``,
    becomes ``(q - k <= 256 | ...) & q >= k``. The predicate evaluates every element of a partial block in
    both backward passes, where each comparison costs about what the tile's matmul does per element."""
    tag = spec[0]
    if tag == "and":
        bands = [s for s in spec[1] if s[0] == "band"]
        los = [b[1] for b in bands if b[1] is not None] + ([lo] if lo is not None else [])
        his = [b[2] for b in bands if b[2] is not None] + ([hi] if hi is not None else [])
        inner_lo, inner_hi = max(los, default=None), min(his, default=None)
        return ("and", tuple(s if s[0] == "band" else _tighten(s, inner_lo, inner_hi) for s in spec[1]))
    if tag == "or":
        return ("or", tuple(_tighten(s, lo, hi) for s in spec[1]))
    if tag == "band":
        b_lo = None if spec[1] is None or (lo is not None and spec[1] <= lo) else spec[1]
        b_hi = None if spec[2] is None or (hi is not None and spec[2] >= hi) else spec[2]
        return ("band", b_lo, b_hi)
    return spec


def _spec_of(pattern, seq_kv: int, aux: list[torch.Tensor], flag_dtype: torch.dtype) -> tuple:
    p = pattern
    if isinstance(p, P.Named):
        return _spec_of(p.inner, seq_kv, aux, flag_dtype)
    if isinstance(p, (composition.Union, composition.Intersection)):
        tag = "or" if isinstance(p, composition.Union) else "and"
        return (tag, tuple(_spec_of(part, seq_kv, aux, flag_dtype) for part in p.parts))
    if isinstance(p, composition.Complement):
        return ("not", _spec_of(p.inner, seq_kv, aux, flag_dtype))
    if isinstance(p, P.Band):
        return ("band", None if p.lo <= -_UNBOUNDED else p.lo, None if p.hi >= _UNBOUNDED else p.hi)
    if isinstance(p, P._Prefix):
        return ("prefix", int(p.length))
    if isinstance(p, P.SameBlock):
        return ("same_block", int(p.size))
    if isinstance(p, P.Residue):
        return ("residue", int(p.dilation))
    if isinstance(p, P.PeriodicColumns):
        return ("columns", p.period, _runs(p.residues))
    if isinstance(p, P.Positions):
        pos = sorted(int(x) for x in p.positions.tolist())
        runs = _runs(pos)
        if len(runs) <= 4:                  # a few ranges of global tokens: compare, no load
            return ("positions", p.axis, runs)
        flags = torch.zeros(seq_kv, dtype=flag_dtype, device=p.positions.device)
        flags[p.positions] = 1
        aux.append(flags)
        return ("positions_aux", p.axis, len(aux) - 1)
    if isinstance(p, P.Document):
        # renumbered densely: ids of 2^31 and more (hashed document ids) would collide in int32
        ids = torch.unique(p._ids(), return_inverse=True)[1].to(torch.int32).contiguous()
        aux.append(ids)
        return ("document", len(aux) - 1, ids.shape[0] > 1)
    if isinstance(p, P.BlockLayout):
        lay = p.layout.to(flag_dtype).contiguous()
        aux.append(lay)
        return ("layout", len(aux) - 1, p.block, lay.shape[0] > 1, lay.shape[1] > 1)
    if isinstance(p, P.Tensor):
        m = p.mask.to(flag_dtype).contiguous()
        aux.append(m)
        return ("tensor", len(aux) - 1, getattr(p, "_offset", 0), m.shape[0] > 1, m.shape[1] > 1)
    raise NotExpressible(f"mask: {p!r} has no FA4 mask_mod form (only structured subquad.masks patterns, "
                         f"document ids, block layouts and bool tensors do)")


def emit(spec: tuple, ops, b, h, q, k, aux):
    """Evaluate ``spec`` at (batch ``b``, head ``h``, absolute query ``q``, key ``k``) with ``ops``:
    ``ops.const(int)``, ``ops.true(k)``, ``ops.load(tensor, *indices)``, ``ops.flag(tensor, *indices)`` (an
    entry of a 0/1 tensor as a boolean) and ``ops.negate(x)`` (complements; torch ops only, see ``_expressible``).
    Comparisons, ``&``, ``|``, ``//`` and ``%`` are the operands' own (all operands are non-negative where
    ``//``/``%`` meet them)."""
    tag = spec[0]
    c = ops.const
    if tag in ("or", "and"):
        out = emit(spec[1][0], ops, b, h, q, k, aux)
        for part in spec[1][1:]:
            nxt = emit(part, ops, b, h, q, k, aux)
            out = (out | nxt) if tag == "or" else (out & nxt)
        return out
    if tag == "not":
        return ops.negate(emit(spec[1], ops, b, h, q, k, aux))
    if tag == "band":
        _, lo, hi = spec
        d = q - k
        if lo is None and hi is None:
            return ops.true(k)
        if lo is None:
            return d <= c(hi)
        if hi is None:
            return d >= c(lo)
        return (d >= c(lo)) & (d <= c(hi))
    if tag == "prefix":
        return k < c(spec[1])
    if tag == "same_block":
        return (q // c(spec[1])) == (k // c(spec[1]))
    if tag == "residue":
        return ((q - k) % c(spec[1])) == c(0)
    if tag == "columns":
        _, period, runs = spec
        r = k % c(period)
        return _in_runs(r, runs, c)
    if tag == "positions":
        _, axis, runs = spec
        return _in_runs(k if axis == "kv" else q, runs, c)
    if tag == "positions_aux":
        _, axis, i = spec
        return ops.flag(aux[i], k if axis == "kv" else q)
    if tag == "document":
        _, i, per_batch = spec
        bb = b if per_batch else 0
        return ops.load(aux[i], bb, q) == ops.load(aux[i], bb, k)
    if tag == "layout":
        _, i, block, per_batch, per_head = spec
        return ops.flag(aux[i], b if per_batch else 0, h if per_head else 0, q // c(block), k // c(block))
    if tag == "tensor":
        _, i, offset, per_batch, per_head = spec
        return ops.flag(aux[i], b if per_batch else 0, h if per_head else 0, q - c(offset), k)
    raise ValueError(f"unknown mask spec {tag!r}")


class TorchOps:
    """``emit``'s operations on torch tensors (FlexAttention's mask_mod, the CPU tests of the CuTe one)."""

    @staticmethod
    def const(x: int) -> int:
        return x

    @staticmethod
    def true(k):
        return k >= 0

    @staticmethod
    def load(tensor, *idx):
        return tensor[idx]

    @staticmethod
    def flag(tensor, *idx):
        entry = tensor[idx]
        return entry if entry.dtype == torch.bool else entry != 0

    @staticmethod
    def negate(x):
        return torch.logical_not(x)


def _in_runs(x, runs, c):
    out = None
    for a, b in runs:
        # positions are >= 0: a run from 0 needs one comparison
        term = (x == c(a)) if a == b else (x <= c(b)) if a == 0 else ((x >= c(a)) & (x <= c(b)))
        out = term if out is None else (out | term)
    return out


class _CuteOps:
    """``emit``'s operations inside a CuTe DSL mask_mod: int32 SSA values of shape (1,)."""

    def __init__(self):
        import cutlass
        from flash_attn.cute import utils

        self._int32, self._ssa = cutlass.Int32, utils.scalar_to_ssa

    def const(self, x: int):
        return self._ssa(x, self._int32)

    def true(self, k):
        return k >= self.const(0)

    def load(self, tensor, *idx):
        coord = tuple(i if isinstance(i, int) else i[0] for i in idx)
        return self._ssa(tensor[coord], self._int32)

    def flag(self, tensor, *idx):
        return self.load(tensor, *idx) != self.const(0)


_MASK_MODS: dict[str, Callable] = {}


def _cute_mask_mod(spec: tuple, q_offset: int) -> Callable:
    """The CuTe DSL mask_mod of ``spec`` (one per spec and offset). FA4 keys its compile cache by
    ``__cute_hash__``; ``repr(spec)`` names every constant, so equal keys mean equal kernels."""
    key = f"subquad:{q_offset}:{spec!r}"
    if key in _MASK_MODS:
        return _MASK_MODS[key]
    import cutlass.cute as cute

    ops = _CuteOps()
    # FA4 passes the query's row in q; patterns speak of absolute positions (queries end-aligned to keys).
    to_position = (lambda row: row + ops.const(q_offset)) if q_offset else (lambda row: row)

    @cute.jit
    def mask_mod(batch, head, q_idx, kv_idx, seqlen_info, aux_tensors):
        return emit(spec, ops, batch, head, to_position(q_idx), kv_idx, aux_tensors)

    mask_mod.__cute_hash__ = key
    _MASK_MODS[key] = mask_mod
    return mask_mod


# ----------------------------------------------------------------------------------------------------------
# What FA4 can run


def _head_dims_ok(arch: int, d: int, dv: int, sparse: bool) -> bool:
    if d % 8 or dv % 8:
        return False
    if sparse:                      # the 128 x 128 block map matches FA4's Hopper tiles up to head_dim 128
        return d <= 128 and dv <= 128
    if arch // 10 == 9:
        return 8 <= d <= 256 and 8 <= dv <= 256
    return (d <= 128 and dv <= 128) or (d, dv) in ((192, 128), (256, 256))


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                       softcap: float | None = None, alibi_slopes: torch.Tensor | None = None) -> str | None:
    """Why FA4 cannot run this call, or None if it can. Cheap: no FA4 import, no kernel compile."""
    if not is_installed():
        return "flash-attn-4 is not installed (pip install subquad[fa4])"
    if not q.is_cuda:
        return "FA4 needs CUDA tensors"
    if q.dtype not in _DTYPES:
        return f"FA4 runs fp16/bf16, got {q.dtype}"
    if alibi_slopes is not None:
        return "ALiBi is not expressed through FA4"
    arch = _arch(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if arch // 10 not in (9, 10):
        return f"FA4's forward and backward target sm90/sm100, this GPU is sm{arch}"
    lowering = lower(mask, causal)
    sparse = lowering.route == "sparse"
    if sparse and arch // 10 != 9:
        return "the block-sparse FA4 route is built for Hopper's 128 x 128 tiles (sm90)"
    if not _head_dims_ok(arch, q.shape[-1], v.shape[-1], sparse):
        return f"FA4 does not take head_dim={q.shape[-1]}, head_dim_v={v.shape[-1]} on sm{arch}" + \
            (" with a block-sparse pattern" if sparse else "")
    if lowering.route == "varlen" and (q.shape[1] != k.shape[1] or
                                       varlen_offsets(lowering.document, q.shape[0], q.shape[1], q.device) is None):
        lowering = Lowering("sparse", pattern=mask)     # ids in separate runs: the mask_mod reads them instead
        sparse = True
        if not _head_dims_ok(arch, q.shape[-1], v.shape[-1], sparse) or arch // 10 != 9:
            return "document ids that FA4's varlen cannot hold need the block-sparse route (sm90, head_dim <= 128)"
    if lowering.route == "sparse":
        pattern = lowering.pattern.pattern if isinstance(lowering.pattern, _masks.BlockMask) else lowering.pattern
        if not _expressible(pattern):
            return f"mask: {pattern!r} has no FA4 mask_mod form"
    return None


def _expressible(pattern) -> bool:
    p = pattern
    if isinstance(p, P.Named):
        return _expressible(p.inner)
    if isinstance(p, (composition.Union, composition.Intersection)):
        return all(_expressible(x) for x in p.parts)
    # a complement's mask_mod negates, which the CuTe ops (``_CuteOps``) do not offer: no FA4 install to test one
    # on, so FA4 leaves complements to the other backends (flex evaluates the same spec with torch ops)
    return isinstance(p, (P.Band, P._Prefix, P.SameBlock, P.Residue, P.PeriodicColumns, P.Positions, P.Segments,
                          P.BlockLayout, P.RandomBlocks, P.Tensor))


# ----------------------------------------------------------------------------------------------------------
# Running


def varlen_offsets(document: P.Segments, batch: int, seq: int, device) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens int32, max_seqlen)`` of the packed sequences of ``document`` over ``batch`` rows of
    ``seq`` tokens, or None if some id appears in two separate runs of a row (then FA4's varlen cannot
    hold it). Cached on the pattern per shape and device: it synchronises once."""
    key = (batch, seq, str(torch.device(device)))
    cache = document.memo("_fa4_varlen")
    if key in cache:
        return cache[key]
    ids = document.prepare(P.BuildContext(batch, 1, seq, seq, torch.device(device)))._ids()
    ids = ids.expand(batch, seq)
    starts = torch.ones(batch, seq, dtype=torch.bool, device=ids.device)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    runs_per_row = starts.sum(1)
    distinct = torch.tensor([torch.unique(ids[b]).numel() for b in range(batch)], device=ids.device)
    if bool((runs_per_row != distinct).any()):
        result = None
    else:
        begin = torch.nonzero(starts.flatten()).flatten()
        cu = torch.cat([begin, torch.tensor([batch * seq], device=ids.device)]).to(torch.int32)
        result = (cu.contiguous(), int((cu[1:] - cu[:-1]).max()))
    if len(cache) > 16:
        cache.clear()
    cache[key] = result
    return result


@dataclass
class SparseArgs:
    """FA4's block-sparse arguments for one BlockMask (built once per BlockMask, kept in its cache)."""

    spec: tuple | None               # None: no partial block, no mask_mod
    aux: list
    fwd: tuple                       # (partial_num, partial_idx, full_num, full_idx) per query block
    bwd: tuple                       # the same per key block (transposed)
    q_offset: int
    kernel_kwargs: dict | None = None  # flash_attn_func's sparse arguments, made on the first call


def sparse_args(bm: "_masks.BlockMask") -> SparseArgs:
    key = ("fa4", BLOCK_Q, BLOCK_KV)
    if key not in bm._cache:
        partial = bool((bm.kind == _masks.PARTIAL).any())
        aux: list[torch.Tensor] = []
        spec = mask_spec(bm.pattern, bm.seq_kv, aux) if partial else None
        bm._cache[key] = SparseArgs(spec, aux, (*bm.partial_kv, *bm.full_kv), (*bm.partial_q, *bm.full_q),
                                    bm.q_offset)
    return bm._cache[key]


def block_mask_for(mask, *, causal, batch, heads, seq_q, seq_kv, device) -> "_masks.BlockMask":
    """The call's BlockMask on 128 x 128 blocks (FA4's Hopper tiles, FlexAttention's sparse blocks): a
    prebuilt BlockMask on other blocks is rebuilt from its pattern."""
    if isinstance(mask, _masks.BlockMask):
        _masks.check_prebuilt(mask, causal=causal, batch=batch, heads=heads, seq_q=seq_q, seq_kv=seq_kv)
        if (mask.block_q, mask.block_kv) == (BLOCK_Q, BLOCK_KV):
            return mask.to(device)
        mask = mask.pattern             # rebuilt on FA4's tiles
    return _masks.resolve(mask, causal=causal, batch=batch, heads=heads, seq_q=seq_q, seq_kv=seq_kv,
                          device=device, block_q=BLOCK_Q, block_kv=BLOCK_KV)


def prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
            scale: float | None = None, softcap: float | None = None) -> Callable:
    """``fa4_attention`` for every call with the signature of this one (shapes, devices, dtypes, pattern,
    options): the route and its arguments made once, ``run(q, k, v) -> (out, lse)`` left. ``attention`` keeps
    it per signature: FA4's own host path is ~0.2 ms a call, so a 0.25 ms call is close to host-bound already.
    Callers check ``unsupported_reason`` first."""
    flash_attn_func, flash_attn_varlen_func, BlockSparseTensorsTorch = _interface()
    bsz, seq_q, hq, d = q.shape
    seq_kv, dv = k.shape[1], v.shape[-1]
    common = dict(softmax_scale=scale, softcap=0.0 if softcap is None else float(softcap), return_lse=True)
    lowering = lower(mask, causal)
    if lowering.route == "varlen" and seq_q == seq_kv:
        offsets = varlen_offsets(lowering.document, bsz, seq_q, q.device)
        if offsets is not None:
            cu, longest = offsets
            kw = dict(cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest, max_seqlen_k=longest,
                      causal=lowering.causal, window_size=lowering.window, **common)
            q_flat, kv_flat = (bsz * seq_q, hq, d), (bsz * seq_kv, k.shape[2])

            def run_varlen(q, k, v):
                out, lse = flash_attn_varlen_func(q.reshape(q_flat), k.reshape(*kv_flat, d), v.reshape(*kv_flat, dv),
                                                  **kw)
                return out.view(bsz, seq_q, hq, dv), lse.view(hq, bsz, seq_q).transpose(0, 1)

            return run_varlen
    if lowering.route == "dense":
        kw = dict(causal=lowering.causal, window_size=lowering.window, **common)
    else:
        # Resolved from the caller's own (mask, causal) so that the BlockMask cache on the pattern is hit.
        bm = block_mask_for(mask, causal=causal, batch=bsz, heads=hq, seq_q=seq_q, seq_kv=seq_kv, device=q.device)
        args = sparse_args(bm)
        if args.kernel_kwargs is None:
            args.kernel_kwargs = dict(
                mask_mod=None if args.spec is None else _cute_mask_mod(args.spec, args.q_offset),
                aux_tensors=args.aux or None,
                block_sparse_tensors=BlockSparseTensorsTorch(*args.fwd, block_size=(BLOCK_Q, BLOCK_KV)),
                block_sparse_tensors_bwd=BlockSparseTensorsTorch(*args.bwd, block_size=(BLOCK_Q, BLOCK_KV)))
        kw = {**args.kernel_kwargs, **common}
    return lambda q, k, v: flash_attn_func(q, k, v, **kw)


def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False, mask=None,
                  scale: float | None = None, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention through FA4; returns ``(out, lse)`` with ``lse`` of shape ``(batch, heads_q, seq_q)``
    fp32. Differentiable in q, k, v (FA4's own backward). Callers check ``unsupported_reason`` first."""
    return prepare(q, k, v, causal=causal, mask=mask, scale=scale, softcap=softcap)(q, k, v)


__all__ = ["fa4_attention", "prepare", "unsupported_reason", "lower", "Lowering", "is_installed", "version", "mask_spec",
           "emit", "TorchOps", "block_mask_for", "band_window", "varlen_offsets", "NotExpressible", "BLOCK_Q", "BLOCK_KV"]
