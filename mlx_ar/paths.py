"""Where prepared data lives: `$MLX_AR_CACHE` or ~/.cache/mlx-autoresearch.

Layout under the root:
    datasets/<name>/raw/           downloaded source shards (climbmix only)
    datasets/<name>/tokenizer/     ranks.txt, tokenizer.json, token_bytes.npy
    datasets/<name>/tokens/        pre-tokenized train/val shards
    datasets/<name>/manifest.json  what prepare produced (source, profile, splits, hashes)
    current                        name of the dataset train.py uses by default
"""
import os
from pathlib import Path

from .constants import CACHE_ENV, DEFAULT_CACHE


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def dataset_dir(name: str) -> Path:
    return cache_root() / "datasets" / name


def current_dataset() -> str | None:
    """The dataset most recently prepared (train.py's default), or None before any prepare."""
    p = cache_root() / "current"
    return p.read_text().strip() or None if p.exists() else None


def set_current_dataset(name: str) -> None:
    from .atomic import atomic_write

    atomic_write(cache_root() / "current", name + "\n")
