"""The benchmark harness: cases, suites, timing, memory, error, one JSON row per (case, implementation).

A *case* is one (mechanism, shape, dtype, pass); its *impls* are every implementation of the same math
that can run here (subquad's backends and the peers). A *suite* is a generator of cases, registered with
``@suite``; ``subquad bench`` runs suites and writes a table, ``bench.json`` and plots.

Timing follows BENCHMARKS.md: on CUDA ``triton.testing.do_bench`` (median; 25 ms of warm-up calls and 40 ms of
timed calls a round, so a call over 40 ms is timed once a round) with the gradients reset between calls, in
``CUDA_ROUNDS`` rounds that visit a case's implementations in turn, each round starting one implementation
further on (the reported time is the median of the rounds: a burst of host or clock jitter lands on one round of
one implementation, not on its whole figure, and no implementation always follows the same neighbour; every
call's time is kept too, pooled over the rounds into ``ms_calls``' percentiles, which tell a spread between
rounds from a spread between single calls). Python's
cyclic garbage collector is paused while a case is timed, as ``timeit`` does: a collection
costs the call it lands in up to milliseconds of host time, and FA4's CuTe DSL launches allocate enough to
trigger them; with a 0.25 ms kernel behind a Python launch path, host pauses are the jitter. On CPU
the median of ``CPU_ROUNDS`` passes over all the cases: the fastest of ``CPU_REPS`` wall-clock runs after one
warm-up in the first, one run per implementation in each later one.
A shared CPU drifts by tens of percent over tens of seconds, so a ratio between two cases, such as the time
from 16k to 64k, should not depend on which of them ran in a slow spell: spreading each case's runs over the
whole benchmark gives every case the same chances of a quiet spell. The median, not the fastest, of the
passes: under bursty contention a 1 s call can fall entirely in a quiet spell and a 5 s call cannot, so the
fastest pass favours short calls (the window's 16k -> 64k ratio over the same samples of four runs: 3.9-5.6x
by the fastest pass, 4.3-4.8x by the median). Peak memory is the allocator's peak above
the inputs on CUDA, and the peak resident set above the start of the call on CPU (sampled every millisecond:
large tensors live far longer than that).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import importlib.metadata as _md
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

MODES = ("fwd", "fwdbwd", "decode", "step")


@dataclass
class Case:
    """One benchmarked call. ``impls`` maps an implementation name to ``fn(inputs) -> output``."""

    case: str
    mode: str
    batch: int
    seqlen: int
    heads_q: int
    heads_kv: int
    head_dim: int
    dtype: torch.dtype
    make_inputs: Callable[[torch.device], dict]
    impls: dict[str, Callable[[dict], object]]
    flops: float | None = None
    bytes: float | None = None
    reference: str | Callable[[dict], torch.Tensor] | None = None
    #: compare outputs only at these query rows (dim 1): the reference then returns just those rows
    error_rows: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {self.mode!r}")


@dataclass(frozen=True)
class Suite:
    name: str
    device: str
    default: bool
    cases: Callable[[bool], Iterable[Case]]


SUITES: dict[str, Suite] = {}


def suite(name: str, device: str = "cuda", default: bool = False):
    """Register a generator ``fn(quick: bool) -> Iterable[Case]`` as a suite. ``default=True`` CPU suites
    make up ``subquad bench`` with no arguments."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")

    def register(fn):
        SUITES[name] = Suite(name, device, default, fn)
        return fn

    return register


def load_suites() -> dict[str, Suite]:
    """Import every module of ``subquad.bench.suites`` so that their ``@suite`` decorators run."""
    import importlib
    import pkgutil

    from . import suites as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")
    return SUITES


# ---------------------------------------------------------------------------------------------------------
# Facts about the run


def versions() -> dict[str, str]:
    """The versions of what ran: Python, torch, the peers' distributions, and subquad's git commit (with
    ``+dirty`` for uncommitted changes) where it runs from a checkout, as on the device machine (its package
    version alone, 0.1.0, names no code). A peer run from sources (mamba-ssm) gives its module's version."""
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("subquad", "triton", "flash-attn", "flash-attn-4", "nvidia-cutlass-dsl", "fla-core",
                 "flash-linear-attention", "xformers", "mamba-ssm", "transformers"):
        try:
            out[dist] = _md.version(dist)
        except _md.PackageNotFoundError:
            pass
    if "mamba-ssm" not in out and "mamba_ssm" in sys.modules:
        out["mamba-ssm"] = str(getattr(sys.modules["mamba_ssm"], "__version__", "source"))
    commit = _git_commit()
    if commit:
        out["subquad-commit"] = commit
    return out


def _git_commit() -> str | None:
    """``SUBQUAD_COMMIT`` where set (a device machine gets a copy of the tree without its git directory:
    ``benchmarks/gpu/prelude.sh`` reads it from ``.calls/commit``), else the checkout's ``HEAD``."""
    if os.environ.get("SUBQUAD_COMMIT"):
        return os.environ["SUBQUAD_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"cpu: {line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def attention_flops(batch: int, heads: int, kept_pairs: float, head_dim: int, mode: str,
                    head_dim_v: int | None = None) -> float:
    """FlashAttention's convention: forward = 2 matmuls of 2*D flops per kept (query, key) pair per head;
    forward+backward = 3.5 x forward. ``kept_pairs`` counts one (batch, head) slice."""
    dv = head_dim if head_dim_v is None else head_dim_v
    fwd = 2.0 * batch * heads * kept_pairs * (head_dim + dv)
    return fwd * 3.5 if mode == "fwdbwd" else fwd


# ---------------------------------------------------------------------------------------------------------
# Measuring one (case, impl)


def _first_tensor(out):
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"an impl must return a tensor or a tuple starting with one, got {type(out).__name__}")


def _leaves(inputs: dict) -> list[torch.Tensor]:
    return [t for t in inputs.values() if isinstance(t, torch.Tensor) and t.requires_grad]


def _make_call(case: Case, fn, inputs: dict, device: torch.device):
    if case.mode != "fwdbwd":
        return lambda: fn(inputs)
    out = _first_tensor(fn(inputs))
    gen = torch.Generator(device=device).manual_seed(0)
    grad = torch.randn(out.shape, generator=gen, device=device, dtype=out.dtype)

    def call():
        _first_tensor(fn(inputs)).backward(grad)

    return call


class _RssSampler:
    """Peak resident set size (bytes) above its value when the sampler started."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss() - self.base)
            time.sleep(0.001)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss() - self.base)


def _release_free_heap_pages() -> None:
    """glibc's malloc_trim(0) hands every free heap page back to the OS, so the RSS peak of the next call
    counts the pages that call touches, even those the heap had kept from earlier calls (no-op elsewhere)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


#: timing rounds per implementation on CUDA, and the milliseconds of calls each round times (five: FA4's
#: fwd+bwd rounds spread by 5-9% on the H100, so the median of three could still land on a slow one)
CUDA_ROUNDS, CUDA_ROUND_MS = 5, 40
#: CPU: timed calls per implementation in the first pass, and passes over all the cases (the later ones time
#: one call per implementation)
CPU_REPS, CPU_ROUNDS = 2, 4


def _time_cuda(call, leaves, rep_ms: float = CUDA_ROUND_MS) -> list[float]:
    """The ms of every call that ``do_bench`` timed in one round (its median is the round's figure)."""
    import triton.testing

    call()
    torch.cuda.synchronize()
    return [float(x) for x in triton.testing.do_bench(call, warmup=25, rep=rep_ms, grad_to_none=leaves or None,
                                                      return_mode="all")]


def _time_cpu(call, leaves, first_ms: float, reps: int, budget_ms: float = 15000.0) -> float:
    """The first pass's figure: the fastest of up to ``reps`` back-to-back timed calls after the first (which
    warmed up), within ``budget_ms`` (slow calls get fewer, at least one); the passes' median is reported."""
    times = []
    while len(times) < reps and (not times or sum(times) + first_ms < budget_ms):
        for t in leaves:
            t.grad = None
        times.append(_time_cpu_once(call, leaves))
    return min(times)


def _time_cpu_once(call, leaves) -> float:
    t0 = time.perf_counter()
    call()
    return (time.perf_counter() - t0) * 1e3


def _cuda_peak_mb(call, device: torch.device, leaves) -> float:
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    call()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")


def measure(case: Case, impl: str, device: torch.device, inputs: dict, ref_out: torch.Tensor | None,
            cpu_reps: int = CPU_REPS, calls: dict | None = None) -> dict:
    """Run one implementation of a case; returns the JSON row (with ``error`` instead of numbers if it
    could not run). On CPU the first call gives the output, the memory peak and the warm-up at once.
    ``calls`` collects the timed call of each implementation that ran, for more rounds (``run_cases``)."""
    row = {
        "case": case.case, "impl": impl, "mode": case.mode, "batch": case.batch, "seqlen": case.seqlen,
        "heads_q": case.heads_q, "heads_kv": case.heads_kv, "head_dim": case.head_dim,
        "dtype": str(case.dtype).replace("torch.", ""), **case.extra,
    }
    fn = case.impls[impl]
    leaves = _leaves(inputs)
    try:
        with torch.no_grad() if case.mode != "fwdbwd" else torch.enable_grad():
            if device.type == "cuda":
                out = _first_tensor(fn(inputs))
            else:
                _release_free_heap_pages()
                with _RssSampler() as sampler:
                    t0 = time.perf_counter()
                    out = _first_tensor(fn(inputs))
                    if case.mode == "fwdbwd":
                        out.backward(torch.randn_like(out))
                    first_ms = (time.perf_counter() - t0) * 1e3
                mem = sampler.peak / 2**20
            err = rel_err = None
            if ref_out is not None:
                got = out.detach() if case.error_rows is None else out.detach()[:, case.error_rows.to(out.device)]
                err = float((got.double() - ref_out.double()).abs().max())
                # relative to the output's scale: unnormalised linear attention at T = 8k has outputs in the
                # hundreds, where one bf16 step is 2 (fla's error there is the same)
                rel_err = err / max(float(ref_out.double().abs().max()), 1e-30)
            del out
            call = _make_call(case, fn, inputs, device)
            if device.type == "cuda":
                if case.mode == "fwdbwd":
                    # the backward's first call too before the peak is taken: an autotuned backward tunes
                    # there, and Triton's tuner allocates a 256 MB cache-flush buffer (fwd+bwd peaks of
                    # autotuned kernels read 128-256 MB high on each tuning key's first case)
                    call()
                mem = _cuda_peak_mb(call, device, leaves)
                samples = _time_cuda(call, leaves)
                ms = statistics.median(samples)
            else:
                ms = _time_cpu(call, leaves, first_ms, cpu_reps)
                samples = [ms]
            if calls is not None:
                calls[impl] = (call, leaves, samples)
    except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a row, not a crash
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        return row
    finally:
        for t in leaves:
            t.grad = None
    _set_time(row, case, ms)
    row["peak_mem_mb"] = round(mem, 1)
    row["max_err"] = err
    row["max_rel_err"] = None if rel_err is None else _sig(rel_err, 3)
    return row


def _set_time(row: dict, case: Case, ms: float) -> None:
    row["ms"] = _sig(ms)
    row["tflops"] = _sig(case.flops / (ms * 1e-3) / 1e12) if case.flops else None
    row["gbps"] = _sig(case.bytes / (ms * 1e-3) / 1e9) if case.bytes else None


@contextlib.contextmanager
def _gc_paused():
    """Keep the cyclic garbage collector off for the block (timeit's practice). No collection first: after
    the compile warm-ups a full one takes seconds, twice per case of a suite with a deadline."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


def _more_rounds(case: Case, rows: dict, calls: dict, rounds: int, timer, first_round: int = 1) -> None:
    """Time each implementation ``rounds - 1`` more times, visiting them in turn, and report the median of
    all rounds (the rounds so far are kept in ``ms_rounds``). ``calls[impl]`` is ``(call, leaves, samples)``;
    a timer that returns every call's time (CUDA) has the round's median taken, and the calls of all rounds
    pooled in ``samples`` are summarised in ``ms_calls`` (count and 10/50/90th percentiles: whether a figure
    is spread by rounds or by single calls). Round ``r`` (the first timing is round 0; ``first_round`` numbers
    the first round made here) starts at implementation ``r mod n``."""
    times = {impl: list(rows[impl].get("ms_rounds", [rows[impl]["ms"]])) for impl in calls}
    failed = set()
    names = list(calls)
    for r in range(first_round, first_round + rounds - 1):
        shift = r % len(names)
        for impl in names[shift:] + names[:shift]:
            call, leaves, samples = calls[impl]
            if impl in failed:
                continue
            try:
                got = timer(call, leaves)
                if isinstance(got, list):
                    samples += got
                    got = statistics.median(got)
                times[impl].append(got)
            except Exception:  # noqa: BLE001 - a later round that cannot run keeps the rounds that did
                failed.add(impl)
            finally:
                for t in leaves:
                    t.grad = None
    for impl, ms in times.items():
        _set_time(rows[impl], case, statistics.median(ms))
        rows[impl]["ms_rounds"] = [_sig(x) for x in ms]
        samples = calls[impl][2]
        if len(samples) > len(ms):
            deciles = statistics.quantiles(samples, n=10)
            rows[impl]["ms_calls"] = {"n": len(samples), "p10": _sig(deciles[0]),
                                      "p50": _sig(statistics.median(samples)), "p90": _sig(deciles[-1])}


def reference_output(case: Case, inputs: dict) -> torch.Tensor | None:
    if case.reference is None:
        return None
    with torch.no_grad():
        if callable(case.reference):
            return _first_tensor(case.reference(inputs)).detach()
        return _first_tensor(case.impls[case.reference](inputs)).detach()


def run_cases(cases: Iterable[Case], device: torch.device, *, impl_filter: Callable[[str], bool] | None = None,
              progress: Callable[[str], None] | None = None, cpu_reps: int = CPU_REPS,
              cuda_rounds: int = CUDA_ROUNDS, cpu_rounds: int = CPU_ROUNDS) -> list[dict]:
    """Measure every (case, impl); rows carry the device, versions and date. On CUDA each case's
    implementations are timed in ``cuda_rounds`` interleaved rounds; on CPU every case is timed again in
    ``cpu_rounds - 1`` later passes (see the module docstring)."""
    stamp = {"device": device_name(device), "versions": versions(),
             "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rows = []
    later: list = []            # CPU: (case, its rows, its calls) for the later passes
    for case in cases:
        inputs = case.make_inputs(device)
        try:
            ref = reference_output(case, inputs)
        except Exception as exc:  # noqa: BLE001
            ref = None
            rows.append({"case": case.case, "impl": "reference", "mode": case.mode, "seqlen": case.seqlen,
                         "error": f"{type(exc).__name__}: {exc}"[:300], **stamp})
        calls: dict = {}
        case_rows: dict = {}
        with _gc_paused():
            for impl in case.impls:
                if impl_filter is not None and not impl_filter(impl):
                    continue
                if progress is not None:
                    progress(f"{case.case} N={case.seqlen} {case.mode} {impl}")
                row = measure(case, impl, device, inputs, ref, cpu_reps=cpu_reps, calls=calls)
                row.update(stamp)
                rows.append(row)
                case_rows[impl] = row
            if calls and device.type == "cuda" and cuda_rounds > 1:
                _more_rounds(case, case_rows, calls, cuda_rounds, _time_cuda)
        if calls and device.type != "cuda" and cpu_rounds > 1:
            later.append((case, case_rows, calls))
        del inputs, ref, calls
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for p in range(1, cpu_rounds):
        for case, case_rows, calls in later:
            if progress is not None:
                progress(f"{case.case} N={case.seqlen} {case.mode}: one more pass")
            with _gc_paused():
                _more_rounds(case, case_rows, calls, 2, _time_cpu_once, first_round=p)
    return rows
