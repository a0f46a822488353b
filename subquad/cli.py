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
    save: bool = typer.Option(False, "--save", help="Also copy the JSON to benchmarks/results/ (dated) under the "
                                                    "current folder (run it from the repository's root)."),
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
        raise typer.BadParameter("CUDA suites need a GPU; run without --gpu for the CPU set" if gpu and not suite
                                 else "CUDA suites need a GPU; name CPU suites (see --list)",
                                 param_hint="--gpu" if gpu and not suite else "--suite")
    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"expected a folder, got the file {out}", param_hint="--out")

    rows = []
    with console.status("starting") as status:
        for s in chosen:
            device = torch.device("cuda" if s.device == "cuda" else "cpu")
            rows += run_cases(s.cases(quick), device,
                              impl_filter=(lambda name: impl in name) if impl else None,
                              progress=lambda msg, name=s.name: status.update(f"[bold]{name}[/bold]: {msg}"))
    if not rows:
        raise typer.BadParameter(f"no implementation of the chosen suites has {impl!r} in its name",
                                 param_hint="--impl")
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


@app.command()
def report(
    results: List[Path] = typer.Argument(..., exists=True, dir_okay=False,
                                         help="Results JSONs written by `subquad bench` (rows of several runs, "
                                              "e.g. one shape each, go into one table)."),
    ours: str = typer.Option("subquad-triton", "--ours", help="The implementation the ratios are taken for."),
    peer: Optional[List[str]] = typer.Option(None, "--peer", help="Peers to compare with (default: all)."),
    readme_block: Optional[str] = typer.Option(None, "--readme-block",
                                               help="Rewrite the block <!-- bench:NAME:begin/end --> of README.md "
                                                    "(or of --into)."),
    into: Path = typer.Option(Path("README.md"), "--into", dir_okay=False,
                              help="The Markdown file whose block --readme-block rewrites (e.g. "
                                   "benchmarks/HISTORY.md, where superseded runs keep their blocks)."),
    backends: bool = typer.Option(False, "--backends",
                                  help="The backends suite's table (every backend and peer, auto's choice)."),
) -> None:
    """Print (or write into the README) the table of speed ratios of a results JSON."""
    from .bench.summary import backends_table, implementations, load, ratio_table, rewrite_block

    try:
        rows = [row for path in results for row in load(path)]
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="RESULTS") from None
    found = implementations(rows)
    if not backends:
        # (a name that matches no row gave an empty table, or a column of dashes, without a word)
        for name, hint in [(ours, "--ours"), *((p, "--peer") for p in peer or [])]:
            if name not in found:
                raise typer.BadParameter(f"{name!r} is not among the implementations in these results: {found}",
                                         param_hint=hint)
    try:
        text = backends_table(rows) if backends else ratio_table(rows, ours, peer or None)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="RESULTS") from None
    if readme_block:
        sources = ", ".join(f"`{path}`" for path in results)
        try:
            rewrite_block(into, readme_block, f"From {sources}:\n\n{text}")
        except (ValueError, FileNotFoundError) as exc:
            raise typer.BadParameter(f"{exc} (run it from the repository's root)", param_hint="--readme-block") \
                from None
        console.print(f"rewrote {into} block {readme_block}")
    else:
        console.print(text, markup=False, highlight=False, soft_wrap=True)


def _mixer_options(items: Optional[List[str]]) -> dict:
    """``["L.window=64", "M.d_state=16"]`` -> ``{"L": {"window": 64}, "M": {"d_state": 16}}`` (values as JSON)."""
    import json

    options: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        mixer, dot, name = key.partition(".")
        if not sep or not dot or not mixer or not name:
            raise typer.BadParameter(f"expected MIXER.NAME=VALUE (e.g. L.window=64), got {item!r}",
                                     param_hint="--option")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value
        options.setdefault(mixer, {})[name] = parsed
    return options


@app.command()
def train(
    layers: str = typer.Option("MAMA", "--layers", "-l", help="One mixer letter per layer (A, L, G, D, K, F, R, E, M, N, Y, S, H)."),
    d_model: int = typer.Option(64, "--d-model"),
    heads: Optional[int] = typer.Option(None, "--heads", help="Heads per mixer (default d_model / 64, at least 1)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Mixer option, e.g. L.window=64."),
    steps: int = typer.Option(200, "--steps"),
    batch_size: int = typer.Option(16, "--batch-size", "-b"),
    seq_len: int = typer.Option(128, "--seq-len"),
    lr: float = typer.Option(3e-3, "--lr"),
    eval_every: int = typer.Option(50, "--eval-every"),
    max_bytes: Optional[int] = typer.Option(4_000_000, "--max-bytes", help="Corpus bytes to read (0: all)."),
    device: str = typer.Option("auto", "--device"),
    compile: bool = typer.Option(False, "--compile", help="torch.compile the training step."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch."),
    seed: int = typer.Option(0, "--seed"),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Folder for checkpoint.pt, loss.png, history.json."),
) -> None:
    """Train a HybridLM on the Python standard library's own sources (bytes): progress bar, validation bits
    per byte, loss curve PNG and a checkpoint. bf16 autocast on a GPU."""
    from .train import TrainConfig
    from .train import train as run_training

    if out.exists() and not out.is_dir():
        raise typer.BadParameter(f"expected a folder, got the file {out}", param_hint="--out")
    if max_bytes is not None and max_bytes < 0:
        raise typer.BadParameter(f"expected >= 0 (0: all), got {max_bytes}", param_hint="--max-bytes")
    try:
        cfg = TrainConfig(layers=layers, d_model=d_model, heads=heads, mixer_options=_mixer_options(option),
                          steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, eval_every=eval_every,
                          max_bytes=max_bytes or None, device=device, compile=compile, threads=threads, seed=seed,
                          out=str(out))
        result = run_training(cfg, console=console)
    except (ValueError, TypeError) as exc:
        # a bad value reaches the model or the config as a ValueError naming its field (``steps``, ``heads``,
        # a mixer option): the option names follow the fields (``-O`` for mixer options)
        raise typer.BadParameter(str(exc)) from None
    console.print(f"{layers} d_model={d_model}: {result.params:,} parameters, {steps} steps in {result.seconds:.1f} s, "
                  f"{result.tokens_per_s:,.0f} tokens/s, loss {result.history['loss'][0]:.3f} -> "
                  f"{result.history['loss'][-1]:.3f}, validation {result.final_val_bpb:.3f} bits/byte")
    console.print(f"wrote {result.checkpoint} and {result.plot}")


@app.command()
def generate(
    checkpoint: Path = typer.Argument(..., exists=True, dir_okay=False, help="checkpoint.pt from `subquad train`."),
    prompt: str = typer.Option("def ", "--prompt", "-p"),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", "-n"),
    temperature: float = typer.Option(0.8, "--temperature", "-t", help="0: greedy."),
    top_k: int = typer.Option(40, "--top-k", min=0, help="Sample from the k likeliest bytes (0: all)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Sample from the likeliest bytes whose probability reaches "
                                "p (1: all)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
) -> None:
    """Sample a continuation of a prompt from a checkpoint (with each layer's cache)."""
    from .train import generate_text

    if not 0 < top_p <= 1:
        raise typer.BadParameter(f"expected a probability in (0, 1], got {top_p}", param_hint="--top-p")
    try:
        text = generate_text(checkpoint, prompt, max_new_tokens, temperature, top_k or None, seed, device,
                             top_p=top_p)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(text)


eval_app = typer.Typer(help="Evaluations that show where each mechanism fails: recall, needle, fidelity.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _split(text: str, cast, hint: str) -> list:
    """``"16,32,64"`` -> ``[16, 32, 64]`` (each item through ``cast``)."""
    try:
        items = [cast(item.strip()) for item in text.split(",") if item.strip()]
    except ValueError:
        items = []
    if not items:
        raise typer.BadParameter(f"expected a comma-separated list, got {text!r}", param_hint=hint)
    return items


def _eval_options(option: Optional[List[str]], window: int) -> dict:
    """``-O`` mixer options, the sliding-window layers' ``window`` from ``--window`` unless ``-O`` sets it."""
    options = _mixer_options(option)
    options.setdefault("L", {}).setdefault("window", window)
    return options


@eval_app.command("recall")
def eval_recall(
    patterns: str = typer.Option("AA,LL,FF", "--patterns", "-p", help="Comma-separated layer patterns, one model "
                                 "each (A softmax, L sliding window, F linear, E GLA, M Mamba-2, ...)."),
    steps: int = typer.Option(200, "--steps"),
    seq_len: int = typer.Option(16, "--seq-len"),
    num_pairs: int = typer.Option(4, "--num-pairs", help="Key-value pairs listed, then queried, per sequence."),
    vocab_size: int = typer.Option(16, "--vocab-size"),
    d_model: int = typer.Option(64, "--d-model"),
    batch_size: int = typer.Option(64, "--batch-size", "-b"),
    lr: float = typer.Option(3e-3, "--lr"),
    window: int = typer.Option(4, "--window", help="Window of the sliding-window layers (L)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Mixer option, e.g. F.feature_map=relu."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(1, "--threads", help="CPU threads for torch (1 is far faster on a CPU "
                                          "shared with other jobs)."),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Train one small model per pattern on MQAR (multi-query associative recall), then print the fraction of
    queried keys whose value each recalls on held-out sequences. The defaults take about half a minute on a
    CPU: softmax attention recalls nearly all, a window shorter than the distance to the pairs and linear
    attention's fixed-size state far fewer."""
    from rich.table import Table

    from .eval import train_and_eval_mqar

    rows = []
    with console.status("training") as status:
        for pattern in _split(patterns, str, "--patterns"):
            status.update(f"[bold]{pattern}[/bold]: {steps} steps of MQAR")
            try:
                rows.append(train_and_eval_mqar(pattern, seq_len=seq_len, num_pairs=num_pairs, vocab_size=vocab_size,
                                                d_model=d_model, mixer_options=_eval_options(option, window),
                                                steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                                threads=threads, device=device))
            except (ValueError, TypeError) as exc:
                raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"MQAR recall: {num_pairs} pairs, {seq_len} tokens, vocab {vocab_size}, {steps} steps "
                        f"(chance {1 / num_pairs:.2f})")
    for name in ("pattern", "params", "loss first -> last", "recall", "seconds"):
        table.add_column(name, justify="left" if name == "pattern" else "right")
    for r in rows:
        table.add_row(r.pattern, f"{r.params:,}", f"{r.losses[0]:.3f} -> {r.losses[-1]:.3f}", f"{r.accuracy:.3f}",
                      f"{r.seconds:.1f}")
    console.print(table)


@eval_app.command("needle")
def eval_needle(
    pattern: str = typer.Option("AA", "--pattern", "-p", help="The layer pattern of the model trained."),
    train_len: int = typer.Option(16, "--train-len", help="Context length the model is trained at."),
    lengths: str = typer.Option("16,32,64", "--lengths", help="Context lengths evaluated (comma-separated)."),
    depths: str = typer.Option("0,0.25,0.5,0.75,1", "--depths", help="Needle depths evaluated, fractions."),
    steps: int = typer.Option(300, "--steps"),
    batch_size: int = typer.Option(128, "--batch-size", "-b"),
    vocab_size: int = typer.Option(16, "--vocab-size"),
    d_model: int = typer.Option(64, "--d-model"),
    window: int = typer.Option(8, "--window", help="Window of the sliding-window layers (L)."),
    option: Optional[List[str]] = typer.Option(None, "--option", "-O", help="Mixer option, e.g. F.feature_map=relu."),
    trials: int = typer.Option(64, "--trials", help="Needles per cell of the grid."),
    seed: int = typer.Option(0, "--seed"),
    threads: Optional[int] = typer.Option(1, "--threads", help="CPU threads for torch."),
    device: str = typer.Option("cpu", "--device"),
    out: Path = typer.Option(Path("needle.png"), "--out", "-o", help="The heat map PNG."),
) -> None:
    """Train a small model to retrieve a needle at random depths, then print its retrieval accuracy over
    context lengths x needle depths (lengths past --train-len test extrapolation) and draw the heat map."""
    from rich.table import Table

    from .eval.needle import check_grid, needle_grid, train_needle_model

    length_list, depth_list = _split(lengths, int, "--lengths"), _split(depths, float, "--depths")
    try:
        check_grid(length_list, depth_list, trials)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    if threads:
        import torch

        torch.set_num_threads(threads)
    with console.status(f"[bold]{pattern}[/bold]: {steps} steps of needle retrieval at {train_len} tokens"):
        try:
            model = train_needle_model(pattern, seq_len=train_len, vocab_size=vocab_size, d_model=d_model,
                                       mixer_options=_eval_options(option, window), steps=steps,
                                       batch_size=batch_size, seed=seed, device=device)
            grid = needle_grid(model, length_list, depth_list, trials=trials, seed=seed)
        except (ValueError, TypeError) as exc:
            raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"needle retrieval, {pattern} trained at {train_len} tokens ({trials} needles a cell)")
    table.add_column("depth / length")
    for n in grid.lengths:
        table.add_column(str(n), justify="right")
    for depth, row in zip(grid.depths, grid.accuracy):
        table.add_row(f"{depth:.0%}", *(f"{a:.2f}" for a in row))
    console.print(table)
    console.print(f"wrote {grid.plot(out, title=f'needle in a haystack: {pattern} (trained at {train_len})')}")


@eval_app.command("fidelity")
def eval_fidelity(
    checkpoint: Path = typer.Argument(..., exists=True, dir_okay=False, help="checkpoint.pt from `subquad train`."),
    mechanism: str = typer.Option("window", "--to", help="What replaces the exact attention layers: window, "
                                  "linear or gqa."),
    window: int = typer.Option(32, "--window", help="--to window: the window."),
    feature_map: str = typer.Option("elu1", "--feature-map", help="--to linear: the feature map."),
    kv_heads: int = typer.Option(1, "--kv-heads", help="--to gqa: key/value heads."),
    batches: int = typer.Option(4, "--batches"),
    batch_size: int = typer.Option(8, "--batch-size", "-b"),
    seq_len: int = typer.Option(128, "--seq-len"),
    max_bytes: int = typer.Option(1_000_000, "--max-bytes", help="Corpus bytes read (the validation windows)."),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("cpu", "--device"),
) -> None:
    """Swap a trained model's exact softmax attention layers (A, G) for a cheaper mechanism with the same
    weights, then compare both on the same validation windows: logits' relative L2 error, KL divergence of the
    next-token distributions, bits per byte and perplexity."""
    import torch
    from rich.table import Table

    from .data import load_corpus, random_windows
    from .eval import fidelity, replace_attention
    from .train import load_checkpoint, pick_device

    try:
        dev = pick_device(device)
        model, _ = load_checkpoint(checkpoint, dev)
        swapped = replace_attention(model, mechanism, window=window, feature_map=feature_map, kv_heads=kv_heads)
        corpus = load_corpus(max_bytes)
        gen = torch.Generator().manual_seed(seed)
        windows = [random_windows(corpus.val, batch_size, seq_len + 1, gen, dev) for _ in range(batches)]
        result = fidelity(model, swapped, windows)
    except (ValueError, TypeError) as exc:
        raise typer.BadParameter(str(exc)) from None
    table = Table(title=f"{model.layer_letters} -> {swapped.layer_letters} ({mechanism}), {result.tokens:,} tokens")
    for name in ("", "exact", "swapped"):
        table.add_column(name, justify="left" if not name else "right")
    table.add_row("bits per byte", f"{result.exact_bits:.4f}", f"{result.swapped_bits:.4f}")
    table.add_row("perplexity", f"{result.exact_perplexity:.3f}", f"{result.swapped_perplexity:.3f}")
    table.add_row("logits relative L2", "", f"{result.logits_rel_l2:.4f}")
    table.add_row("KL(exact || swapped), nats", "", f"{result.kl:.5f}")
    console.print(table)


if __name__ == "__main__":
    app()
