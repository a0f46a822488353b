"""Train a HybridLM on the standard-library byte corpus; save, load and sample from checkpoints.

``subquad train`` and ``subquad generate`` call ``train`` and ``generate_text``. One run writes to its output
folder: ``checkpoint.pt`` (model config, weights, training config, history), ``loss.png`` (training loss and
validation bits per byte against steps) and ``history.json``.
"""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path

import torch

from .data import VOCAB_SIZE, decode, encode, load_corpus, random_windows
from .models import HybridLM

LN2 = math.log(2.0)


@dataclass
class TrainConfig:
    """Defaults: a tiny model that trains 200 steps on a 2-core CPU in a couple of minutes."""

    layers: str = "MAMA"
    d_model: int = 64
    heads: int | None = None
    kv_heads: int | None = None
    mixer_options: dict = field(default_factory=dict)
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 50
    eval_batches: int = 4
    max_bytes: int | None = 4_000_000
    device: str = "auto"
    bf16: bool | None = None
    compile: bool = False
    seed: int = 0
    threads: int | None = None  # CPU threads for torch (1 is far faster on a CPU shared with other jobs)
    max_seconds: float | None = None  # time box for the steps after the 30th (the first ones compile kernels)
    out: str = "runs/train"

    def __post_init__(self):
        for name in ("d_model", "seq_len", "batch_size", "steps", "eval_every", "eval_batches"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise ValueError(f"{name}: expected a positive int, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr: expected > 0, got {self.lr}")
        # (0 was skipped as if unset, a negative count failed in torch.set_num_threads with a traceback)
        if self.threads is not None and (not isinstance(self.threads, int) or isinstance(self.threads, bool)
                                         or self.threads <= 0):
            raise ValueError(f"threads: expected a positive int or None, got {self.threads!r}")


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} asked, but this machine has no CUDA device (use 'auto' or 'cpu')")
    return device


def build_model(cfg: TrainConfig) -> HybridLM:
    return HybridLM(VOCAB_SIZE, cfg.d_model, cfg.layers, heads=cfg.heads, kv_heads=cfg.kv_heads,
                    mixer_options=cfg.mixer_options)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not norms, biases, embeddings' tied copy twice, decay params)."""
    decay, no_decay, seen = [], [], set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        (decay if p.dim() >= 2 else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))


@torch.no_grad()
def evaluate_bpb(model, data: torch.Tensor, cfg: TrainConfig, device, autocast) -> float:
    """Validation bits per byte on ``eval_batches`` fixed windows (seeded: the same windows at every eval)."""
    model.eval()
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for _ in range(cfg.eval_batches):
        batch = random_windows(data, cfg.batch_size, cfg.seq_len + 1, gen, device)
        with autocast():
            total += float(model.loss(batch))
    model.train()
    return total / cfg.eval_batches / LN2


@dataclass
class TrainResult:
    history: dict
    final_val_bpb: float
    tokens_per_s: float
    seconds: float
    checkpoint: str
    plot: str
    params: int


def train(cfg: TrainConfig, *, progress: bool = True, console=None, corpus=None) -> TrainResult:
    """Train, evaluate every ``eval_every`` steps and at the end, save the checkpoint and the loss plot."""
    checkpointable(asdict(cfg), "cfg")  # an option the checkpoint cannot hold is refused before training
    device = pick_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    corpus = corpus if corpus is not None else load_corpus(cfg.max_bytes)
    # checked before the steps: a validation split shorter than a window failed at the first evaluation, after
    # eval_every steps of training had run (and the run was lost)
    for split in ("train", "val"):
        available = getattr(corpus, split).numel()
        if available <= cfg.seq_len + 1:
            raise ValueError(f"seq_len: expected fewer than {available - 1} (the {split} split's {available} bytes "
                             f"less one: raise max_bytes), got {cfg.seq_len}")
    model = build_model(cfg).to(device)
    params = model.num_params()
    bf16 = cfg.bf16 if cfg.bf16 is not None else device.type == "cuda"

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    step_fn = torch.compile(model.loss) if cfg.compile else model.loss
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    history = {"step": [], "loss": [], "val_step": [], "val_bpb": []}
    tokens = cfg.batch_size * cfg.seq_len
    timed_steps, train_seconds = 0, 0.0
    start = time.perf_counter()
    bar = _progress(progress, console)
    with bar:
        task = bar.add_task("train", total=cfg.steps, loss=float("nan"), bpb=float("nan"), tps=0.0)
        step = 0
        while step < cfg.steps:
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, cfg)
            batch = random_windows(corpus.train, cfg.batch_size, cfg.seq_len + 1, gen, device)
            with autocast():
                loss = step_fn(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loss_value = float(loss.detach())  # waits for the step: the timing below is the step's real time
            if step >= min(5, cfg.steps // 10):  # the first steps compile / autotune: not timed
                train_seconds += time.perf_counter() - t0
                timed_steps += 1
            history["step"].append(step)
            history["loss"].append(loss_value)
            if cfg.max_seconds and step + 1 == 30 < cfg.steps and timed_steps:
                # the steady rate (kernel compilation and autotuning, which land in the first steps, excluded)
                # -> the steps that fit; the cosine schedule reads cfg.steps, so it ends on time
                fit = int(30 + cfg.max_seconds * timed_steps / train_seconds)
                cfg.steps = max(31, min(cfg.steps, fit))
                bar.update(task, total=cfg.steps)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                history["val_step"].append(step + 1)
                history["val_bpb"].append(evaluate_bpb(model, corpus.val, cfg, device, autocast))
            tps = timed_steps * tokens / train_seconds if train_seconds else 0.0
            bar.update(task, advance=1, loss=loss_value, tps=tps,
                       bpb=history["val_bpb"][-1] if history["val_bpb"] else float("nan"))
            step += 1
    seconds = time.perf_counter() - start
    tokens_per_s = timed_steps * tokens / train_seconds if train_seconds else 0.0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    save_checkpoint(ckpt, model, cfg, history)
    plot = plot_history({f"{cfg.layers} d={cfg.d_model}": history}, out / "loss.png")
    result = TrainResult(history, history["val_bpb"][-1], tokens_per_s, seconds, str(ckpt), str(plot), params)
    summary = {k: v for k, v in asdict(result).items() if k != "history"}
    (out / "history.json").write_text(json.dumps({"config": asdict(cfg), **summary, "history": history}, indent=1))
    return result


def _progress(enabled: bool, console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.3f}  val bpb {task.fields[bpb]:.3f}  "
                               "{task.fields[tps]:,.0f} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


def checkpointable(value, name: str):
    """``value`` in the types a weights-only checkpoint loads: dataclasses become dicts of their fields, which
    the layers take back (``rope_scaling=`` a ``RopeScaling`` or its dict); anything else but None, numbers,
    strings, lists, tuples and dicts (a mask pattern, a module) is refused with a ValueError naming ``name``."""
    if is_dataclass(value) and not isinstance(value, type):
        value = asdict(value)
    if isinstance(value, dict):
        return {k: checkpointable(v, f"{name}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(checkpointable(v, f"{name}[{i}]") for i, v in enumerate(value))
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"{name}: expected None, a number, a string, a list, a dict or a dataclass (what a checkpoint "
                     f"can hold), got {type(value).__name__}")


def save_checkpoint(path, model: HybridLM, cfg: TrainConfig, history: dict) -> None:
    torch.save({"model_config": checkpointable(model.config, "model.config"), "state_dict": model.state_dict(),
                "train_config": checkpointable(asdict(cfg), "cfg"), "history": history}, path)


def load_checkpoint(path, device="cpu") -> tuple[HybridLM, dict]:
    """Rebuild the model from its saved config and load the weights. Returns ``(model, checkpoint dict)``."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
        cfg = dict(ckpt["model_config"])
    except (KeyError, TypeError, RuntimeError, pickle.UnpicklingError):
        raise ValueError(f"checkpoint: expected a checkpoint.pt written by `subquad train`, got {path}") from None
    model = HybridLM(cfg.pop("vocab_size"), cfg.pop("d_model"), cfg.pop("layers"), **cfg)
    model.load_state_dict(ckpt["state_dict"])
    return model.to(device).eval(), ckpt


def plot_history(histories: dict[str, dict], path) -> Path:
    """Training loss (bits per byte, smoothed) and validation bits per byte against steps, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    many = len(histories) > 10
    fig, ax = plt.subplots(figsize=(10 if many else 7, 4.5))
    for i, (name, h) in enumerate(histories.items()):
        colour = plt.get_cmap("tab20")(i % 20) if many else f"C{i % 10}"
        bits = torch.tensor(h["loss"]) / LN2
        window = max(1, len(bits) // 50)
        smooth = bits.unfold(0, window, 1).mean(1) if len(bits) >= window else bits
        ax.plot(h["step"][window - 1:], smooth.tolist(), color=colour, lw=1.2, label=f"{name} (train)")
        if h["val_step"]:
            ax.plot(h["val_step"], h["val_bpb"], "o--", color=colour, ms=3, lw=0.8, label=f"{name} (val)")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per byte")
    ax.set_title("HybridLM on the Python standard library (bytes)")
    ax.grid(alpha=0.3)
    if many:
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def generate_text(checkpoint, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 40, seed: int = 0, device: str = "auto", top_p: float | None = None) -> str:
    """Sample a continuation of ``prompt`` (bytes) from a checkpoint, with the layers' caches."""
    dev = pick_device(device)
    model, _ = load_checkpoint(checkpoint, dev)
    ids = encode(prompt or "\n").view(1, -1).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=gen)
    return decode(out[0].tolist())
