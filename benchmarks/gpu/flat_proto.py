"""Prototype: a band forward whose programs walk several query tiles in one flat loop, so that the next query
tile's first key tiles are copied while the last one's are still in the tensor cores.

The question (benchmarks/NOTES.md, sessions 49-53): short walks (strided's band of 256 keys, block-sparse at
density 0.1) pay a per-program fixed cost of ~3.5 key tiles (Q's load, the first K/V copies' latency, the
epilogue). Triton 3.6's ``tl.range(flatten=True)`` did not fuse a walk whose length is read from memory, and
with a constant length it serialised the wgmmas (session 49). Here the loop is flat by hand: one index over
(query tile, key tile) pairs, the query tile's end handled by a branch in the body (store, reset, next Q).

Causal window of ``W`` keys (a query sees itself and the ``W - 1`` before it), every tile masked in both forms,
(batch x heads, seq, 128) bf16. ``ROWS``: query tiles a program walks (1: the usual one program a tile);
``Q_FORM``: how the flat loop gets each query tile's Q (``band_fwd``).

    python benchmarks/gpu/flat_proto.py            # on the GPU: check against SDPA, then time; JSON to $OUT
    python benchmarks/gpu/flat_proto.py --sm90     # here: compile each form for sm90 and print kernel_report's view
    TRITON_INTERPRET=1 python benchmarks/gpu/flat_proto.py --check     # here: each form against SDPA
"""
import json
import os
import sys

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tile(acc, m_i, l_i, q, K, V, base, offs_m, start_n, cols, offs_d, qk_scale, W: tl.constexpr, D: tl.constexpr,
          first=False, FLAT: tl.constexpr = False, o_prev_ptrs=None, store_prev=False, DEFERRED: tl.constexpr = False):
    """One key tile of the online softmax, every pair masked by the band. ``first`` (``FLAT``): the tile starts a
    query tile, so what was summed before belongs to the last one (its weight ``alpha`` is 0); under
    ``DEFERRED`` that last one's rows are stored here (masked by ``store_prev``), where the sums are read anyway."""
    offs_n = start_n + cols
    in_kv = offs_n >= 0
    k = tl.load(K + base + offs_n[:, None] * D + offs_d[None, :], mask=in_kv[:, None], other=0.0)
    qk = tl.dot(q, tl.trans(k))
    diff = offs_m[:, None] - offs_n[None, :]
    s = tl.where((diff >= 0) & (diff < W) & in_kv[None, :], qk * qk_scale, float("-inf"))
    m_run = m_i
    if FLAT:
        m_run = tl.where(first, float("-inf"), m_i)
    m_new = tl.maximum(m_run, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_run - m_safe)
    if DEFERRED:
        keep = store_prev & (offs_d[None, :] >= 0)
        tl.store(o_prev_ptrs, (acc * (1.0 / l_i)[:, None]).to(o_prev_ptrs.dtype.element_ty), mask=keep)
    l_run = l_i
    if FLAT:
        l_run = tl.where(first, 0.0, l_i)
    l_i = l_run * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :], mask=in_kv[:, None], other=0.0)
    return tl.dot(p.to(v.dtype), v, acc), m_new, l_i


@triton.jit
def band_fwd(Q, K, V, O, N, qk_scale, W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
             D: tl.constexpr, ROWS: tl.constexpr, Q_FORM: tl.constexpr, END_FORM: tl.constexpr):
    """``ROWS`` query tiles a program. For ``ROWS > 1``: ``Q_FORM`` 0 loads the next Q in the branch that ends a
    query tile (Q a loop-carried value), 1 reads Q with every key tile (a pipelined load like K's and V's);
    ``END_FORM`` 0 ends a query tile in a branch that stores its rows and resets the sums, 1 only stores there
    (the sums restart through ``_tile``'s ``first``), 2 stores with a mask instead of a branch, 3 stores a query
    tile's rows with a mask in the next one's first key tile (``_tile``'s ``DEFERRED``)."""
    N_T: tl.constexpr = W // BLOCK_N + BLOCK_M // BLOCK_N      # key tiles a query tile walks
    tile0 = tl.program_id(0) * ROWS
    base = tl.program_id(1).to(tl.int64) * N * D
    offs_d = tl.arange(0, D)
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    if ROWS == 1:
        offs_m = tile0 * BLOCK_M + rows
        q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
        for j in range(N_T):
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, K, V, base, offs_m, tile0 * BLOCK_M - W + j * BLOCK_N, cols,
                                  offs_d, qk_scale, W, D)
        tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))
    else:
        q = tl.load(Q + base + (tile0 * BLOCK_M + rows)[:, None] * D + offs_d[None, :])
        for t in range(ROWS * N_T):
            r = t // N_T
            j = t - r * N_T
            start_m = (tile0 + r) * BLOCK_M
            offs_m = start_m + rows
            if Q_FORM == 1:
                q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
            o_ptrs = O + base + offs_m[:, None] * D + offs_d[None, :]
            acc, m_i, l_i = _tile(acc, m_i, l_i, q, K, V, base, offs_m, start_m - W + j * BLOCK_N, cols, offs_d,
                                  qk_scale, W, D, j == 0, END_FORM != 0, o_ptrs - BLOCK_M * D,
                                  ((rows * 0 + j == 0) & (rows * 0 + r > 0))[:, None], END_FORM == 3)
            if END_FORM == 2:
                # (``rows * 0 + j``: a tensor under the interpreter too, where ``j`` is a Python int)
                last = ((rows * 0 + j) == N_T - 1)[:, None] & (offs_d[None, :] >= 0)
                tl.store(o_ptrs, (acc * (1.0 / l_i)[:, None]).to(O.dtype.element_ty), mask=last)
            elif END_FORM < 2:
                if j == N_T - 1:
                    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty))
                    if END_FORM == 0:
                        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
                        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
                        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
                    if Q_FORM == 0:
                        if r + 1 < ROWS:
                            q = tl.load(Q + base + (offs_m + BLOCK_M)[:, None] * D + offs_d[None, :])
        if END_FORM == 3:
            offs_m = (tile0 + ROWS - 1) * BLOCK_M + rows
            tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], (acc / l_i[:, None]).to(O.dtype.element_ty))


_Q_FORMS = ("q-branch", "q-reload")
_END_FORMS = ("end-branch", "end-store", "end-mask", "deferred")


def _form(bm, bn, warps, stages, rows=1, q_form=0, end_form=0):
    """(name, BLOCK_M, BLOCK_N, warps, stages, ROWS, Q_FORM, END_FORM), the name saying the form."""
    name = f"{'plain' if rows == 1 else f'flat{rows}'} {bm}x{bn} w{warps} s{stages}"
    if rows > 1:
        name += f" {_Q_FORMS[q_form]} {_END_FORMS[end_form]}"
    return name, bm, bn, warps, stages, rows, q_form, end_form


FORMS = [_form(64, 64, 4, 3), _form(64, 64, 4, 2), _form(64, 64, 4, 3, 4, 0, 0)]
FORMS += [_form(64, 64, 4, 2, 4, 1, end) for end in (1, 2, 3)]
FORMS += [_form(64, 64, 4, 2, 8, 1, 3), _form(64, 64, 4, 3, 4, 1, 3), _form(128, 64, 8, 2)]
FORMS += [_form(128, 64, 8, 2, 4, 1, end) for end in (1, 2, 3)]


def launch(q, k, v, o, window, form):
    _, bm, bn, warps, stages, rows, q_form, end_form = form
    bh, n, d = q.shape
    grid = (n // bm // rows, bh)
    return band_fwd[grid](q, k, v, o, n, d ** -0.5 * LOG2E, W=window, BLOCK_M=bm, BLOCK_N=bn, D=d, ROWS=rows,
                          Q_FORM=q_form, END_FORM=end_form, num_warps=warps, num_stages=stages)


def check():
    """Every form against SDPA on a small shape (fp16: the interpreter's bf16 dot is wrong, tile.UPCAST_DOT)."""
    n, bh, window = 512, 2, 128
    q, k, v = (torch.randn(bh, n, 128).to(torch.float16) for _ in range(3))
    i = torch.arange(n)
    allowed = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < window)
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=allowed)
    for form in FORMS:
        o = torch.full_like(q, float("nan"))
        launch(q, k, v, o, window, form)
        err = (o.float() - ref).abs().max().item()
        print(f"{form[0]}: max error {err:.1e}")
        assert err < 5e-3, form


def sm90():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
    from kernel_report import compile_for_sm90, report
    q = torch.randn(32, 16384, 128).to(torch.bfloat16)
    for form in FORMS:
        _, bm, bn, warps, stages, rows, q_form, end_form = form
        kernel = compile_for_sm90(band_fwd, (q, q, q, q, 16384, 0.1), dict(
            W=256, BLOCK_M=bm, BLOCK_N=bn, D=128, ROWS=rows, Q_FORM=q_form, END_FORM=end_form, num_warps=warps,
            num_stages=stages))
        info = report(kernel)
        print(f"{form[0]}: {info['registers']} registers, {info['spill_stores']} B spilled, {info['shared']} B "
              f"shared\n  prologue {info['prologue']}")
        for loop in info["loops"][:2]:
            print("  " + loop)


def gpu():
    from triton.testing import do_bench
    window, bh, n = 256, 32, 16384
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(bh, n, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    i = torch.arange(n, device="cuda")
    allowed = ((i[:, None] - i[None, :]) >= 0) & ((i[:, None] - i[None, :]) < window)
    ref = torch.nn.functional.scaled_dot_product_attention(q[:4].float(), k[:4].float(), v[:4].float(),
                                                           attn_mask=allowed)
    pairs = bh * (n * window - window * (window - 1) // 2)
    o = torch.empty_like(q)
    errors = {}
    for form in FORMS:
        o.fill_(float("nan"))
        launch(q, k, v, o, window, form)
        errors[form[0]] = (o[:4].float() - ref).abs().max().item()
    # three rounds, the forms interleaved in each (METHOD.md: a difference under the rounds' spread is noise)
    rounds = [[do_bench(lambda: launch(q, k, v, o, window, form), warmup=50, rep=300) for form in FORMS]
              for _ in range(3)]
    rows = []
    for i, form in enumerate(FORMS):
        ms = [r[i] for r in rounds]
        rows.append(dict(form=form[0], max_err=errors[form[0]], ms=sorted(ms)[1], ms_rounds=ms,
                         tflops=4 * 128 * pairs / (sorted(ms)[1] * 1e-3) / 1e12))
        print(f"{form[0]:40s} {rows[-1]['ms']:.4f} ms {rows[-1]['tflops']:.0f} TFLOP/s  err {errors[form[0]]:.1e}")
    out = os.environ.get("OUT", ".")
    with open(os.path.join(out, "flat_proto.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       window=window, bh=bh, n=n, rows=rows), f, indent=1)


if __name__ == "__main__":
    sm90() if "--sm90" in sys.argv else check() if "--check" in sys.argv else gpu()
