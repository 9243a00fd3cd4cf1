"""What each branch found, and what the branches agree on: plain data, no git, no printing.

    summaries = [summarize(ledger, recipe_at) for ledger in ledgers]
    groups, unranked = group_by_contract(summaries)   # never rank different contracts together
    contract_differences(groups)                      # which contract ingredient differs
    recipe_table(summaries)                           # constants at each branch's best commit
    classify_changes(summaries)                       # universal / hardware-specific / conflicting

Scoring rules (shared by the table, the plot and transplant):
- only keep/discard runs with a finite val_bpb count; smoke runs and runs under a contract other
  than the branch's (the contract of its latest kept run) are left out and said so in notes;
- an experiment is one commit; its status is that of its last attempt; its score is the mean
  val_bpb of its scored attempts, weighted by their seed runs (a receipt's metrics already
  average its `runs`);
- the baseline is the first kept commit, the best the kept commit with the lowest score
  (ties: the later one, like the ledger's champion).
"""
from dataclasses import asdict, dataclass, field

from ..recipe import ABSENT as _ABSENT, recipe_diff, same_value as _same
from ..ledger.format import machine_name


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


# --- one branch ----------------------------------------------------------------------------------


@dataclass
class BranchSummary:
    name: str
    short: str
    tip: str
    machine: str | None
    device: str | None
    backend: str | None
    contract: str | None
    contract_parts: dict | None
    runs: int                 # receipts (or rows), smoke runs included
    experiments: int          # distinct commits tried (smoke runs excluded)
    keeps: int
    discards: int
    crashes: int
    other: int                # refused, suspect or unknown final status
    smoke_runs: int
    other_contract_runs: int
    baseline_commit: str | None
    baseline_bpb: float | None
    best_commit: str | None
    best_bpb: float | None
    best_runs: int            # how many runs the best commit's score averages
    best_metrics: dict
    noise_floor: float | None
    baseline_recipe: dict | None
    best_recipe: dict | None
    notes: list = field(default_factory=list)

    @property
    def gain(self):
        """Improvement of the best over the baseline (positive is better; bpb is minimised)."""
        if self.best_bpb is None or self.baseline_bpb is None:
            return None
        return self.baseline_bpb - self.best_bpb

    @property
    def machine_label(self) -> str:
        return self.machine or self.short

    def to_json(self) -> dict:
        d = asdict(self)
        d["gain"] = self.gain
        return d


def _latest(attempts, get):
    for a in reversed(attempts):
        v = get(a)
        if v:
            return v
    return None


def _machine(ledger, real) -> str | None:
    """The machine name the branch was given (autoresearch/<tag>-<machine>), not a hostname.

    A receipt's machine wins when the branch name contains it as a word (`mar5-mini-demo`
    ran on `mini`); older receipts hold the computer's hostname, which the name then replaces.
    """
    recorded = _latest(real, lambda a: a.machine) or _latest(ledger.attempts, lambda a: a.machine)
    if recorded and recorded in ledger.name.split("/")[-1].split("-")[1:]:
        return recorded
    return machine_name(ledger.name) or recorded


def summarize(ledger, recipe_at=lambda commit: None) -> BranchSummary:
    """Reduce a BranchLedger to its table row. `recipe_at(commit)` reads train.py at a commit."""
    real = [a for a in ledger.attempts if not a.smoke]
    smoke_runs = len(ledger.attempts) - len(real)
    # The kept trajectory defines the branch; a stray run under another contract must not flip it.
    contract = (_latest(real, lambda a: a.contract if a.scored and a.status == "keep" else None)
                or _latest(real, lambda a: a.contract if a.scored else None)
                or _latest(real, lambda a: a.contract))

    final = {}  # experiment -> status of its last run, in order of first appearance
    for a in real:
        final[a.commit or f"#{a.seq}"] = a.status
    statuses = list(final.values())
    keeps, discards, crashes = (statuses.count(s) for s in ("keep", "discard", "crash"))

    scored = [a for a in real if a.scored and a.under(contract)]
    foreign = [a for a in real if a.scored and not a.under(contract)]
    scores, last = {}, {}  # commit -> [(val_bpb, n_runs)], its last scored attempt
    for a in scored:
        scores.setdefault(a.commit, []).append((a.val_bpb, a.n_runs))
        last[a.commit] = a
    kept = [c for c in scores if c is not None and final.get(c) == "keep"]
    runs = {c: sum(n for _, n in scores[c]) for c in kept}
    mean = {c: sum(v * n for v, n in scores[c]) / runs[c] for c in kept}
    baseline = kept[0] if kept else None
    # Ties go to the later keep, as the ledger's champion does.
    best = min(reversed(kept), key=lambda c: mean[c]) if kept else None

    def recipe_of(commit):
        if commit is None:
            return None
        # train.py at the commit keeps literal types (tuples); receipts went through JSON.
        return recipe_at(commit) or _latest(real, lambda a: a.recipe if a.commit == commit else None)

    notes = list(ledger.notes)
    if smoke_runs:
        notes.append(f"{smoke_runs} smoke run(s) not scored")
    if foreign:
        others = sorted({a.contract for a in foreign})
        notes.append(f"{len(foreign)} scored run(s) under another contract ({', '.join(others)}) left out")
    return BranchSummary(
        name=ledger.name,
        short=ledger.short,
        tip=ledger.tip,
        machine=_machine(ledger, real),
        device=_latest(real, lambda a: a.device) or _latest(ledger.attempts, lambda a: a.device),
        backend=_latest(real, lambda a: a.backend) or _latest(ledger.attempts, lambda a: a.backend),
        contract=contract,
        contract_parts=_latest(real, lambda a: a.contract_parts if a.contract == contract else None),
        runs=len(ledger.attempts),
        experiments=len(final),
        keeps=keeps,
        discards=discards,
        crashes=crashes,
        other=len(statuses) - keeps - discards - crashes,
        smoke_runs=smoke_runs,
        other_contract_runs=len(foreign),
        baseline_commit=baseline,
        baseline_bpb=mean.get(baseline),
        best_commit=best,
        best_bpb=mean.get(best),
        best_runs=runs.get(best, 0),
        best_metrics=dict(last[best].metrics) if best else {},
        noise_floor=ledger.noise_floor,
        baseline_recipe=recipe_of(baseline),
        best_recipe=recipe_of(best),
        notes=notes,
    )


def unranked_reason(s: BranchSummary) -> str:
    if s.runs == 0:
        return "no ledger yet"
    if s.experiments == 0:
        return "only smoke runs"
    if s.crashes == s.experiments:
        return "only crashes"
    return "no kept run with a val_bpb"


# --- contract groups -----------------------------------------------------------------------------


@dataclass
class ContractGroup:
    contract: str | None
    parts: dict | None
    branches: list  # BranchSummary, best val_bpb first


def group_by_contract(summaries):
    """(groups, unranked): branches with a best, grouped by contract and ranked within a group."""
    ranked = [s for s in summaries if s.best_bpb is not None]
    unranked = [s for s in summaries if s.best_bpb is None]
    by_contract = {}
    for s in ranked:
        by_contract.setdefault(s.contract, []).append(s)
    groups = [
        ContractGroup(c, next((s.contract_parts for s in bs if s.contract_parts), None),
                      sorted(bs, key=lambda s: s.best_bpb))
        for c, bs in by_contract.items()
    ]
    groups.sort(key=lambda g: (-len(g.branches), g.branches[0].best_bpb))
    return groups, unranked


def _flatten(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def contract_differences(groups) -> list:
    """For every pair of groups: {"a", "b", "differs": {part: [a_value, b_value]} or None}.

    `differs` is None when either side's receipts carry no contract_parts (the ingredient
    cannot be named), and {} when the parts agree although the fingerprints do not.
    """
    out = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            if a.parts is None or b.parts is None:
                differs = None
            else:
                diff = recipe_diff(_flatten(a.parts), _flatten(b.parts), missing=None)
                differs = {k: list(pair) for k, pair in diff.items()}
            out.append({"a": a.contract, "b": b.contract, "differs": differs})
    return out


# --- recipes across branches ---------------------------------------------------------------------


def recipe_table(summaries) -> list:
    """Constants that differ between branches' best commits or from a branch's own baseline.

    Rows: {"key", "values": {branch: value} (absent where train.py does not define it),
    "changed": [branches whose best differs from their baseline on this key]}.
    """
    cols = [s for s in summaries if s.best_recipe is not None]
    keys = []
    for s in cols:
        keys += [k for k in s.best_recipe if k not in keys]
    rows = []
    for k in keys:
        values = {s.name: s.best_recipe[k] for s in cols if k in s.best_recipe}
        changed = [
            s.name for s in cols
            if s.baseline_recipe is not None and k in s.best_recipe
            and (k not in s.baseline_recipe or not _same(s.baseline_recipe[k], s.best_recipe[k]))
        ]
        vals = list(values.values())
        differs = len(values) < len(cols) or any(not _same(v, vals[0]) for v in vals)
        if differs or changed:
            rows.append({"key": k, "values": values, "changed": changed})
    return rows


def branch_delta(s: BranchSummary) -> dict:
    """{key: (baseline_value, best_value)} with _ABSENT for a side that does not define it."""
    if s.baseline_recipe is None or s.best_recipe is None:
        return {}
    return recipe_diff(s.baseline_recipe, s.best_recipe)


def _direction(old, new) -> str:
    if old is _ABSENT:
        return f"added = {new!r}"
    if new is _ABSENT:
        return "removed"
    if _is_number(old) and _is_number(new):
        return "up" if new > old else "down"
    return f"= {new!r}"


def _show(v):
    return None if v is _ABSENT else v


def classify_changes(summaries) -> list:
    """Net kept changes (baseline -> best) per constant, across branches.

    universal: the same change (same direction, or the same new value for non-numbers) on
    branches of two or more machines; hardware-specific: changed on one machine's branches
    only; conflicting: changed in different directions. With fewer than two machines compared,
    nothing can be called universal or specific and the kind is "unconfirmed".
    """
    scored = [s for s in summaries if s.best_recipe is not None and s.baseline_recipe is not None]
    machines_compared = {s.machine_label for s in scored}
    by_key = {}
    for s in scored:
        for k, (old, new) in branch_delta(s).items():
            by_key.setdefault(k, []).append({
                "branch": s.name, "machine": s.machine_label,
                "from": _show(old), "to": _show(new), "direction": _direction(old, new),
            })
    out = []
    for k, entries in by_key.items():
        directions = sorted({e["direction"] for e in entries})
        machines = sorted({e["machine"] for e in entries})
        if len(machines_compared) < 2:
            kind = "unconfirmed"
        elif len(directions) > 1:
            kind = "conflicting"
        elif len(machines) >= 2:
            kind = "universal"
        else:
            kind = "hardware-specific"
        out.append({"key": k, "kind": kind, "direction": directions[0] if len(directions) == 1 else None,
                    "machines": machines, "branches": entries})
    order = {"universal": 0, "conflicting": 1, "hardware-specific": 2, "unconfirmed": 3}
    out.sort(key=lambda c: (order[c["kind"]], c["key"]))
    return out
