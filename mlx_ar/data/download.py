"""Parallel, resumable shard downloads (climbmix parquet shards).

    download_shards([0, 1, 6542], raw_dir, base_url, workers=8)

Each shard streams into `<name>.<pid>.tmp` beside its final path and is renamed into place only
after its size matches Content-Length and its parquet footer opens, so an interrupted or
truncated download never leaves a partial file under the final name. A shard already present
and readable is skipped; one that fails validation is deleted and fetched again. Failures
(HTTP errors, resets, truncated bodies, timeouts) are retried with exponential backoff; the
`sleep` function is injectable so tests run without waiting.
"""
import http.client
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import DataError, DownloadError, OfflineError
from .progress import Progress
from .sources import climbmix_shard_name


@dataclass(frozen=True)
class DownloadSettings:
    workers: int = 8
    retries: int = 5              # attempts after the first one
    backoff: float = 2.0          # seconds before the first retry; doubled each time
    timeout: float = 60.0         # socket timeout per read
    chunk_bytes: int = 1 << 20


DEFAULTS = DownloadSettings()


def shard_is_valid(path: Path) -> bool:
    """True when `path` is a readable parquet file (its footer parses)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pq.ParquetFile(path).metadata
        return True
    except (pa.ArrowException, OSError):
        return False


def offline_message(url: str, error) -> str:
    """The one next step when a host's name does not resolve (no network)."""
    host = urllib.parse.urlsplit(url).hostname
    return (f"cannot reach {host}: name resolution failed ({error}); this machine looks offline. "
            "Next: `python prepare.py --source demo` (small, built in, no network) or "
            "`python prepare.py --source local DIR` (your own text files)")


def fetch_one(url: str, dest: Path, settings: DownloadSettings = DEFAULTS,
              sleep: Callable[[float], None] = time.sleep, on_bytes: Callable[[int], None] = lambda n: None,
              log: Callable[[str], None] = lambda msg: None, urlopen=urllib.request.urlopen) -> Path:
    """Download `url` to `dest` atomically, retrying; raise DownloadError after the last attempt
    (at once when the host's name does not resolve: the machine is offline)."""
    tmp = dest.with_name(f"{dest.name}.{os.getpid()}.tmp")
    last_error = "no attempt made"
    for attempt in range(settings.retries + 1):
        if attempt:
            delay = settings.backoff * 2 ** (attempt - 1)
            log(f"retrying {url} in {delay:.1f}s (attempt {attempt + 1}/{settings.retries + 1}): {last_error}")
            sleep(delay)
        got = 0
        try:
            with urlopen(url, timeout=settings.timeout) as resp, open(tmp, "wb") as f:
                expected = resp.headers.get("Content-Length")
                while chunk := resp.read(settings.chunk_bytes):
                    f.write(chunk)
                    got += len(chunk)
                    on_bytes(len(chunk))
            if expected is not None and got != int(expected):
                raise DataError(f"truncated body: {got} of {expected} bytes")
            if not shard_is_valid(tmp):
                raise DataError(f"received {got} bytes that are not a readable parquet file")
            os.replace(tmp, dest)
            return dest
        except urllib.error.HTTPError as e:
            last_error = f"HTTP {e.code} {e.reason}"
            if e.code == 404:
                break  # the shard does not exist; retrying cannot help
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                # No name resolution means no network: retrying only makes the user wait.
                raise OfflineError(offline_message(url, e.reason)) from None
            last_error = f"{type(e).__name__}: {e.reason}"
        except (OSError, http.client.HTTPException, DataError) as e:
            # URLError and socket timeouts are OSErrors; IncompleteRead and RemoteDisconnected
            # (a truncated body or a dropped connection) are HTTPExceptions.
            last_error = f"{type(e).__name__}: {getattr(e, 'reason', None) or e}"
        finally:
            # After a successful os.replace the tmp name is gone; otherwise nothing partial survives.
            tmp.unlink(missing_ok=True)
        on_bytes(-got)  # progress counts only bytes that were kept
    raise DownloadError(f"could not download {url} after {attempt + 1} attempt(s): {last_error}; "
                        f"nothing was written to {dest} -- re-run the same command to resume")


def download_shards(indices, raw_dir, base_url: str, settings: DownloadSettings = DEFAULTS,
                    sleep: Callable[[float], None] = time.sleep, log: Callable[[str], None] = lambda msg: None,
                    stream=None) -> list[Path]:
    """Make sure shard_{i:05d}.parquet exists and is valid for every index; return their paths."""
    raw = Path(raw_dir)
    raw.mkdir(parents=True, exist_ok=True)
    # Partial files of a killed earlier run (one prepare per dataset runs at a time).
    for stale in raw.glob("*.parquet.*.tmp"):
        stale.unlink(missing_ok=True)
    paths, todo = [], []
    for i in indices:
        dest = raw / climbmix_shard_name(i)
        paths.append(dest)
        if dest.exists():
            if shard_is_valid(dest):
                continue
            log(f"{dest} is truncated or corrupt; fetching it again")
            dest.unlink()
        todo.append((f"{base_url.rstrip('/')}/{dest.name}", dest))
    if not todo:
        log(f"all {len(paths)} shard(s) already in {raw}")
        return paths
    log(f"downloading {len(todo)} shard(s) to {raw} ({len(paths) - len(todo)} already present)")
    bar = Progress(f"download 0/{len(todo)} shards", unit="B", stream=stream)
    done = 0
    errors, offline = [], []
    with ThreadPoolExecutor(max(1, min(settings.workers, len(todo)))) as pool:
        futures = {pool.submit(fetch_one, url, dest, settings, sleep, bar.update, log): url for url, dest in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
                done += 1
                bar.label = f"download {done}/{len(todo)} shards"
                bar.update(0)
            except OfflineError as e:
                offline.append(e)
            except DownloadError as e:
                errors.append(str(e))
    bar.close()
    if offline:
        raise offline[0]
    if errors:
        raise DownloadError(f"{len(errors)} of {len(todo)} shard(s) failed; {errors[0]}")
    return paths
