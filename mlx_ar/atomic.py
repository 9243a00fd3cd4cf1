"""Atomic file writes: a crash leaves the old file or the new one, never half of either.

    atomic_write(path, "text")      # also bytes, or an iterable of str/bytes chunks
"""
import os
import threading
from pathlib import Path


def atomic_write(path, data) -> None:
    """Write `data` (str, bytes, or an iterable of them) to `path` atomically.

    The content goes to a temporary file in the same directory, is fsynced, then replaces
    `path`; if anything fails on the way (including the iterable raising), `path` is untouched
    and the temporary file is removed. A file that is replaced keeps its permission bits.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    chunks = [data] if isinstance(data, (str, bytes)) else data
    try:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk.encode() if isinstance(chunk, str) else chunk)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
