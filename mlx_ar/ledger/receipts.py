"""Receipts: what one attempt was and how it ended, written to the ledger and committed.

A `Draft` holds what is known about an attempt as it goes (its description, candidate and
base commits and files, the gate's statistics, notes); `build_receipt` turns it into the
JSON receipt. Refusals, suspect runs and attempts whose process died are written here too.

In-flight markers (one JSON file per running attempt, in the shared git dir) let the next
run record an attempt whose `mlx-ar` process was killed outright (`record_lost_attempts`).
"""
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write
from . import git_ops
from .context import shielded
from .format import LEDGER_COMMIT_PREFIX, NOISE_FILE, RECEIPT_SCHEMA, RECEIPTS_DIR, RESULTS_FILE, machine_name, \
    receipt_name
from .ledger import dump_json


@dataclass
class Draft:
    """An attempt's facts so far; everything a receipt says besides its outcome."""

    description: str
    started_at: str
    seed: int
    seq: int | None = None
    base: str | None = None            # the commit the candidate is built on
    cand: str | None = None            # the candidate commit
    base_files: dict | None = None
    cand_files: dict | None = None
    notes: list = field(default_factory=list)
    gate_stats: dict = field(default_factory=dict)
    champ: dict | None = None          # the champion's receipt it was judged against
    profile: dict | None = None        # {"name", "dataset", "overrides"} of the data profile


def _recipe(files: dict | None):
    if not files or files.get("train.py") is None:
        return None
    from ..recipe import RecipeError, parse_recipe

    try:
        return parse_recipe(files["train.py"].decode(errors="replace"))
    except (RecipeError, ValueError):
        return None


def build_receipt(d: Draft, *, status: str, reason: str, commit: str | None, metrics: dict | None, runs: list,
                  campaign, branch: str, worker: str, finished_at: str) -> dict:
    c = campaign
    first = next((o.record for o in runs if o.record), None) or {}
    diff = git_ops.diff_text(d.base_files, d.cand_files) if d.cand_files and d.base_files else ""
    profile = dict(d.profile or {})
    if first.get("recipe_overrides"):  # what the run itself says it overrode
        profile["overrides"] = first["recipe_overrides"]
    r = {
        "schema": RECEIPT_SCHEMA, "seq": d.seq, "status": status, "reason": reason,
        "description": d.description, "commit": commit, "parent": d.base, "branch": branch,
        "diff": diff, "recipe": _recipe(d.cand_files), "backend": first.get("backend") or c.backend,
        "device": first.get("device"), "machine": machine_name(branch) or platform.node(),
        "host": platform.node(), "seed": runs[0].seed if runs else d.seed,
        "contract": first.get("contract"), "smoke": bool(first.get("smoke", c.smoke is not None)),
        "metrics": metrics, "executed_files": first.get("executed_files"),
        "started_at": d.started_at, "finished_at": finished_at,
        "attempt_commit": d.cand, "surface_sha": git_ops.surface_sha(d.cand_files) if d.cand_files else None,
        "tier": c.tier, "gate": dict(d.gate_stats, kind=c.gate, notes=list(d.notes)),
        "runs": [o.to_dict() for o in runs], "worker": worker,
        "contract_parts": first.get("contract_parts"), "versions": first.get("versions"),
        "profile": profile or None, "campaign": c.to_dict(),
    }
    if d.champ:
        r["gate"]["champion"] = {"commit": d.champ.get("commit"), "seq": d.champ.get("seq"),
                                 "receipt": d.champ.get("_path"),
                                 "value": (d.champ.get("metrics") or {}).get(c.objective)}
    return r


def ledger_commit(ctx, message: str) -> None:
    """Commit the ledger files that changed, on the ledger branch (caller holds the lock)."""
    dirty = [p for p in git_ops.status_paths(ctx.ledger_repo)
             if p in (RESULTS_FILE, NOISE_FILE) or p.startswith(RECEIPTS_DIR + "/")]
    if not dirty:
        return
    files = git_ops.read_worktree(ctx.ledger.root, dirty)
    git_ops.commit_on_branch(ctx.ledger_repo, branch=ctx.ledger_branch, files=files,
                             message=f"{LEDGER_COMMIT_PREFIX} {message}"[:200], write_files=False)


def write_refusal(ctx, campaign, d: Draft, reason: str, now) -> tuple[int, str, str, bool]:
    """Record a refusal (a receipt, no results.tsv row); (seq, receipt, head, a stop signal came?)."""
    head = git_ops.head_sha(ctx.repo)
    with shielded() as pending, ctx.ledger.lock():
        d.seq = ctx.ledger.reserve_seq()
        d.base = d.base or head
        receipt = build_receipt(d, status="refused", reason=reason, commit=head, metrics=None, runs=[],
                                campaign=campaign, branch=ctx.branch, worker=ctx.worker, finished_at=now())
        rel = ctx.ledger.write_receipt(receipt)
        ledger_commit(ctx, f"{d.seq:05d} refused {d.description}")
    return d.seq, rel, head, bool(pending)


def write_suspect(ctx, campaign, d: Draft, out, reason: str, now) -> bool:
    """Record one throttled run (committed with the attempt's own ledger commit); stop signal came?"""
    with shielded() as pending, ctx.ledger.lock():
        seq = ctx.ledger.reserve_seq()
        receipt = build_receipt(Draft(**{**d.__dict__, "seq": seq}), status="suspect", reason=reason,
                                commit=d.cand, metrics=out.metrics, runs=[out], campaign=campaign,
                                branch=ctx.branch, worker=ctx.worker, finished_at=now())
        ctx.ledger.write_receipt(receipt)
    return bool(pending)


# --- in-flight markers (an attempt whose mlx-ar process dies is still recorded) ----------------
def in_flight_dir(ledger) -> Path:
    return ledger.state_dir / "in-flight"


def in_flight_path(ledger, seq: int) -> Path:
    return in_flight_dir(ledger) / f"{seq:05d}.json"


def mark_in_flight(ctx, d: Draft, run_dir: str) -> None:
    marker = {"seq": d.seq, "pid": os.getpid(), "host": platform.node(), "root": str(ctx.root),
              "branch": ctx.branch, "worker": ctx.worker, "commit": d.cand, "parent": d.base,
              "description": d.description, "started_at": d.started_at, "seed": d.seed, "run_dir": run_dir}
    atomic_write(in_flight_path(ctx.ledger, d.seq), dump_json(marker))


def in_flight_markers(ledger) -> list[tuple[Path, dict]]:
    """(path, marker) of every readable in-flight marker."""
    folder = in_flight_dir(ledger)
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            out.append((path, json.loads(path.read_text())))
        except (OSError, ValueError):
            continue
    return out


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_lost_attempts(ctx, campaign, now) -> list[str]:
    """Crash receipts for in-flight attempts on this host whose mlx-ar process is gone.

    `mlx-ar run` killed outright (SIGKILL, power loss) never reaches its bookkeeping; its
    marker says what it was running, so the attempt still gets its row. The working tree is
    left as it is: the candidate's edit is usually still there and is simply judged again.
    """
    c = campaign
    recorded = []
    with shielded() as pending, ctx.ledger.lock():
        for path, m in in_flight_markers(ctx.ledger):
            if m.get("host") != platform.node() or pid_alive(int(m.get("pid", 0))):
                continue  # another machine's, or still running (another worker)
            d = Draft(m.get("description", ""), m.get("started_at"), m.get("seed", c.seed), seq=m["seq"],
                      base=m.get("parent"), cand=m["commit"])
            try:
                d.cand_files = git_ops.read_commit(ctx.repo, d.cand, c.mutable)
                d.base_files = git_ops.read_commit(ctx.repo, d.base, c.mutable) if d.base else None
            except git_ops.GitError:
                d.cand_files = d.base_files = None
            d.notes.append(f"logs, if any, in {m.get('root')}/{m.get('run_dir')}")
            receipt = build_receipt(d, status="crash", reason="lost: the mlx-ar process ended before recording "
                                    "a decision (killed, or the machine stopped)", commit=d.cand, metrics=None,
                                    runs=[], campaign=c, branch=m.get("branch"), worker=m.get("worker"),
                                    finished_at=now())
            if not (ctx.ledger.root / receipt_name(d.seq, d.cand)).exists():
                recorded.append(ctx.ledger.write_receipt(receipt))
            path.unlink()
        if recorded:
            ledger_commit(ctx, f"record {len(recorded)} lost attempt(s)")
    if pending:
        raise KeyboardInterrupt
    return recorded
