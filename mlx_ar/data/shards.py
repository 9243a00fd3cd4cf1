"""Pre-tokenized shards: each source file becomes two memory-mappable .npy files.

    tokens/<split>_<i:05d>.tokens.npy   uint16 (n,): every document as [BOS, tok, tok, ...], back to back
    tokens/<split>_<i:05d>.docs.npy     int64 (docs+1,): offsets; document j is tokens[o[j]:o[j+1]]

    stats = tokenize_file(tok, source_file, tokens_dir, "train", 0, executor)
    shard = load_shard(tokens_dir, "train", 0, bos_id)   # validated, memory-mapped

Tokenization is batched: batches of documents are encoded in a thread pool (tiktoken releases
the GIL) while the main thread reads the next batch, a few batches ahead, results kept in order.
Both files are written to `.tmp` names and renamed, so a crash never leaves a half shard.
"""
import io
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_write
from .errors import DataError


def shard_files(tokens_dir, split: str, index: int) -> tuple[Path, Path]:
    d = Path(tokens_dir)
    return d / f"{split}_{index:05d}.tokens.npy", d / f"{split}_{index:05d}.docs.npy"


def save_npy(path: Path, array: np.ndarray) -> None:
    """np.save to `path`, atomically."""
    buf = io.BytesIO()
    np.save(buf, array)
    atomic_write(path, buf.getvalue())


def _encode_job(tok, texts: list[str]):
    """Runs in a worker thread: the flat BOS-prefixed uint16 tokens and per-document lengths."""
    encoded = tok.encode_batch(texts)
    flat = []
    for ids in encoded:
        flat.append(tok.bos_id)
        flat.extend(ids)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    return np.array(flat, dtype=np.uint16), lengths


@dataclass
class TokenizeStats:
    docs: int = 0
    empty: int = 0
    tokens: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"docs": self.docs, "empty_skipped": self.empty, "tokens": self.tokens,
                "bytes": self.bytes, "seconds": round(self.seconds, 3)}


def tokenize_file(tok, source_file, tokens_dir, split: str, index: int, executor, window: int = 4,
                  on_progress=lambda tokens, nbytes: None, log=lambda msg: None) -> TokenizeStats:
    """Tokenize every document of `source_file` into the shard (split, index); return its stats."""
    tokens_path, docs_path = shard_files(tokens_dir, split, index)
    Path(tokens_dir).mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    pending = deque()
    pieces, lengths = [], []
    stats = TokenizeStats()

    def collect(fut):
        flat, lens = fut.result()
        pieces.append(flat)
        lengths.append(lens)
        nbytes = int(tok.token_bytes[flat].sum())
        stats.tokens += int(flat.size)
        stats.bytes += nbytes
        on_progress(int(flat.size), nbytes)

    for batch in source_file.batches(log):
        pending.append(executor.submit(_encode_job, tok, batch))
        # Keep a few batches in flight so every worker stays busy while the next batch is read.
        while len(pending) > window:
            collect(pending.popleft())
    while pending:
        collect(pending.popleft())
    stats.docs = source_file.stats.get("docs", 0)
    stats.empty = source_file.stats.get("empty", 0)
    if stats.docs == 0:
        raise DataError(f"{source_file.name} ({split} split) has no non-empty documents")
    tokens = np.concatenate(pieces)
    offsets = np.concatenate(([0], np.cumsum(np.concatenate(lengths)))).astype(np.int64)
    save_npy(tokens_path, tokens)
    save_npy(docs_path, offsets)
    stats.seconds = time.perf_counter() - t0
    return stats


# --- reading ----------------------------------------------------------------------------------
@dataclass
class TokenShard:
    tokens: np.ndarray    # uint16 memmap
    offsets: np.ndarray   # int64, docs+1

    @property
    def num_docs(self) -> int:
        return len(self.offsets) - 1


def load_shard(tokens_dir, split: str, index: int, bos_id: int, expect_tokens: int | None = None,
               expect_docs: int | None = None,
               fix: str = "re-run `python prepare.py --force` to rebuild the dataset") -> TokenShard:
    """Memory-map one shard and check its structure; DataError naming the file (and `fix`) if anything is off."""
    tokens_path, docs_path = shard_files(tokens_dir, split, index)
    for p in (tokens_path, docs_path):
        if not p.is_file():
            raise DataError(f"missing {split} token file {p}; {fix}")
    try:
        tokens = np.load(tokens_path, mmap_mode="r", allow_pickle=False)
        offsets = np.load(docs_path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise DataError(f"unreadable token file in {tokens_dir} ({e}); {fix}") from e
    if tokens.dtype != np.uint16 or tokens.ndim != 1 or offsets.dtype != np.int64 or offsets.ndim != 1:
        raise DataError(f"{tokens_path} / {docs_path} have the wrong dtype or shape; {fix}")
    if (len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != len(tokens)
            or np.any(np.diff(offsets) <= 0) or np.any(tokens[offsets[:-1]] != bos_id)):
        raise DataError(f"{docs_path} does not describe BOS-prefixed documents of {tokens_path}; {fix}")
    if (expect_tokens is not None and len(tokens) != expect_tokens) or \
            (expect_docs is not None and len(offsets) - 1 != expect_docs):
        raise DataError(f"{tokens_path} does not match the manifest ({len(tokens)} tokens, "
                        f"{len(offsets) - 1} docs); {fix}")
    return TokenShard(tokens, offsets)
