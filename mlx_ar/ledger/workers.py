"""Parallel workers: one git worktree per worker, all writing one shared ledger.

`mlx-ar workers N` (run in the main checkout, on the experiment branch) creates worktrees
w1..wN next to the repository (`<repo>-workers/w<i>`), each on its own branch
`<branch>-w<i>` starting at the current champion. An agent (or a person) then runs
`mlx-ar run -m ...` inside a worktree exactly as in the main checkout; the loop notices the
worker's metadata and:

* writes rows, receipts and ledger commits to the main checkout's ledger (on its branch),
  under the fcntl lock in the shared git directory, so concurrent workers never lose a row;
* judges every candidate against the global champion (the best kept receipt of any worker),
  never against whichever worker finished last, and after a discard moves the worker's
  train.py to that champion (a "ledger: adopt champion" commit on the worker branch);
* runs train.py with the worker's own runs/ directory (unique logs and checkpoints) and, on
  the cuda backend, `CUDA_VISIBLE_DEVICES` set to the worker's GPU.

The metadata lives in the worktree's private git directory (`.git/worktrees/w<i>/`), so
it never shows up as a change in the working tree; context.py reads it.

    infos = setup_workers(root, 4, backend="cuda")
    meta = worker_meta(repo)     # None in the main checkout
"""
import json
from dataclasses import dataclass
from pathlib import Path

from ..atomic import atomic_write
from . import git_ops
from .campaign import load_campaign
from .context import META_FILE, WorkerError, open_context, worker_meta
from .ratchet import sync_to_champion


@dataclass
class WorkerInfo:
    name: str
    path: Path
    branch: str
    created: bool
    synced: bool
    note: str = ""


def default_workers_dir(root) -> Path:
    root = Path(root).resolve()
    return root.parent / f"{root.name}-workers"


def setup_workers(root, n: int, *, workers_dir=None, gpus: list | None = None, campaign=None,
                  echo=print) -> list[WorkerInfo]:
    """Create (or refresh) worktrees w1..wN of the main checkout at `root`.

    An existing worker whose mutable surface is clean is moved to the global champion;
    one with an edit in progress is left alone (its next `mlx-ar run` judges the edit).
    `gpus[i]` is worker i+1's CUDA device (default: i).
    """
    if n < 1:
        raise WorkerError(f"the number of workers must be at least 1, got {n}")
    root = Path(root).resolve()
    repo = git_ops.open_repo(root)
    if worker_meta(repo) is not None:
        raise WorkerError(f"{root} is itself a worker; run `mlx-ar workers` in the main checkout")
    branch = git_ops.branch_name(repo)
    campaign = campaign or load_campaign(root)
    workers_dir = Path(workers_dir).resolve() if workers_dir else default_workers_dir(root)
    if workers_dir == root or root in workers_dir.parents:
        raise WorkerError(f"the workers directory {workers_dir} must be outside the repository {root}")
    gpus = list(gpus) if gpus is not None else list(range(n))
    if len(gpus) < n:
        raise WorkerError(f"{n} workers need {n} GPU ids, got {len(gpus)}")
    existing = {p.resolve() for p in git_ops.worktree_paths(repo)}
    infos = []
    for i in range(1, n + 1):
        name = f"w{i}"
        path = workers_dir / name
        wbranch = f"{branch}-{name}"
        created = False
        if path.resolve() not in existing:
            if path.exists():
                raise WorkerError(f"{path} exists but is not a worktree of {root}; move it away and re-run")
            if wbranch in git_ops.branches(repo):
                raise WorkerError(f"branch {wbranch} already exists without a worktree; delete it "
                                  f"(git branch -D {wbranch}) or pick another branch")
            workers_dir.mkdir(parents=True, exist_ok=True)
            git_ops.add_worktree(repo, path, wbranch, git_ops.head_sha(repo))
            created = True
            echo(f"created worker {name}: {path} on branch {wbranch}")
        wrepo = git_ops.open_repo(path)
        meta = {"worker": name, "ledger_root": str(root), "ledger_branch": branch, "gpu": gpus[i - 1]}
        atomic_write(Path(wrepo.git_dir) / META_FILE, json.dumps(meta, indent=2) + "\n")
        ctx = open_context(path)
        synced, note = sync_to_champion(ctx, campaign)
        infos.append(WorkerInfo(name, path, git_ops.branch_name(wrepo), created, synced, note))
    return infos
