"""Carry a winner from another branch onto the current train.py as a candidate commit.

    result = transplant(repo, "mar5-h100")                    # that branch's deltas, committed
    result = transplant(repo, "mar5-h100", keys=["DEPTH"])    # only these constants
    result = transplant(repo, "mar5-h100", commit=False)      # write train.py, leave it uncommitted

The deltas are what the other branch changed between its baseline and its best kept commit
(so this branch's own improvements to other constants survive). With `keys`, exactly those
constants take the other branch's best values. Constants the current train.py does not define
are refused: the current backend does not know them. Only train.py is written and committed;
`mlx-ar run` then scores the candidate.
"""
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write
from .analysis import _ABSENT, _same, branch_delta, summarize, unranked_reason
from .branches import MUTABLE_FILE, CompareError, read_branch, recipe_reader, resolve_branch
from ..recipe import RecipeError, apply_recipe, parse_recipe


class TransplantError(CompareError):
    """The transplant cannot be done; nothing was written."""


@dataclass
class TransplantPlan:
    source: str                 # branch the values come from
    best_commit: str
    best_bpb: float
    device: str | None
    updates: dict               # constant -> new value written to train.py
    already: list = field(default_factory=list)   # constants train.py already has at that value
    refused: list = field(default_factory=list)   # constants train.py does not define
    removed: list = field(default_factory=list)   # constants the source's best no longer defines
    notes: list = field(default_factory=list)

    def message(self) -> str:
        """The candidate's commit message: a one-line summary, then where the values came from."""
        head = f"transplant from {self.source}: " + ", ".join(f"{k}={v!r}" for k, v in self.updates.items())
        body = [f"Recipe values of {self.best_commit[:7]} on {self.source} "
                f"(val_bpb {self.best_bpb:.6f}{', ' + self.device if self.device else ''})."]
        if self.refused:
            body.append(f"Refused (not defined by this train.py): {', '.join(self.refused)}.")
        if self.removed:
            body.append(f"Not carried (removed on {self.source}): {', '.join(self.removed)}.")
        return head + "\n\n" + "\n".join(body) + "\n"


def _like(current, new):
    """Keep the current literal's container type: receipts store tuples as JSON lists."""
    if isinstance(current, tuple) and isinstance(new, list):
        return tuple(new)
    return new


def plan_transplant(summary, current_source: str, keys=None) -> TransplantPlan:
    """Decide which constants of `current_source` take which values from `summary`'s best commit."""
    name = summary.name
    if summary.best_commit is None:
        raise TransplantError(f"{name} has no kept run to transplant from ({unranked_reason(summary)})")
    best = summary.best_recipe
    if best is None:
        raise TransplantError(
            f"cannot read the recipe of {summary.best_commit[:7]} on {name}: its train.py is not in this "
            "repository's objects and its receipt has no recipe (run `mlx-ar compare --fetch` first)"
        )
    try:
        current = parse_recipe(current_source, MUTABLE_FILE)
    except RecipeError as e:
        raise TransplantError(f"cannot read the current recipe: {e}") from None

    notes, removed = [], []
    if keys:
        missing = [k for k in keys if k not in best]
        if missing:
            raise TransplantError(f"{name}'s best commit {summary.best_commit[:7]} defines no {', '.join(missing)}")
        unknown = [k for k in keys if k not in current]
        if unknown:
            raise TransplantError(
                f"{MUTABLE_FILE} here does not define {', '.join(unknown)}: the current backend does not know "
                "them, so they cannot be transplanted; nothing was changed"
            )
        wanted = {k: best[k] for k in keys}
    elif summary.baseline_recipe is not None:
        delta = branch_delta(summary)
        wanted = {k: new for k, (_old, new) in delta.items() if new is not _ABSENT}
        removed = [k for k, (_old, new) in delta.items() if new is _ABSENT]
    else:
        notes.append(f"{name}'s baseline recipe is unknown; deltas taken against the current {MUTABLE_FILE}")
        wanted = {k: v for k, v in best.items() if k not in current or not _same(current[k], v)}

    refused = [k for k in wanted if k not in current]
    already = [k for k in wanted if k in current and _same(current[k], wanted[k])]
    updates = {k: _like(current[k], v) for k, v in wanted.items() if k in current and k not in already}
    plan = TransplantPlan(name, summary.best_commit, summary.best_bpb, summary.device, updates,
                          already, refused, removed, notes)
    if not updates:
        why = []
        if not wanted:
            why.append(f"{name}'s best commit changed no recipe constant from its baseline")
        if already:
            why.append(f"{MUTABLE_FILE} already has {name}'s values for {', '.join(already)}")
        if refused:
            why.append(f"{', '.join(refused)} not defined by this {MUTABLE_FILE} (the current backend does not know them)")
        raise TransplantError("nothing to transplant: " + "; ".join(why))
    return plan


@dataclass
class TransplantResult:
    plan: TransplantPlan
    path: Path
    commit: str | None  # the candidate commit, None with commit=False


def transplant(repo, branch: str, keys=None, commit: bool = True) -> TransplantResult:
    """Apply `branch`'s best recipe deltas to the working tree's train.py (and commit only it)."""
    path = Path(repo.working_tree_dir) / MUTABLE_FILE
    if not path.exists():
        raise TransplantError(f"no {MUTABLE_FILE} at {path.parent}; run this in your autoresearch checkout")
    if repo.git.status("--porcelain", "--", MUTABLE_FILE).strip():
        raise TransplantError(
            f"{MUTABLE_FILE} has uncommitted changes; commit them (`mlx-ar run`) or revert them first, "
            "so the transplant does not mix with other edits"
        )
    if commit and repo.head.is_detached:
        raise TransplantError("HEAD is detached; check out the experiment branch to transplant into")
    ref = resolve_branch(repo, branch)
    if not repo.head.is_detached and ref.ref == f"refs/heads/{repo.active_branch.name}":
        raise TransplantError(f"you are on {ref.name} itself; check out the branch to transplant into")

    summary = summarize(read_branch(repo, ref), recipe_reader(repo))
    source = path.read_text()
    plan = plan_transplant(summary, source, list(dict.fromkeys(keys)) if keys else None)
    try:
        new_source = apply_recipe(source, plan.updates, MUTABLE_FILE)
    except RecipeError as e:
        raise TransplantError(f"cannot rewrite {MUTABLE_FILE}: {e}") from None
    atomic_write(path, new_source)
    sha = None
    if commit:
        import git

        try:
            # A pathspec commit records only train.py, whatever else is staged in the shared index.
            repo.git.commit("-m", plan.message(), "--", MUTABLE_FILE)
        except git.GitCommandError as e:
            atomic_write(path, source)  # put the old train.py back: a failed transplant changes nothing
            raise TransplantError(f"git commit failed, {MUTABLE_FILE} restored: {(e.stderr or str(e)).strip()}") from None
        sha = repo.head.commit.hexsha
    return TransplantResult(plan, path, sha)
