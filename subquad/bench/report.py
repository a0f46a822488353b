"""Reporting a benchmark run: a rich table in the terminal, ``bench.json`` and log-log plots."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rich.console import Console
from rich.table import Table


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def table(rows: list[dict], title: str = "subquad bench") -> Table:
    t = Table(title=title, show_lines=False)
    for col, justify in (("case", "left"), ("impl", "left"), ("mode", "left"), ("B", "right"), ("N", "right"),
                         ("ms", "right"), ("TFLOP/s", "right"), ("GB/s", "right"), ("peak MB", "right"),
                         ("max err", "right")):
        t.add_column(col, justify=justify, no_wrap=col in ("ms", "N"))
    for r in rows:
        if "error" in r:
            t.add_row(r["case"], r["impl"], r.get("mode", ""), str(r.get("batch", "")), str(r.get("seqlen", "")),
                      f"[red]{r['error'][:60]}[/red]", "", "", "", "")
            continue
        t.add_row(r["case"], r["impl"], r["mode"], str(r["batch"]), str(r["seqlen"]), _fmt(r["ms"], ".3f"),
                  _fmt(r.get("tflops"), ".1f" if (r.get("tflops") or 0) >= 1 else ".3g"), _fmt(r.get("gbps"), ".0f"), _fmt(r.get("peak_mem_mb"), ".1f"),
                  _fmt(r.get("max_err"), ".1e"))
    return t


def write_json(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1, default=str) + "\n")


def plots(rows: list[dict], out_dir: Path) -> list[Path]:
    """Time and peak memory per sequence versus N, log-log, one line per (case, impl), one figure pair per mode
    (per sequence: suites that keep B·N fixed, or run B = 2 at 16k and B = 1 at 64k, would otherwise draw a
    quadratic cost as a flatter line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    by_mode: dict[str, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if "error" not in r and r.get("ms") is not None:
            by_mode[r["mode"]][f"{r['case']} [{r['impl']}]"].append(r)
    written = []
    for mode, lines in by_mode.items():
        fig, axes = plt.subplots(1, 2, figsize=(13, 5))
        for label, rs in sorted(lines.items()):
            rs = sorted(rs, key=lambda r: r["seqlen"])
            n = [r["seqlen"] for r in rs]
            axes[0].plot(n, [r["ms"] / r.get("batch", 1) for r in rs], marker="o", label=label)
            mem = [(r["seqlen"], r["peak_mem_mb"] / r.get("batch", 1)) for r in rs if r.get("peak_mem_mb")]
            if mem:
                axes[1].plot(*zip(*mem), marker="o", label=label)
        for ax, ylabel in zip(axes, ("time per sequence (ms)", "peak memory per sequence (MB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        axes[0].set_title(f"time vs N ({mode})")
        axes[1].set_title(f"peak memory vs N ({mode})")
        axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        path = out_dir / f"bench-{mode}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def print_table(rows: list[dict], console: Console | None = None, title: str = "subquad bench") -> None:
    (console or Console()).print(table(rows, title))
