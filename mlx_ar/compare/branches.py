"""Find experiment branches and read their ledgers from git objects, without a checkout.

    repo = open_repo(".")
    fetch_remotes(repo, echo=print)                # optional: refresh remote-tracking branches
    for ref in list_branches(repo):                # autoresearch/* local + remote-tracking
        ledger = read_branch(repo, ref)            # BranchLedger: attempts in order, noise floor
    ref = resolve_branch(repo, "mar5-h100")        # a name the user typed -> BranchRef

Every receipt of a branch becomes an Attempt. A branch that carries only an upstream-style
results.tsv (no receipts directory) is read from its rows instead, so plain autoresearch runs
can be compared too; rows carry less (no recipe, no contract parts), which is said in notes.
"""
import json
import math
import statistics
from dataclasses import dataclass, field
from typing import NamedTuple

from ..ledger.format import NOISE_FILE, RECEIPTS_DIR, RESULTS_FILE, SCORED, parse_receipt, parse_results
from ..recipe import RecipeError, parse_recipe

BRANCH_PREFIX = "autoresearch/"
MUTABLE_FILE = "train.py"


class CompareError(Exception):
    """A user-facing problem: not a repository, unknown branch, failed fetch, bad transplant."""


# --- data model --------------------------------------------------------------------------------


def _finite(x):
    """float(x) if it is a finite number, else None (metrics may be null, '' or 'nan')."""
    if isinstance(x, bool) or x is None or x == "":
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


@dataclass
class Attempt:
    """One run recorded on a branch (one receipt, or one results.tsv row)."""

    seq: int
    status: str
    commit: str | None
    description: str = ""
    metrics: dict = field(default_factory=dict)
    recipe: dict | None = None
    contract: str | None = None
    contract_parts: dict | None = None
    backend: str | None = None
    device: str | None = None
    machine: str | None = None
    seed: int | None = None
    smoke: bool = False
    n_runs: int = 1  # seed runs behind the metrics (the significance gate re-runs candidates)

    def metric(self, name):
        return _finite(self.metrics.get(name))

    @property
    def val_bpb(self):
        v = self.metric("val_bpb")
        # Upstream writes 0.000000 for crashed runs; a real bpb is never zero.
        return v if v is not None and v > 0 else None

    @property
    def scored(self) -> bool:
        return self.status in SCORED and self.val_bpb is not None and not self.smoke

    def under(self, contract) -> bool:
        """Measured under `contract` (an unknown contract on either side counts as the same)."""
        return contract is None or self.contract is None or self.contract == contract

    @classmethod
    def from_receipt(cls, data: dict, fallback_seq: int) -> "Attempt":
        seq = data.get("seq")
        recipe = data.get("recipe")
        parts = data.get("contract_parts")
        runs = data.get("runs")
        ok_runs = sum(1 for r in runs if isinstance(r, dict) and r.get("status") == "ok") if isinstance(runs, list) else 0
        return cls(
            seq=seq if isinstance(seq, int) else fallback_seq,
            status=str(data.get("status") or "unknown"),
            commit=data.get("commit") or None,
            description=str(data.get("description") or ""),
            metrics=data.get("metrics") if isinstance(data.get("metrics"), dict) else {},
            recipe=recipe if isinstance(recipe, dict) else None,
            contract=data.get("contract") or None,
            contract_parts=parts if isinstance(parts, dict) else None,
            backend=data.get("backend") or None,
            device=data.get("device") or None,
            machine=data.get("machine") or None,
            seed=data.get("seed"),
            smoke=bool(data.get("smoke")),
            n_runs=max(ok_runs, 1),
        )

    @classmethod
    def from_row(cls, row: dict, seq: int) -> "Attempt":
        mem_gb = _finite(row.get("memory_gb"))
        metrics = {
            "val_bpb": _finite(row.get("val_bpb")),
            "peak_vram_mb": None if mem_gb is None else mem_gb * 1024,
            "tok_per_sec": _finite(row.get("tok_per_sec")),
            "num_steps": _finite(row.get("num_steps")),
        }
        seed, n_runs = row.get("seed"), row.get("n_runs", "")
        return cls(
            seq=seq,
            status=row.get("status") or "unknown",
            commit=row.get("commit") or None,
            description=row.get("description", ""),
            metrics=metrics,
            contract=row.get("contract") or None,
            backend=row.get("backend") or None,
            device=row.get("device") or None,
            seed=int(seed) if str(seed).isdigit() else None,
            n_runs=max(int(n_runs), 1) if str(n_runs).isdigit() else 1,
        )


class BranchRef(NamedTuple):
    name: str  # as shown: "autoresearch/mar5-m4max" or "origin/autoresearch/mar5-h100"
    ref: str   # full ref: "refs/heads/..." or "refs/remotes/..."
    sha: str   # tip commit


@dataclass
class BranchLedger:
    """What one branch's tip says about its campaign."""

    name: str
    ref: str
    tip: str
    attempts: list
    noise: dict | None = None
    source: str = "receipts"  # "receipts", "results.tsv" or "none"
    notes: list = field(default_factory=list)

    @property
    def short(self) -> str:
        """The name without the autoresearch/ prefix, for narrow table columns and legends."""
        return self.name.replace(BRANCH_PREFIX, "", 1)

    @property
    def noise_floor(self):
        """val_bpb seed noise (a standard deviation) from noise.json, or None.

        Read defensively: the "floor" `mlx-ar noise` writes, else the standard deviation of the
        measured "samples"; a measurement of another objective does not count.
        """
        noise = self.noise or {}
        if noise.get("objective", "val_bpb") != "val_bpb":
            return None
        floor = _finite(noise.get("floor"))
        if floor is not None:
            return floor
        samples = [v for v in map(_finite, noise.get("samples") or []) if v is not None]
        return statistics.stdev(samples) if len(samples) >= 2 else None


# --- the repository ----------------------------------------------------------------------------


def open_repo(path="."):
    import git

    try:
        return git.Repo(path, search_parent_directories=True)
    except (git.InvalidGitRepositoryError, git.NoSuchPathError):
        raise CompareError(
            f"{path} is not inside a git repository; run this in your autoresearch checkout or pass --repo"
        ) from None


def fetch_remotes(repo, echo=lambda msg: None):
    """`git fetch` every remote so remote-tracking autoresearch/* branches are current."""
    import git

    if not repo.remotes:
        echo("no git remotes to fetch (add one with `git remote add NAME URL`)")
        return
    for remote in repo.remotes:
        echo(f"fetching {remote.name} ...")
        try:
            repo.git.fetch(remote.name)
        except git.GitCommandError as e:
            raise CompareError(f"git fetch {remote.name} failed: {(e.stderr or str(e)).strip()}") from None


def _remote_names(repo):
    # Longest first so a remote named "a/b" wins over "a" when splitting a ref.
    return sorted((r.name for r in repo.remotes), key=len, reverse=True)


def list_branches(repo) -> list:
    """autoresearch/* branches, local first, then remote-tracking ones.

    A remote-tracking branch that points at the same commit as the local branch of the same
    name is the same campaign and is listed once (as the local branch).
    """
    out = repo.git.for_each_ref("--format=%(refname) %(objectname)", "refs/heads/", "refs/remotes/")
    local, remote = {}, []
    remotes = _remote_names(repo)
    for line in out.splitlines():
        ref, sha = line.rsplit(" ", 1)
        if ref.startswith("refs/heads/" + BRANCH_PREFIX):
            local[ref[len("refs/heads/"):]] = BranchRef(ref[len("refs/heads/"):], ref, sha)
        elif ref.startswith("refs/remotes/"):
            rest = ref[len("refs/remotes/"):]
            for r in remotes:
                if rest.startswith(r + "/" + BRANCH_PREFIX):
                    remote.append((rest[len(r) + 1:], BranchRef(rest, ref, sha)))
                    break
    branches = sorted(local.values())
    for head, br in sorted(remote, key=lambda x: x[1]):
        if head in local and local[head].sha == br.sha:
            continue
        branches.append(br)
    return branches


def resolve_branch(repo, name: str) -> BranchRef:
    """A branch the user named: full ref, local or remote-tracking name, or the bare <tag>-<machine>."""
    candidates = [name, f"refs/heads/{name}", f"refs/remotes/{name}"]
    if not name.startswith(BRANCH_PREFIX) and "/" not in name:
        candidates += [f"refs/heads/{BRANCH_PREFIX}{name}"]
        candidates += [f"refs/remotes/{r}/{BRANCH_PREFIX}{name}" for r in _remote_names(repo)]
    for cand in candidates:
        if not cand.startswith("refs/"):
            continue
        sha = repo.git.rev_parse("--verify", "--quiet", cand + "^{commit}", with_exceptions=False)
        if sha:
            shown = cand.split("/", 2)[2]
            return BranchRef(shown, cand, sha.strip())
    known = ", ".join(b.name for b in list_branches(repo)) or "none"
    raise CompareError(
        f"no branch named {name!r} (autoresearch branches here: {known}; "
        "`mlx-ar compare --fetch` fetches the remotes' branches)"
    )


# --- reading a branch through git objects ------------------------------------------------------


def _read_text(tree, path):
    try:
        obj = tree / path
    except KeyError:
        return None
    if obj.type != "blob":
        return None
    return obj.data_stream.read().decode("utf-8", errors="replace")


def read_branch(repo, ref: BranchRef) -> BranchLedger:
    """The ledger at the tip of `ref`: receipts (or results.tsv rows) in order, noise floor."""
    tree = repo.commit(ref.sha).tree
    ledger = BranchLedger(ref.name, ref.ref, ref.sha, attempts=[], source="none")

    try:
        receipts_tree = tree / RECEIPTS_DIR
    except KeyError:
        receipts_tree = None
    if receipts_tree is not None and receipts_tree.type == "tree":
        for blob in sorted(receipts_tree.blobs, key=lambda b: b.name):
            if not blob.name.endswith(".json"):
                continue
            prefix = blob.name.split("-", 1)[0]
            fallback = int(prefix) if prefix.isdigit() else len(ledger.attempts) + 1
            try:
                data = parse_receipt(blob.data_stream.read().decode("utf-8"))
                if not isinstance(data, dict):
                    raise ValueError("not a JSON object")
            except (ValueError, UnicodeDecodeError, AttributeError) as e:
                ledger.notes.append(f"{RECEIPTS_DIR}/{blob.name} unreadable, skipped: {e}")
                continue
            ledger.attempts.append(Attempt.from_receipt(data, fallback))
        ledger.attempts.sort(key=lambda a: a.seq)
        if ledger.attempts:
            ledger.source = "receipts"

    rows_text = _read_text(tree, RESULTS_FILE)
    rows = parse_results(rows_text) if rows_text else []
    if not ledger.attempts and rows:
        ledger.attempts = [Attempt.from_row(row, i + 1) for i, row in enumerate(rows)]
        ledger.source = RESULTS_FILE
        ledger.notes.append(f"no receipts; read {len(rows)} rows of {RESULTS_FILE} (no recipes or contract parts)")
    elif len(rows) > len(ledger.attempts):
        ledger.notes.append(
            f"{RESULTS_FILE} has {len(rows)} rows but only {len(ledger.attempts)} readable receipts"
        )

    noise_text = _read_text(tree, NOISE_FILE)
    if noise_text is not None:
        try:
            noise = json.loads(noise_text)
            if not isinstance(noise, dict):
                raise ValueError("not a JSON object")
            ledger.noise = noise
        except ValueError as e:
            ledger.notes.append(f"{NOISE_FILE} unreadable, ignored: {e}")
    return ledger


def recipe_reader(repo):
    """A function commit -> recipe dict of train.py at that commit (None if unavailable)."""
    import git

    cache = {}

    def recipe_at(commit):
        if not commit:
            return None
        if commit not in cache:
            try:
                text = _read_text(repo.commit(commit).tree, MUTABLE_FILE)
                cache[commit] = parse_recipe(text, MUTABLE_FILE) if text is not None else None
            except (ValueError, RecipeError, git.BadName, git.BadObject):
                cache[commit] = None
        return cache[commit]

    return recipe_at
