"""The ``subquad`` command line."""

from __future__ import annotations

import datetime as _dt
import re
import shutil
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

app = typer.Typer(help="subquad: efficient attention for PyTorch.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
# Wide enough for the benchmark table when the output is a file or a CI log rather than a terminal.
console = Console(width=None if Console().is_terminal else 150)


@app.callback()
def main() -> None:
    """subquad: efficient attention for PyTorch."""


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40]


@app.command()
def bench(
    suite: Optional[List[str]] = typer.Option(None, "--suite", "-s", help="Suite(s) to run (see --list)."),
    gpu: bool = typer.Option(False, "--gpu", help="Run every CUDA suite (instead of the default CPU set)."),
    quick: bool = typer.Option(False, "--quick", help="Small shapes only (smoke run)."),
    impl: Optional[str] = typer.Option(None, "--impl", help="Only implementations whose name contains this."),
    out: Path = typer.Option(Path("bench-out"), "--out", "-o", help="Folder for bench.json and the plots."),
    save: bool = typer.Option(False, "--save", help="Also copy the JSON to benchmarks/results/ (dated)."),
    list_suites: bool = typer.Option(False, "--list", help="List the suites and exit."),
) -> None:
    """Measure mechanisms beside their peers: a table, bench.json and time/memory plots.

    With no arguments: the default CPU set (exact causal attention vs sliding window vs the other patterns
    at growing N, on the reference path), in about a minute.
    """
    import torch

    from .bench import report
    from .bench.harness import load_suites, run_cases

    suites = load_suites()
    if list_suites:
        for s in suites.values():
            console.print(f"{s.name:20s} device={s.device:5s}{'  (default)' if s.default else ''}")
        raise typer.Exit()
    if suite:
        unknown = [s for s in suite if s not in suites]
        if unknown:
            raise typer.BadParameter(f"unknown suite(s) {unknown}; known: {sorted(suites)}", param_hint="--suite")
        chosen = [suites[s] for s in suite]
    elif gpu:
        chosen = [s for s in suites.values() if s.device == "cuda"]
    else:
        chosen = [s for s in suites.values() if s.default]
    if any(s.device == "cuda" for s in chosen) and not torch.cuda.is_available():
        raise typer.BadParameter("CUDA suites need a GPU; run without --gpu for the CPU set", param_hint="--gpu")

    rows = []
    with console.status("starting") as status:
        for s in chosen:
            device = torch.device("cuda" if s.device == "cuda" else "cpu")
            rows += run_cases(s.cases(quick), device,
                              impl_filter=(lambda name: impl in name) if impl else None,
                              progress=lambda msg, name=s.name: status.update(f"[bold]{name}[/bold]: {msg}"))
    report.print_table(rows, console, title=f"subquad bench ({', '.join(s.name for s in chosen)})")
    out.mkdir(parents=True, exist_ok=True)
    report.write_json(rows, out / "bench.json")
    pngs = report.plots(rows, out)
    console.print(f"wrote {out / 'bench.json'} and {', '.join(str(p) for p in pngs)}")
    if save and rows:
        day = _dt.date.today().isoformat()
        dest = Path("benchmarks/results") / f"{day}-{'+'.join(s.name for s in chosen)}-{_slug(rows[0]['device'])}.json"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "bench.json", dest)
        console.print(f"saved {dest}")


if __name__ == "__main__":
    app()
