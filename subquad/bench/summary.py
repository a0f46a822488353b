"""Markdown tables of ratios from a results JSON: what the README quotes, generated rather than typed.

One row per (case, batch, N, pass): our implementation's time and effective TFLOP/s, and its speed ratio to
every peer measured on the same row (> 1: ours is faster). A README block between
``<!-- bench:NAME:begin -->`` and ``<!-- bench:NAME:end -->`` can be rewritten in place.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path


def _by_row(rows: list[dict]) -> dict[tuple, dict[str, dict]]:
    """(case, batch, N, pass) -> impl -> row, for the rows that ran. Rows of several files (``load`` marks each
    with its ``source``) may share no table row: a ratio is taken within one run."""
    groups: dict[tuple, dict[str, dict]] = defaultdict(dict)
    for r in rows:
        if "error" not in r and r.get("ms") is not None:
            key = _key(r)
            sources = {other.get("source") for other in groups[key].values()} | {r.get("source")}
            if len(sources) > 1:
                raise ValueError(f"results: {key[0]} at B={key[1]}, N={key[2]} ({key[3]}) is in several files "
                                 f"({', '.join(sorted(map(str, sources)))}): a ratio is taken within one run")
            groups[key][r["impl"]] = r
    return groups


def _key(row: dict) -> tuple:
    return row["case"], row.get("batch"), row["seqlen"], row["mode"]


def _length(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _provenance(rows: list[dict]) -> str:
    """Device, date and the versions that matter, from the first row that carries them in each file."""
    stamps = []
    for source in dict.fromkeys(r.get("source") for r in rows):
        mine = [r for r in rows if r.get("source") == source]
        device = next((r.get("device") for r in mine if r.get("device")), "?")
        versions = next((r.get("versions") for r in mine if r.get("versions")), {})
        date = next((r.get("date") for r in mine if r.get("date")), "?")[:10]
        stamp = ", ".join(f"{k} {v}" for k, v in versions.items()
                          if k in ("torch", "triton", "flash-attn-4", "subquad-commit"))
        stamps.append(f"{device}, {date}; {stamp}")
    return "; ".join(dict.fromkeys(stamps))


def ratio_table(rows: list[dict], ours: str, peers: list[str] | None = None) -> str:
    groups = _by_row(rows)
    if peers is None:
        peers = sorted({impl for g in groups.values() for impl in g if impl != ours})
    # (no peers: no empty column between TFLOP/s and max err)
    head = f"| case | B×N | pass | {ours} ms | TFLOP/s | " + "".join(f"÷ {p} | " for p in peers) + "max err |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    # (a row where ours failed was left out without a word: the table read as if it had not been run)
    failed = {_key(r): str(r["error"]).split(":", 1)[0] for r in rows if r["impl"] == ours and "error" in r}
    for key in dict.fromkeys(map(_key, rows)):
        case, batch, n, mode = key
        impls = groups.get(key, {})
        mine = impls.get(ours)
        if mine is None:
            if key in failed:
                lines.append(f"| {case} | {batch}×{_length(n)} | {mode} | failed ({failed[key]}) |  | "
                             + "— | " * len(peers) + " |")
            continue
        cells = []
        for p in peers:
            other = impls.get(p)
            cells.append(f"{other['ms'] / mine['ms']:.2f}" if other else "—")
        # (the CPU's rates are below 1: shown as 0 at .0f)
        tf = mine.get("tflops") or ""
        tf = f"{tf:.0f}" if tf and tf >= 1 else f"{tf:.2g}" if tf else ""
        err = f"{mine['max_err']:.1e}" if mine.get("max_err") is not None else ""
        if mine.get("max_rel_err") is not None:
            # outputs far from unit scale (unnormalised linear attention: hundreds) are judged relative to
            # the reference's largest entry
            err += f" ({mine['max_rel_err']:.1e} rel.)"
        lines.append(f"| {case} | {batch}×{_length(n)} | {mode} | {mine['ms']:.3f} | {tf} | "
                     + "".join(f"{c} | " for c in cells) + f"{err} |")
    return "\n".join(lines) + f"\n\n_{_provenance(rows)}. Ratios are peer time ÷ {ours} time in one run._\n"


#: the backends suite's columns: subquad's backends (auto first), then the peers it is judged against
BACKEND_IMPLS = ("subquad-auto", "subquad-triton", "subquad-fa4", "subquad-cudnn", "subquad-flex")
BACKEND_PEERS = ("fa4", "cudnn", "flex")


def backends_table(rows: list[dict]) -> str:
    """The ``backends`` suite as one table: ms (effective TFLOP/s) of every subquad backend and peer, the
    backend ``subquad-auto`` ran (its row's ``chosen``) and auto's speed over the fastest peer (> 1: faster)."""
    groups = _by_row(rows)
    cols = [c for c in BACKEND_IMPLS + BACKEND_PEERS if any(c in g for g in groups.values())]
    head = "| case | B×N | pass | " + " | ".join(cols) + " | auto ÷ fastest peer |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for (case, batch, n, mode), impls in groups.items():
        cells = []
        for c in cols:
            r = impls.get(c)
            cell = "—" if r is None else f"{r['ms']:.3f} ({r['tflops']:.0f})" if r.get("tflops") else f"{r['ms']:.3f}"
            if c == "subquad-auto" and r is not None and r.get("chosen"):
                cell += f" → {r['chosen']}"
            cells.append(cell)
        peers = [impls[p]["ms"] for p in BACKEND_PEERS if p in impls]
        auto = impls.get("subquad-auto")
        ratio = f"{min(peers) / auto['ms']:.2f}" if peers and auto else "—"
        lines.append(f"| {case} | {batch}×{_length(n)} | {mode} | " + " | ".join(cells) + f" | {ratio} |")
    return "\n".join(lines) + f"\n\n_{_provenance(rows)}. ms (effective TFLOP/s); one run._\n"


def rewrite_block(readme: Path, name: str, text: str) -> None:
    """Replace the README block ``name`` with ``text`` (the markers stay)."""
    begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
    body = readme.read_text()
    if begin not in body or end not in body:
        raise ValueError(f"readme: expected the markers {begin} and {end} in {readme}")
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    readme.write_text(pattern.sub(lambda _: f"{begin}\n{text}{end}", body))


ROW_KEYS = ("case", "impl", "mode", "seqlen")


#: fields the tables print as numbers (``ms`` is divided by, so a row that ran has ms > 0)
NUMBER_KEYS = ("ms", "tflops", "max_err", "max_rel_err")


def _bad_field(row: dict) -> str | None:
    """The first field of ``row`` that the tables cannot print, or None."""
    for k in ("seqlen", "batch"):
        if k in row and (not isinstance(row[k], int) or isinstance(row[k], bool)):
            return k
    for k in NUMBER_KEYS:
        if row.get(k) is not None and (not isinstance(row[k], (int, float)) or isinstance(row[k], bool)):
            return k
    if row.get("ms") is not None and not row["ms"] > 0:
        return "ms"
    return None


def load(path: Path) -> list[dict]:
    """The rows of a ``subquad bench`` results file (other JSONs under ``benchmarks/results/``, from the profiling
    and A/B scripts, have their own layouts: refused by name). Each row's ``source`` is the path as given: two
    runs' files are often both ``bench.json``."""
    try:
        rows = json.loads(Path(path).read_text())
    except ValueError as exc:  # (invalid JSON, or not text: the message named neither the file nor the cause)
        raise ValueError(f"results: expected a `subquad bench` JSON, got unreadable JSON in {path}: {exc}") from None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and all(k in r for k in ROW_KEYS) for r in rows):
        raise ValueError(f"results: expected a `subquad bench` JSON (a list of rows with {', '.join(ROW_KEYS)}), "
                         f"got another layout in {path}")
    for r in rows:
        bad = _bad_field(r)
        if bad is not None:
            raise ValueError(f"results: expected numbers (ms > 0) in {path}, got {bad}={r[bad]!r} in the row "
                             f"{r['case']} / {r['impl']}")
    return [dict(r, source=str(path)) for r in rows]


def implementations(rows: list[dict]) -> list[str]:
    return sorted({r["impl"] for r in rows})
