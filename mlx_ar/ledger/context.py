"""Where one loop command works, and how it survives signals.

`open_context(root)` finds the working tree, its branch and the ledger it writes to: the
checkout's own, or (in a worker's worktree, see workers.py) the main checkout's. The worker
metadata is read here, so the loop never has to import the module that creates workers.

`shielded()` defers SIGINT, SIGTERM and SIGHUP while the ledger is written: a terminal's
Ctrl-C, a supervisor's stop and a closed terminal all reach the loop the same way, and none
of them may cut a receipt, a row or a branch move in half.
"""
import json
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import git_ops
from .ledger import Ledger

EXIT_CODES = {"keep": 0, "discard": 0, "crash": 1, "refused": 2}
EXIT_INTERRUPTED = 130
# The signals that stop the loop the way Ctrl-C does (recorded, restored, exit 130).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
META_FILE = "mlx-ar-worker.json"


class LoopError(RuntimeError):
    """The loop cannot start (bad repository state, no champion to measure, ...)."""


class WorkerError(RuntimeError):
    """Workers cannot be set up or read (the message says why and what to do)."""


class Interrupted(Exception):
    """A stop signal ended the loop after it recorded the attempt; exit with 130."""

    def __init__(self, result):
        super().__init__("interrupted")
        self.result = result


@dataclass
class Context:
    root: Path                 # this working tree (main checkout or a worker's worktree)
    repo: object
    branch: str
    worker: str                # "main" or "w1", "w2", ...
    ledger: Ledger
    ledger_repo: object        # the repository whose branch carries the ledger commits
    ledger_branch: str
    meta: dict | None = None


def worker_meta(repo) -> dict | None:
    """This worktree's worker metadata, or None for the main checkout / a plain worktree."""
    p = Path(repo.git_dir) / META_FILE
    if not p.exists():
        return None
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise WorkerError(f"{p} is unreadable ({e}); re-create the worker with `mlx-ar workers`") from None
    for key in ("worker", "ledger_root", "ledger_branch"):
        if key not in meta:
            raise WorkerError(f"{p} lacks {key!r}; re-create the worker with `mlx-ar workers`")
    return meta


def worker_env(meta: dict | None, backend: str) -> dict:
    """Extra environment for the worker's training child (its own GPU on cuda)."""
    if meta and backend == "cuda" and meta.get("gpu") is not None:
        return {"CUDA_VISIBLE_DEVICES": str(meta["gpu"])}
    return {}


def open_context(root) -> Context:
    root = Path(root).resolve()
    repo = git_ops.open_repo(root)
    branch = git_ops.branch_name(repo)
    state = git_ops.common_dir(repo) / "mlx-ar"
    meta = worker_meta(repo)
    if meta is None:
        return Context(root, repo, branch, "main", Ledger(root, state), repo, branch)
    ledger_root = Path(meta["ledger_root"])
    ledger_repo = git_ops.open_repo(ledger_root)
    if git_ops.branch_name(ledger_repo) != meta["ledger_branch"]:
        raise LoopError(f"the shared ledger lives on branch {meta['ledger_branch']} in {ledger_root}, "
                        f"but that checkout is on {git_ops.branch_name(ledger_repo)}; check it out again")
    return Context(root, repo, branch, meta["worker"], Ledger(ledger_root, state), ledger_repo,
                   meta["ledger_branch"], meta)


@contextmanager
def shielded():
    """Defer the stop signals while the ledger is written, so bookkeeping is never cut in half.

    Yields a list that holds the deferred signal numbers; the caller decides what to do with
    them once the writes are done (re-raise, or exit 130 after reporting).
    """
    pending = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    old = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in old:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def stop_signals_interrupt() -> None:
    """Make every stop signal raise KeyboardInterrupt (main thread only).

    SIGINT too: a shell that starts a job in the background leaves SIGINT ignored.
    """
    def handler(signum, frame):
        raise KeyboardInterrupt
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
