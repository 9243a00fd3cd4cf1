"""The git side of the ratchet, through plain `git` subprocesses.

Commits are built from explicit file contents on top of an explicit parent with a temporary
index, and branches move with compare-and-swap `update-ref`; nothing here ever stages "all
changes", checks out over user files or resets a working tree. Only the paths the loop owns
(the mutable surface and the ledger files) are ever written, and their index entries are
brought in line with the new HEAD afterwards so `git status` stays truthful.

Every git call is a short-lived process in a session of its own: a terminal's Ctrl-C (or a
closed terminal's SIGHUP) goes to the whole foreground process group, and a git helper in that
group would die in the middle of the loop's bookkeeping. Nothing here keeps a persistent
`git cat-file` helper (as GitPython does), so after a signal every call still works.

    repo = open_repo(root)
    files = read_worktree(root, ["train.py"])           # {"train.py": b"..."}
    sha = make_commit(repo, parent=head_sha(repo), files=files, message="wider MLP")
    move_branch(repo, branch_name(repo), sha, expected=parent)
    sync_index(repo, ["train.py"])
"""
import difflib
import hashlib
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .format import LEDGER_COMMIT_PREFIX
from ..atomic import atomic_write

ATTEMPT_REF = "refs/mlx-ar/attempts"


class GitError(RuntimeError):
    """A git precondition failed (the message says what to do)."""


@dataclass(frozen=True)
class Repo:
    """A git working tree: its root, its own git dir and the git dir shared by all worktrees."""

    working_tree_dir: str
    git_dir: str
    common_dir: str


def _run(args, cwd, env=None, input_bytes=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, LC_ALL="C", LANGUAGE="C")
    full_env.update(env or {})
    return subprocess.run(["git", *args], cwd=cwd, env=full_env, input=input_bytes, capture_output=True,
                          start_new_session=True)


def open_repo(root) -> Repo:
    """The repository whose working-tree root is `root` (a main checkout or a worktree)."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise GitError(f"{root} is not a git repository (run mlx-ar from the repository root)")
    p = _run(["rev-parse", "--show-toplevel", "--absolute-git-dir", "--git-common-dir"], root)
    if p.returncode:
        raise GitError(f"{root} is not a git repository (run mlx-ar from the repository root)")
    lines = p.stdout.decode().splitlines()
    if len(lines) < 3:  # a bare repository has no top level
        raise GitError(f"{root} is not the root of a git working tree (run mlx-ar from the repository root)")
    top, git_dir, common = lines[:3]
    if Path(top).resolve() != root:
        raise GitError(f"{root} is not the root of a git working tree (run mlx-ar from the repository root, {top})")
    common_path = Path(common) if Path(common).is_absolute() else root / common
    return Repo(str(root), git_dir, str(common_path.resolve()))


def common_dir(repo) -> Path:
    """The .git directory shared by all worktrees (where locks and counters live)."""
    return Path(repo.common_dir).resolve()


def branch_name(repo) -> str:
    p = _run(["symbolic-ref", "--quiet", "--short", "HEAD"], repo.working_tree_dir)
    if p.returncode:
        raise GitError("HEAD is detached; check out the experiment branch first "
                       "(git checkout -b autoresearch/<tag>-<machine>)")
    return p.stdout.decode().strip()


def branches(repo) -> list[str]:
    """Local branch names."""
    return _git(repo, "for-each-ref", "--format=%(refname:short)", "refs/heads/").splitlines()


def head_sha(repo) -> str:
    p = _run(["rev-parse", "--verify", "--quiet", "HEAD^{commit}"], repo.working_tree_dir)
    if p.returncode:
        raise GitError("the repository has no commits yet; commit train.py first")
    return p.stdout.decode().strip()


def is_ledger_message(message: str) -> bool:
    return message.startswith(LEDGER_COMMIT_PREFIX)


def commit_info(repo, rev: str) -> dict:
    out = _git(repo, "log", "-1", "--format=%H%n%P%n%B", rev, "--", strip=False)
    sha, parents, message = (out.split("\n", 2) + ["", ""])[:3]
    return {"sha": sha, "message": message.rstrip("\n") + "\n" if message.strip() else "",
            "parents": parents.split()}


def is_ancestor(repo, a: str, b: str) -> bool:
    """Whether commit `a` is `b` or one of its ancestors."""
    return _run(["merge-base", "--is-ancestor", a, b], repo.working_tree_dir).returncode == 0


# --- reading files -----------------------------------------------------------------------------
def read_worktree(root, paths) -> dict:
    """{path: bytes, or None when the file does not exist} in the working tree."""
    out = {}
    for p in paths:
        f = Path(root) / p
        out[p] = f.read_bytes() if f.is_file() else None
    return out


def read_commit(repo, rev: str, paths) -> dict:
    """{path: bytes, or None when absent} at commit `rev`."""
    out = {}
    for p in paths:
        entry = _tree_entry(repo, rev, p)
        if entry is None or entry[1] != "blob":
            out[p] = None
            continue
        proc = _run(["cat-file", "blob", entry[2]], repo.working_tree_dir)
        if proc.returncode:
            raise GitError(f"git cat-file blob {entry[2][:12]} failed: {proc.stderr.decode(errors='replace').strip()}")
        out[p] = proc.stdout
    return out


def surface_sha(files: dict) -> str:
    """Content hash of a mutable surface: identical files give the identical hash."""
    h = hashlib.sha256()
    for path in sorted(files):
        data = files[path]
        h.update(path.encode() + b"\0")
        h.update(b"-" if data is None else hashlib.sha256(data).hexdigest().encode())
        h.update(b"\n")
    return h.hexdigest()


def diff_text(old: dict, new: dict) -> str:
    """Unified diff of two {path: bytes|None} snapshots (what a receipt records)."""
    parts = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        a_lines = (a or b"").decode(errors="replace").splitlines(keepends=True)
        b_lines = (b or b"").decode(errors="replace").splitlines(keepends=True)
        parts.extend(difflib.unified_diff(a_lines, b_lines, f"a/{path}" if a is not None else "/dev/null",
                                          f"b/{path}" if b is not None else "/dev/null"))
    return "".join(line if line.endswith("\n") else line + "\n" for line in parts)


def changed_paths(repo, a: str, b: str) -> list[str]:
    """Paths that differ between commits `a` and `b`."""
    return _git(repo, "diff", "--name-only", a, b).splitlines()


# --- status ----------------------------------------------------------------------------------
def status_paths(repo) -> list[str]:
    """Paths that differ from HEAD in the index or the working tree, untracked files included
    (ignored files are not listed)."""
    out = _git(repo, "status", "--porcelain=v1", "-z", "--untracked-files=all", strip=False)
    entries = out.split("\0")
    paths, i = [], 0
    while i < len(entries):
        e = entries[i]
        i += 1
        if len(e) < 4:
            continue
        code, path = e[:2], e[3:]
        paths.append(path)
        if "R" in code or "C" in code:  # renames carry the old path as the next entry
            if i < len(entries) and entries[i]:
                paths.append(entries[i])
            i += 1
    return paths


# --- writing ---------------------------------------------------------------------------------
def _git(repo, *args, env=None, input_bytes=None, strip=True) -> str:
    """Run a git command in the working tree; raise GitError with git's own message."""
    p = _run(args, repo.working_tree_dir, env=env, input_bytes=input_bytes)
    if p.returncode:
        raise GitError(f"git {' '.join(args[:3])} failed: {p.stderr.decode(errors='replace').strip()}")
    out = p.stdout.decode(errors="replace")
    return out.strip() if strip else out


def _tree_entry(repo, rev: str, path: str):
    """(mode, type, sha) of `path` in `rev`, or None."""
    out = _git(repo, "ls-tree", rev, "--", path)
    if not out:
        return None
    meta = out.split("\t", 1)[0].split()
    return meta[0], meta[1], meta[2]


def make_commit(repo, *, parent: str, files: dict, message: str) -> str:
    """A new commit = `parent`'s tree with `files` ({path: bytes or None to delete}) applied.

    Neither the branch, the real index nor the working tree changes; the commit's sha is
    returned (keep it reachable with a ref or by moving a branch to it).
    """
    tmp_index = Path(repo.git_dir) / f"mlx-ar-index.{os.getpid()}.tmp"
    env = {"GIT_INDEX_FILE": str(tmp_index)}
    try:
        _git(repo, "read-tree", parent, env=env)
        for path, data in sorted(files.items()):
            if data is None:
                _git(repo, "update-index", "--force-remove", "--", path, env=env)
                continue
            blob = _git(repo, "hash-object", "-w", "--stdin", input_bytes=data)
            entry = _tree_entry(repo, parent, path)
            mode = entry[0] if entry and entry[0].startswith("100") else "100644"
            _git(repo, "update-index", "--add", "--cacheinfo", f"{mode},{blob},{path}", env=env)
        tree = _git(repo, "write-tree", env=env)
        return _git(repo, "commit-tree", tree, "-p", parent, "-m", message)
    finally:
        if tmp_index.exists():
            tmp_index.unlink()


def move_branch(repo, branch: str, new: str, expected: str, reason: str = "mlx-ar") -> None:
    """Point `branch` at `new`, only if it still points at `expected` (compare-and-swap)."""
    try:
        _git(repo, "update-ref", "-m", reason, f"refs/heads/{branch}", new, expected)
    except GitError as e:
        raise GitError(f"branch {branch} moved while mlx-ar was working (expected {expected[:7]}); "
                       f"nothing was lost, re-run the command ({e})") from None


def sync_index(repo, paths) -> None:
    """Make the index entries of `paths` equal HEAD's (other staged changes stay as they are)."""
    head = head_sha(repo)
    for path in paths:
        entry = _tree_entry(repo, head, path)
        if entry is None:
            _git(repo, "update-index", "--force-remove", "--", path)
        else:
            _git(repo, "update-index", "--add", "--cacheinfo", f"{entry[0]},{entry[2]},{path}")


def write_worktree(root, files: dict) -> None:
    """Write (atomically) or delete files in the working tree."""
    for path, data in files.items():
        f = Path(root) / path
        if data is None:
            if f.exists():
                f.unlink()
        else:
            atomic_write(f, data)


def set_ref(repo, name: str, sha: str) -> None:
    _git(repo, "update-ref", name, sha)


def attempt_ref(seq: int) -> str:
    """Where a candidate commit stays reachable after its branch moved on (discards, crashes)."""
    return f"{ATTEMPT_REF}/{int(seq):05d}"


def commit_on_branch(repo, *, branch: str, files: dict, message: str, write_files: bool = True) -> str:
    """Commit `files` on top of the branch tip and move the branch there (CAS), then sync the index.

    With write_files the working tree gets the same contents first (they usually already have them).
    """
    tip = head_sha(repo)
    if write_files:
        write_worktree(repo.working_tree_dir, {p: d for p, d in files.items()})
    sha = make_commit(repo, parent=tip, files=files, message=message)
    move_branch(repo, branch, sha, tip, reason=message.splitlines()[0][:60])
    sync_index(repo, list(files))
    return sha


def add_worktree(repo, path, branch: str, start: str) -> None:
    _git(repo, "worktree", "add", "-b", branch, str(path), start)


def worktree_paths(repo) -> list[Path]:
    out = _git(repo, "worktree", "list", "--porcelain")
    return [Path(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("worktree ")]


def exclude_paths(root, paths) -> list[str]:
    """Add files a tool wrote inside the working tree at `root` to .git/info/exclude.

    Such files then never show in `git status`, so they never make `mlx-ar run` refuse; files
    outside the tree, and paths git ignores already, are left alone. Returns the added entries.
    """
    root = Path(root).resolve()
    rel = []
    for p in paths:
        try:
            rel.append(Path(p).resolve().relative_to(root).as_posix())
        except ValueError:
            continue  # outside the working tree
    if not rel:
        return []
    ignored = set(_run(["check-ignore", "--no-index", "--", *rel], root).stdout.decode().split("\n"))
    todo = [r for r in rel if r not in ignored]
    if not todo:
        return []
    exclude = Path(_run(["rev-parse", "--git-path", "info/exclude"], root).stdout.decode().strip())
    exclude = exclude if exclude.is_absolute() else root / exclude
    have = exclude.read_text().splitlines() if exclude.exists() else []
    added = [f"/{r}" for r in todo if f"/{r}" not in have]
    if added:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        text = "\n".join(have + ["# written by mlx-ar (never part of an experiment)", *added]) + "\n"
        atomic_write(exclude, text)
    return added
