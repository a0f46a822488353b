"""A real text corpus that needs no download: the Python standard library's own ``.py`` sources, read as bytes
from the running interpreter's installation (about 30 MB on CPython 3.11; ``site-packages`` excluded).

Tokens are bytes (vocabulary 256), so a model's cross-entropy in bits per token is its bits per byte. Files are
assigned to the validation split by a hash of their path relative to the library root (stable across runs and
machines with the same Python), so no file is split between train and validation.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB_SIZE = 256


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """The library's ``.py`` files, outside ``site-packages``, in a fixed pseudo-random order (by path hash)."""
    root = Path(root) if root is not None else stdlib_root()
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.relative_to(root).parts and f.is_file()]
    return sorted(files, key=lambda f: (_path_hash(f, root), str(f.relative_to(root))))


def _path_hash(f: Path, root: Path) -> int:
    return zlib.crc32(f.relative_to(root).as_posix().encode())


@dataclass
class Corpus:
    train: torch.Tensor  # uint8 (n_train,)
    val: torch.Tensor    # uint8 (n_val,)
    root: str
    files: int

    @property
    def nbytes(self) -> int:
        return self.train.numel() + self.val.numel()


def load_corpus(max_bytes: int | None = None, val_fraction: float = 0.05, root: Path | None = None) -> Corpus:
    """Read the standard library (up to ``max_bytes``, whole files) and split it by file.

    A file goes to validation when its path hash falls in the first ``val_fraction`` of the hash range; if
    that leaves one split empty (tiny ``max_bytes``), the last file read goes to validation.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction: expected a fraction in (0, 1), got {val_fraction}")
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"root: no .py files under {root}")
    train, val, total, used = [], [], 0, 0
    for f in files:
        data = f.read_bytes()
        if not data:
            continue
        is_val = (zlib.crc32(f.relative_to(root).as_posix().encode()[::-1]) % 10_000) < val_fraction * 10_000
        (val if is_val else train).append(data)
        total += len(data)
        used += 1
        if max_bytes is not None and total >= max_bytes:
            break
    if not val:
        val.append(train.pop())
    if not train:
        # one file read (a small max_bytes): its head trains, its tail validates
        data = val.pop(0)
        cut = max(1, int(len(data) * (1 - val_fraction)))
        train.append(data[:cut])
        val.append(data[cut:] or data[-1:])

    def as_tensor(chunks: list[bytes]) -> torch.Tensor:
        return torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)

    return Corpus(as_tensor(train), as_tensor(val), str(root), used)


def random_windows(data: torch.Tensor, batch: int, length: int, generator: torch.Generator | None = None,
                   device=None) -> torch.Tensor:
    """``batch`` random windows of ``length`` consecutive bytes, ``(batch, length)`` int64 on ``device``."""
    if data.numel() <= length:
        raise ValueError(f"length: expected fewer than the {data.numel()} bytes available, got {length}")
    starts = torch.randint(0, data.numel() - length, (batch,), generator=generator)
    idx = starts.view(-1, 1) + torch.arange(length)
    return data[idx].long().to(device)


def encode(text: str) -> torch.Tensor:
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


def decode(ids) -> str:
    return bytes(int(i) for i in ids).decode("utf-8", errors="replace")
