"""The research loop's commands as functions: score one candidate, measure the noise floor.

`run_experiment` is what `mlx-ar run -m "..."` does:

1. Refuse (row + receipt, nothing else touched) when files outside the mutable surface are
   changed, train.py is missing, the same train.py was already scored, or a config-tier
   campaign sees code edits.
2. Commit the mutable surface as a candidate commit object (kept reachable under
   refs/mlx-ar/attempts/<seq>); the branch does not move yet.
3. Run train.py as a child with a hard timeout, once or (significance gate) with more seeds
   until the gate decides; a run far slower than the branch's usual tok/s is recorded as
   `suspect` and re-run.
4. Under the ledger lock: keep (move the branch to the candidate) or restore train.py to the
   champion's; write the receipt and the results.tsv row; make the "ledger:" commit.

Ctrl-C at any point kills the child's process group, records a `crash` row with reason
"interrupted", restores train.py to the champion, and raises `Interrupted` (exit 130). If the
loop itself is killed outright, its in-flight marker (in the shared git dir) lets the next
run record the attempt as a `crash` ("lost: ...").

Collaborators are parameters (`runner`, `sleep`, `echo`, `now`), so tests drive the whole
loop with fake train.py scripts and without waiting.
"""
import math
import os
import platform
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ..atomic import atomic_write
from ..backends.surface import refuse_reason
from ..harness.summary import utc_timestamp
from . import git_ops
from .format import (LEDGER_COMMIT_PREFIX, NOISE_FILE, NOISE_SCHEMA, RECEIPT_SCHEMA, RECEIPTS_DIR, RESULTS_FILE,
                     receipt_name, sanitize)
from .gate import GateSettings, Verdict, decide, mean, std
from .ledger import (Ledger, champion, dump_json, find_scored, noise_measurements, samples_of,
                     usual_rate, variance_groups)
from .runner import RunOutcome, assess, run_child

EXIT_CODES = {"keep": 0, "discard": 0, "crash": 1, "refused": 2}
EXIT_INTERRUPTED = 130


class Interrupted(Exception):
    """Ctrl-C (or SIGTERM) stopped the loop after it recorded the attempt; exit with 130."""

    def __init__(self, result):
        super().__init__("interrupted")
        self.result = result


class LoopError(RuntimeError):
    """The loop cannot start (bad repository state, no champion to measure, ...)."""


# --- where things are ------------------------------------------------------------------------
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


def open_context(root) -> Context:
    from .workers import worker_meta

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


def _owned(path: str, campaign) -> bool:
    """Paths the loop may find changed: the mutable surface, the ledger files, run outputs."""
    top = path.split("/", 1)[0]
    return (path in campaign.mutable or path in (RESULTS_FILE, NOISE_FILE) or top == RECEIPTS_DIR
            or top == campaign.runs_dir)


@contextmanager
def _shielded():
    """Defer Ctrl-C / SIGTERM while the ledger is written, so bookkeeping is never cut in half.

    Yields a list that holds the deferred signal numbers; the caller decides what to do with
    them once the writes are done (re-raise, or exit 130 after reporting).
    """
    pending = []
    if threading.current_thread() is not threading.main_thread():
        yield pending
        return
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in old:
        signal.signal(s, lambda signum, frame: pending.append(signum))
    try:
        yield pending
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --- config tier ---------------------------------------------------------------------------
def config_tier_problems(old: dict, new: dict, new_constants: bool = False) -> list[str]:
    """Why `new` is not a recipe-only edit of `old` ({path: bytes|None}); [] when it is.

    new_constants=True also accepts added or removed recipe constants (the cuda rule: a new
    dial in train.py's recipe that train_torch.py reads); code outside the recipe still counts.
    """
    from ..backends.surface import first_code_change
    from ..recipe import RecipeError, parse_recipe

    problems = []
    for path in sorted(set(old) | set(new)):
        a, b = old.get(path), new.get(path)
        if a == b:
            continue
        if a is None or b is None:
            problems.append(f"{path} was {'added' if a is None else 'deleted'}")
            continue
        if not path.endswith(".py"):
            problems.append(f"{path} changed (only recipe constants of Python files may change)")
            continue
        try:
            ta, tb = a.decode(), b.decode()
            na, nb = list(parse_recipe(ta, path)), list(parse_recipe(tb, path))
            line = first_code_change(ta, tb, path)
        except RecipeError as e:   # names the file and line (a syntax error is one too)
            problems.append(str(e))
            continue
        except UnicodeDecodeError as e:
            problems.append(f"{path}: {e}")
            continue
        if na != nb and not new_constants:
            gone, added = sorted(set(na) - set(nb)), sorted(set(nb) - set(na))
            what = "; ".join(x for x in (f"removed {', '.join(gone)}" if gone else "",
                                         f"added {', '.join(added)}" if added else "",
                                         "reordered" if not gone and not added else "") if x)
            problems.append(f"{path}: the set of recipe constants changed ({what})")
            continue
        if line is not None:
            problems.append(f"{path}:{line}: code outside the recipe constants changed")
    return problems


def executed_mismatch(executed: dict | None, files: dict) -> str | None:
    """Why the run did not execute the candidate's files (by the record's sha256s), or None."""
    import hashlib

    for path, digest in (executed or {}).items():
        data = files.get(path)
        if data is not None and digest and hashlib.sha256(data).hexdigest() != digest:
            return (f"the run executed a different {path} than the candidate (sha256 {digest[:12]}...): "
                    "was it edited during the run?")
    return None


def syntax_problem(files: dict) -> str | None:
    for path, data in sorted(files.items()):
        if data is not None and path.endswith(".py"):
            try:
                compile(data, path, "exec", dont_inherit=True)
            except SyntaxError as e:
                return f"syntax error: {path}:{e.lineno}: {e.msg}"
            except ValueError as e:  # e.g. null bytes
                return f"{path}: {e}"
    return None


# --- one attempt -----------------------------------------------------------------------------
@dataclass
class AttemptResult:
    status: str
    reason: str
    seq: int | None = None
    receipt: str | None = None
    commit: str | None = None
    metrics: dict | None = None
    champion: dict | None = None
    gate: dict = field(default_factory=dict)
    runs: list = field(default_factory=list)
    log: str | None = None
    notes: list = field(default_factory=list)
    interrupted: bool = False        # Ctrl-C arrived; the attempt was still recorded in full

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else EXIT_CODES[self.status]


def _aggregate(outcomes: list[RunOutcome]) -> dict | None:
    """Mean of each metric over ok runs (the row's val_bpb is the mean over seeds)."""
    ok = [o.metrics for o in outcomes if o.status == "ok" and o.metrics]
    if not ok:
        return None
    out = {}
    for key in ok[0]:
        vals = [m.get(key) for m in ok if isinstance(m.get(key), (int, float)) and not isinstance(m.get(key), bool)]
        if not vals:
            out[key] = None
        elif all(isinstance(v, int) for v in vals):
            out[key] = int(round(mean(vals)))
        else:
            out[key] = round(mean(vals), 6)
    return out


class _Attempt:
    """State of one `mlx-ar run`; see run_experiment."""

    def __init__(self, ctx: Context, campaign, description: str, runner, sleep, echo, now, seed):
        self.ctx, self.c, self.runner, self.sleep, self.echo, self.now = ctx, campaign, runner, sleep, echo, now
        self.description = sanitize(description)
        self.base_seed = campaign.seed if seed is None else int(seed)
        self.started_at = now()
        self.outcomes: list[RunOutcome] = []
        self.notes: list[str] = []
        self.seq = self.cand = self.base = None
        self.created = False
        self.cand_files = self.base_files = None
        self.champ = None
        self.run_index = 0
        self.gate_stats = {}

    # --- receipts ------------------------------------------------------------------------
    def _receipt(self, status, reason, seq, commit, metrics, runs, extra=None) -> dict:
        c = self.c
        first = next((o.record for o in runs if o.record), None) or {}
        recipe = None
        if self.cand_files and self.cand_files.get("train.py") is not None:
            from ..recipe import RecipeError, parse_recipe
            try:
                recipe = parse_recipe(self.cand_files["train.py"].decode(errors="replace"))
            except (RecipeError, ValueError):
                recipe = None
        diff = git_ops.diff_text(self.base_files, self.cand_files) if self.cand_files and self.base_files else ""
        r = {
            "schema": RECEIPT_SCHEMA, "seq": seq, "status": status, "reason": reason,
            "description": self.description, "commit": commit, "parent": self.base, "branch": self.ctx.branch,
            "diff": diff, "recipe": recipe, "backend": first.get("backend") or c.backend,
            "device": first.get("device"), "machine": platform.node(), "seed": runs[0].seed if runs else self.base_seed,
            "contract": first.get("contract"), "smoke": bool(first.get("smoke", c.smoke is not None)),
            "metrics": metrics, "executed_files": first.get("executed_files"),
            "started_at": self.started_at, "finished_at": self.now(),
            "attempt_commit": self.cand, "surface_sha": git_ops.surface_sha(self.cand_files) if self.cand_files else None,
            "tier": c.tier, "gate": dict(self.gate_stats, kind=c.gate, notes=list(self.notes)),
            "runs": [o.to_dict() for o in runs], "worker": self.ctx.worker,
            "contract_parts": first.get("contract_parts"), "versions": first.get("versions"),
            "campaign": c.to_dict(),
        }
        if self.champ:
            r["gate"]["champion"] = {"commit": self.champ.get("commit"), "seq": self.champ.get("seq"),
                                     "receipt": self.champ.get("_path"),
                                     "value": (self.champ.get("metrics") or {}).get(c.objective)}
        r.update(extra or {})
        return r

    def _ledger_commit(self, message: str) -> None:
        """Commit the ledger files that changed, on the ledger branch (caller holds the lock)."""
        ctx = self.ctx
        dirty = [p for p in git_ops.status_paths(ctx.ledger_repo)
                 if p in (RESULTS_FILE, NOISE_FILE) or p.startswith(RECEIPTS_DIR + "/")]
        if not dirty:
            return
        files = git_ops.read_worktree(ctx.ledger.root, dirty)
        git_ops.commit_on_branch(ctx.ledger_repo, branch=ctx.ledger_branch, files=files,
                                 message=f"{LEDGER_COMMIT_PREFIX} {message}"[:200], write_files=False)

    def refuse(self, reason: str) -> AttemptResult:
        """Record a refusal: a row and a receipt; the working tree and branch stay as they are."""
        ctx = self.ctx
        head = git_ops.head_sha(ctx.repo)
        with _shielded() as pending, ctx.ledger.lock():
            seq = ctx.ledger.reserve_seq()
            self.base = self.base or head
            receipt = self._receipt("refused", reason, seq, head, None, [])
            rel = ctx.ledger.write_receipt(receipt)
            self._ledger_commit(f"{seq:05d} refused {self.description}")
        self.echo(f"refused: {reason}")
        return AttemptResult("refused", reason, seq, rel, head, notes=self.notes, interrupted=bool(pending))

    # --- in-flight markers (an attempt whose mlx-ar process dies is still recorded) ----------
    def in_flight_path(self) -> Path:
        return self.ctx.ledger.state_dir / "in-flight" / f"{self.seq:05d}.json"

    def mark_in_flight(self) -> None:
        marker = {"seq": self.seq, "pid": os.getpid(), "host": platform.node(), "root": str(self.ctx.root),
                  "branch": self.ctx.branch, "worker": self.ctx.worker, "commit": self.cand, "parent": self.base,
                  "description": self.description, "started_at": self.started_at,
                  "run_dir": str(self.run_dir().relative_to(self.ctx.root))}
        atomic_write(self.in_flight_path(), dump_json(marker))

    # --- running -------------------------------------------------------------------------
    def run_dir(self) -> Path:
        return self.ctx.root / self.c.runs_dir / f"{self.seq:05d}-{self.cand[:7]}"

    def run_seed(self, seed: int) -> RunOutcome:
        from .workers import worker_env

        self.run_index += 1
        i = self.run_index
        d = self.run_dir()
        log = d / ("train.log" if i == 1 else f"train.{i}.log")
        record = d / ("run.json" if i == 1 else f"run.{i}.json")
        if record.exists():
            record.unlink()
        cmd = self.c.command(record, seed)
        self.echo(f"run {i}: seed {seed}, log {log.relative_to(self.ctx.root)} (limit {self.c.timeout_s:.0f} s)")
        beat = lambda s, line: self.echo(f"  {s:5.0f} s  {line[:110]}")  # noqa: E731
        # MLX_AR_RUN_DIR: where this run may put checkpoints or extra files (unique per run and worker).
        env = {**worker_env(self.ctx.meta, self.c.backend), "MLX_AR_RUN_DIR": str(d)}
        child = self.runner(cmd, cwd=self.ctx.root, log_path=log, timeout_s=self.c.timeout_s, env=env,
                            heartbeat=beat)
        out = assess(child, record, seed, self.c.objective)
        # Receipts are committed and compared across machines: paths relative to the worktree.
        out.log_path, out.record_path = (str(x.relative_to(self.ctx.root)) for x in (log, record))
        if out.status == "ok":
            wrong = executed_mismatch((out.record or {}).get("executed_files"), self.cand_files)
            if wrong:
                out.status, out.reason = "fail", wrong
        if out.status == "ok":
            v = out.metrics.get(self.c.objective)
            self.echo(f"  {self.c.objective} {v:.6f}  ({out.metrics.get('tok_per_sec')} tok/s, "
                      f"{child.duration_s:.0f} s)")
        else:
            self.echo(f"  failed: {out.reason}")
        return out

    def sentinel(self, out: RunOutcome, receipts) -> str | None:
        """Why this run looks throttled (tok/s far below the branch's usual), or None."""
        c = self.c
        if c.throttle_ratio <= 0 or out.status != "ok":
            return None
        rate = (out.metrics or {}).get("tok_per_sec")
        rec = out.record or {}
        usual, n = usual_rate(receipts, rec.get("backend"), rec.get("device"), c.throttle_window)
        if not isinstance(rate, (int, float)) or usual is None or n < c.throttle_min_history:
            return None
        if rate < c.throttle_ratio * usual:
            return (f"{rate:.0f} tok/s is {100 * rate / usual:.0f}% of the branch's usual {usual:.0f} "
                    f"(median of {n} runs): throttled or busy machine; re-running")
        return None

    def veto(self, out: RunOutcome, receipts) -> str | None:
        c, m = self.c, out.metrics or {}
        if (out.record or {}).get("smoke") and not c.allow_smoke:
            return "smoke run: never kept (not comparable; only tests of the loop allow it)"
        mem = m.get("peak_vram_mb")
        if c.max_memory_gb is not None and isinstance(mem, (int, float)) and mem / 1024 > c.max_memory_gb:
            return f"veto: peak memory {mem / 1024:.1f} GB > max_memory_gb {c.max_memory_gb:g}"
        if c.min_tok_per_sec_ratio is not None:
            base = next((r for r in receipts if r.get("status") == "keep" and not r.get("smoke")
                         and r.get("device") == (out.record or {}).get("device")), None)
            base_rate = ((base or {}).get("metrics") or {}).get("tok_per_sec")
            rate = m.get("tok_per_sec")
            if base_rate and isinstance(rate, (int, float)) and rate < c.min_tok_per_sec_ratio * base_rate:
                return (f"veto: {rate:.0f} tok/s < {c.min_tok_per_sec_ratio:g} x the branch baseline's "
                        f"{base_rate:.0f}")
        return None

    def write_suspect(self, out: RunOutcome, reason: str) -> None:
        ctx = self.ctx
        with _shielded() as pending, ctx.ledger.lock():
            seq = ctx.ledger.reserve_seq()
            receipt = self._receipt("suspect", reason, seq, self.cand, out.metrics, [out])
            ctx.ledger.write_receipt(receipt)
        self.echo(f"suspect: {reason}")
        if pending:
            raise KeyboardInterrupt

    def judge(self, receipts, noise) -> Verdict:
        """The gate's verdict on the ok runs so far against the current champion."""
        c = self.c
        contract = next((o.record.get("contract") for o in self.outcomes if o.record), None)
        champ = champion(receipts, c.objective, c.sign, c.allow_smoke, contract=contract)
        other = champion(receipts, c.objective, c.sign, c.allow_smoke) if champ is None else None
        if other is not None:
            return Verdict("refused", f"contract {contract} differs from the champion's {other.get('contract')} "
                           "(data, tokenizer or evaluation changed): start a new branch for the new contract")
        self.champ = champ
        values = [c.sign * o.metrics[c.objective] for o in self.outcomes if o.status == "ok"]
        if champ is None:
            return decide(GateSettings.from_campaign(c), values, [])
        champ_vals = [c.sign * v for v in samples_of(receipts, noise, champ["surface_sha"], c.objective)]
        if not champ_vals:  # an old receipt without runs: its recorded metric is all there is
            champ_vals = [c.sign * champ["metrics"][c.objective]]
        sha = git_ops.surface_sha(self.cand_files)
        groups = [[c.sign * v for v in g] for g in
                  variance_groups(receipts, noise, c.objective, exclude={champ["surface_sha"], sha})]
        return decide(GateSettings.from_campaign(c), values, champ_vals, groups)

    # --- finishing -------------------------------------------------------------------------
    def finish(self, status: str, reason: str, recheck: bool = False) -> AttemptResult | None:
        """Keep or restore, then write the receipt, the row and the ledger commit (under the lock).

        With `recheck`, the gate is asked again under the lock first (another worker may have
        kept a new champion since); None means it now wants more runs and nothing was written.
        """
        ctx, c = self.ctx, self.c
        with _shielded() as pending, ctx.ledger.lock():
            receipts = ctx.ledger.receipts()
            if recheck:
                fresh = self.judge(receipts, ctx.ledger.noise())
                if fresh.action == "more":
                    self.echo(f"gate: the champion changed meanwhile; {fresh.reason}")
                    return None
                self.gate_stats = dict(fresh.stats)
                status, reason = fresh.action, fresh.reason
            commit = self.cand
            if status == "keep":
                commit = self._keep()
            else:
                self._restore(receipts)
            metrics = _aggregate(self.outcomes)
            receipt = self._receipt(status, reason, self.seq, commit, metrics, self.outcomes)
            rel = ctx.ledger.write_receipt(receipt)
            value = (metrics or {}).get(c.objective)
            self._ledger_commit(f"{self.seq:05d} {status}" + (f" {value:.6f}" if value is not None else "")
                                + f" {self.description}")
            self.in_flight_path().unlink(missing_ok=True)
        log = self.outcomes[0].log_path if self.outcomes else None
        return AttemptResult(status, reason, self.seq, rel, commit, metrics, receipt["gate"].get("champion"),
                             receipt["gate"], receipt["runs"], log, self.notes,
                             interrupted=bool(pending) or reason == "interrupted")

    def run_until_decided(self) -> tuple[str, str, bool]:
        """Run seeds until something decides: (status, reason, decided by the gate?)."""
        c, ctx = self.c, self.ctx
        problem = syntax_problem(self.cand_files)
        if problem:
            return "crash", problem, False
        retries = 0
        while True:
            seed = self.base_seed + len([o for o in self.outcomes if o.status == "ok"])
            out = self.run_seed(seed)
            if out.status != "ok":
                self.outcomes.append(out)
                return "crash", (out.reason if len(self.outcomes) == 1 else f"seed {seed}: {out.reason}"), False
            receipts, noise = ctx.ledger.receipts(), ctx.ledger.noise()
            why = self.sentinel(out, receipts)
            if why and retries < c.suspect_retries:
                retries += 1
                self.write_suspect(out, why)
                if c.suspect_cooldown:
                    self.echo(f"waiting {c.suspect_cooldown:.0f} s before the re-run")
                    self.sleep(c.suspect_cooldown)
                continue
            if why:
                out.notes.append("slow again on re-run: taken as the candidate's own speed")
            retries = 0
            self.outcomes.append(out)
            veto = self.veto(out, receipts)
            if veto:
                return "discard", veto, False
            verdict = self.judge(receipts, noise)
            self.gate_stats = dict(verdict.stats)
            if verdict.action == "more":
                self.echo(f"gate: {verdict.reason}; running another seed")
                continue
            return verdict.action, verdict.reason, verdict.action != "refused"

    def _keep(self) -> str:
        ctx = self.ctx
        if not self.created:
            return self.cand  # the candidate is the tip already (a baseline of HEAD)
        tip = git_ops.head_sha(ctx.repo)
        if tip == self.base:
            git_ops.move_branch(ctx.repo, ctx.branch, self.cand, tip, reason=f"keep {self.description[:40]}")
            final = self.cand
        else:  # ledger commits landed on this branch meanwhile (workers sharing the main checkout)
            final = git_ops.make_commit(ctx.repo, parent=tip, files=self.cand_files,
                                        message=self.description or "experiment")
            git_ops.move_branch(ctx.repo, ctx.branch, final, tip, reason=f"keep {self.description[:40]}")
        git_ops.sync_index(ctx.repo, list(self.cand_files))
        if git_ops.read_worktree(ctx.root, self.cand_files) != self.cand_files:
            self.notes.append("the mutable files were edited during the run; those edits are left uncommitted")
        return final

    def _restore(self, receipts) -> None:
        """Put the mutable surface back to the champion's (or the base's, before any champion)."""
        ctx, c = self.ctx, self.c
        champ = champion(receipts, c.objective, c.sign, c.allow_smoke)
        target = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else self.base_files
        current = git_ops.read_worktree(ctx.root, c.mutable)
        if self.cand_files is not None and current != self.cand_files:
            self.notes.append("the mutable files were edited during the run; left as they are "
                              "(the candidate is in the receipt and under refs/mlx-ar/attempts)")
            return
        git_ops.write_worktree(ctx.root, target)
        tip = git_ops.head_sha(ctx.repo)
        if git_ops.read_commit(ctx.repo, tip, c.mutable) != target:
            # The champion is another worker's (or the branch drifted): adopt it explicitly.
            src = f"{champ['commit'][:7]} ({champ.get('branch')})" if champ else self.base[:7]
            git_ops.commit_on_branch(ctx.repo, branch=ctx.branch, files=target, write_files=False,
                                     message=f"{LEDGER_COMMIT_PREFIX} adopt champion {src}")
        else:
            git_ops.sync_index(ctx.repo, c.mutable)


def run_experiment(root, description: str, campaign, *, runner=run_child, sleep=time.sleep, echo=print,
                   now=utc_timestamp, seed: int | None = None) -> AttemptResult:
    """Score the working tree's mutable surface as one experiment; see the module docstring."""
    ctx = open_context(root)
    c = campaign
    a = _Attempt(ctx, c, description, runner, sleep, echo, now, seed)
    repaired = ctx.ledger.repair()
    if repaired:
        a.notes.append(f"re-added {len(repaired)} results.tsv row(s) for receipts without one")
    lost = record_lost_attempts(ctx, c, now)
    if lost:
        a.notes.append(f"recorded {len(lost)} attempt(s) whose mlx-ar process died as crashes: {', '.join(lost)}")
    receipts, noise = ctx.ledger.receipts(), ctx.ledger.noise()
    head = git_ops.head_sha(ctx.repo)
    a.base = head

    # --- 1. refusals: nothing is touched but the ledger --------------------------------------
    unrelated = sorted({p for p in git_ops.status_paths(ctx.repo) if not _owned(p, c)})
    worktree = git_ops.read_worktree(ctx.root, c.mutable)
    a.cand_files, a.base_files = worktree, git_ops.read_commit(ctx.repo, head, c.mutable)
    if unrelated:
        shown = ", ".join(unrelated[:8]) + (f" and {len(unrelated) - 8} more" if len(unrelated) > 8 else "")
        return a.refuse(f"files outside the mutable surface ({', '.join(c.mutable)}) are changed: {shown}. "
                        "mlx-ar commits only the mutable surface; commit, revert or .gitignore them, then re-run")
    missing = [p for p, d in worktree.items() if d is None]
    if missing:
        return a.refuse(f"{', '.join(missing)} does not exist; restore it (git checkout HEAD -- {missing[0]})")

    scored_commits = {r.get("commit") for r in receipts}
    info = git_ops.commit_info(ctx.repo, head)
    fold = False
    if (not git_ops.is_ledger_message(info["message"]) and head not in scored_commits
            and info["parents"] and git_ops.has_ledger_commit(ctx.repo, head)):
        # HEAD was committed by hand (or by `mlx-ar transplant`) on top of the ledger: score it.
        parent = info["parents"][0]
        changed = git_ops.changed_paths(ctx.repo, parent, head)
        outside = [p for p in changed if p not in c.mutable]
        if outside:
            return a.refuse(f"HEAD ({head[:7]}) changes files outside the mutable surface: {', '.join(outside)}; "
                            f"undo it with `git reset --soft HEAD~1` and commit those files separately")
        pinfo = git_ops.commit_info(ctx.repo, parent)
        if not git_ops.is_ledger_message(pinfo["message"]) and parent not in scored_commits:
            return a.refuse("more than one unscored commit sits on top of the last ledger commit; fold them "
                            "into the working tree with `git reset --soft <last ledger commit>` and re-run")
        a.base, fold = parent, True
        a.base_files = git_ops.read_commit(ctx.repo, parent, c.mutable)
        if not a.description:
            a.description = sanitize(info["message"])

    sha = git_ops.surface_sha(worktree)
    prior = find_scored(receipts, sha, c.allow_smoke)
    if prior:
        v = (prior.get("metrics") or {}).get(c.objective)
        return a.refuse(f"identical {', '.join(c.mutable)} already scored in {prior['_path']} "
                        f"({prior['status']}" + (f", {c.objective} {v:.6f}" if v is not None else "")
                        + "); edit it first")
    champ = champion(receipts, c.objective, c.sign, c.allow_smoke)
    ref_files = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else a.base_files
    if c.tier == "config" and champ is not None:
        problems = config_tier_problems(ref_files, worktree)
        if problems:
            return a.refuse("config tier: only the recipe constants may change, but "
                            + "; ".join(problems[:5]) + ". Revert the code edit (or set tier = \"code\")")
    inert = refuse_reason(c.backend, ref_files, worktree)
    if inert:
        return a.refuse(inert)
    if not a.description:
        return a.refuse('no description: say what changed with -m "..."')
    if c.gate == "significance" and champ is not None and not noise_measurements(noise):
        a.notes.append("no noise floor measured yet (`mlx-ar noise`): the gate has few runs to judge spread by")

    # --- 2. the candidate commit -------------------------------------------------------------
    a.seq = ctx.ledger.reserve_seq()
    if fold:  # the hand-made commit is the candidate; the branch steps back until it is judged
        a.cand, a.created = head, True
        git_ops.move_branch(ctx.repo, ctx.branch, a.base, head, reason="mlx-ar: judge HEAD as an attempt")
        git_ops.sync_index(ctx.repo, c.mutable)
    elif worktree != a.base_files:
        a.cand = git_ops.make_commit(ctx.repo, parent=a.base, files=worktree, message=a.description)
        a.created = True
    else:
        a.cand = a.base
    git_ops.set_ref(ctx.repo, git_ops.attempt_ref(a.seq), a.cand)
    a.mark_in_flight()
    echo(f"attempt {a.seq:05d} on {ctx.branch}: {a.description} (candidate {a.cand[:7]}, gate {c.gate})")

    # --- 3. runs until the gate decides, 4. bookkeeping ----------------------------------------
    while True:
        try:
            status, reason, by_gate = a.run_until_decided()
        except KeyboardInterrupt:
            result = a.finish("crash", "interrupted")
            echo("interrupted: recorded as a crash, the mutable surface restored to the champion")
            raise Interrupted(result) from None
        result = a.finish(status, reason, recheck=by_gate)
        if result is not None:
            return result


# --- attempts whose mlx-ar process died ---------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def record_lost_attempts(ctx: Context, campaign, now=utc_timestamp) -> list[str]:
    """Crash receipts for in-flight attempts on this host whose mlx-ar process is gone.

    `mlx-ar run` killed outright (SIGKILL, power loss) never reaches its bookkeeping; its
    marker says what it was running, so the attempt still gets its row. The working tree is
    left as it is: the candidate's edit is usually still there and is simply judged again.
    """
    import json

    c = campaign
    folder = ctx.ledger.state_dir / "in-flight"
    if not folder.is_dir():
        return []
    recorded = []
    with _shielded() as pending, ctx.ledger.lock():
        for path in sorted(folder.glob("*.json")):
            try:
                m = json.loads(path.read_text())
            except (OSError, ValueError):
                continue
            if m.get("host") != platform.node() or _pid_alive(int(m.get("pid", 0))):
                continue  # another machine's, or still running (another worker)
            a = _Attempt(ctx, c, m.get("description", ""), None, None, None, now, None)
            a.seq, a.cand, a.base, a.started_at = m["seq"], m["commit"], m.get("parent"), m.get("started_at")
            try:
                a.cand_files = git_ops.read_commit(ctx.repo, a.cand, c.mutable)
                a.base_files = git_ops.read_commit(ctx.repo, a.base, c.mutable) if a.base else None
            except (ValueError, KeyError):
                a.cand_files = a.base_files = None
            a.notes.append(f"logs, if any, in {m.get('root')}/{m.get('run_dir')}")
            receipt = a._receipt("crash", "lost: the mlx-ar process ended before recording a decision "
                                 "(killed, or the machine stopped)", a.seq, a.cand, None, [])
            receipt["branch"], receipt["worker"] = m.get("branch"), m.get("worker")
            if not (ctx.ledger.root / receipt_name(a.seq, a.cand)).exists():
                recorded.append(ctx.ledger.write_receipt(receipt))
            path.unlink()
        if recorded:
            _Attempt(ctx, c, "", None, None, None, now, None)._ledger_commit(
                f"record {len(recorded)} lost attempt(s)")
    if pending:
        raise KeyboardInterrupt
    return recorded


# --- keeping workers on the champion --------------------------------------------------------
def sync_to_champion(ctx: Context, campaign) -> tuple[bool, str]:
    """Move a clean worktree's mutable surface to the global champion; (moved?, note)."""
    c = campaign
    with _shielded() as pending, ctx.ledger.lock():
        champ = champion(ctx.ledger.receipts(), c.objective, c.sign, c.allow_smoke)
        head = git_ops.head_sha(ctx.repo)
        current = git_ops.read_worktree(ctx.root, c.mutable)
        target = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else None
        if champ is None:
            moved, note = False, "no champion yet"
        elif current != git_ops.read_commit(ctx.repo, head, c.mutable):
            moved, note = False, "edit in progress; left alone"
        elif target == current:
            moved, note = False, f"at the champion {champ['commit'][:7]}"
        else:
            git_ops.commit_on_branch(ctx.repo, branch=ctx.branch, files=target,
                                     message=f"{LEDGER_COMMIT_PREFIX} adopt champion {champ['commit'][:7]} "
                                             f"({champ.get('branch')})")
            moved, note = True, f"moved to the champion {champ['commit'][:7]}"
    if pending:
        raise KeyboardInterrupt
    return moved, note


# --- the noise floor -------------------------------------------------------------------------
def measure_noise(root, campaign, *, runs: int | None = None, runner=run_child, sleep=time.sleep,
                  echo=print, now=utc_timestamp) -> dict:
    """Run the champion `runs` times with fresh seeds; store and commit noise.json; return it."""
    ctx = open_context(root)
    c = campaign
    k = runs or c.noise_runs
    if k < 2:
        raise LoopError(f"the noise floor needs at least 2 runs, got {k}")
    ctx.ledger.repair()
    record_lost_attempts(ctx, c, now)
    receipts = ctx.ledger.receipts()
    champ = champion(receipts, c.objective, c.sign, c.allow_smoke)
    if champ is None:
        raise LoopError('no kept run yet: score the baseline first with `mlx-ar run -m "baseline"`')
    unrelated = sorted(p for p in git_ops.status_paths(ctx.repo) if not _owned(p, c))
    worktree = git_ops.read_worktree(ctx.root, c.mutable)
    champ_files = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable)
    if unrelated or worktree != champ_files:
        raise LoopError("the noise floor measures the champion's train.py, but the working tree differs "
                        f"from it ({', '.join(unrelated) or ', '.join(c.mutable)}); score or revert your edit first")
    sha = champ["surface_sha"] or git_ops.surface_sha(champ_files)
    used = {run.get("seed") for r in receipts if r.get("surface_sha") == sha for run in r.get("runs") or []}
    for m in noise_measurements(ctx.ledger.noise()):
        if m.get("surface_sha") == sha:
            used |= set(m.get("seeds") or [])
    a = _Attempt(ctx, c, "noise floor", runner, sleep, echo, now, None)
    a.cand, a.cand_files, a.base_files = champ["commit"], champ_files, champ_files
    stamp = now().replace(":", "").replace("-", "")
    run_root = f"noise-{champ['commit'][:7]}-{stamp}"
    a.run_dir = lambda: ctx.root / c.runs_dir / run_root  # noqa: E731 (same naming, no seq)
    outcomes, seed, retries = [], c.seed, 0
    echo(f"noise floor: {k} runs of the champion {champ['commit'][:7]} ({c.objective} "
         f"{champ['metrics'][c.objective]:.6f})")
    while len(outcomes) < k:
        while seed in used:
            seed += 1
        out = a.run_seed(seed)
        if out.status != "ok":
            raise LoopError(f"a noise run of the champion failed (seed {seed}): {out.reason}; "
                            f"log: {out.log_path}. Nothing was stored")
        why = a.sentinel(out, receipts)
        if why and retries < c.suspect_retries:
            retries += 1
            echo(f"suspect: {why}")
            if c.suspect_cooldown:
                sleep(c.suspect_cooldown)
            continue
        retries = 0
        outcomes.append(out)
        used.add(seed)
    values = [o.metrics[c.objective] for o in outcomes]
    everything = samples_of(receipts, None, sha, c.objective) + values
    first = outcomes[0].record or {}
    data = {
        "schema": NOISE_SCHEMA, "floor": std(everything), "samples": values, "seeds": [o.seed for o in outcomes],
        "mean": mean(values), "n": len(values), "n_with_receipts": len(everything),
        "objective": c.objective, "surface_sha": sha, "commit": champ["commit"], "branch": champ.get("branch"),
        "worker": ctx.worker, "backend": first.get("backend"), "device": first.get("device"),
        "contract": first.get("contract"), "smoke": bool(first.get("smoke")),
        "tok_per_sec": [o.metrics.get("tok_per_sec") for o in outcomes],
        "runs": [o.to_dict() for o in outcomes], "measured_at": now(), "campaign": c.to_dict(),
    }
    with _shielded() as pending, ctx.ledger.lock():
        # Read again under the lock: another worker may have stored a measurement during these runs.
        data["previous"] = [{k2: v for k2, v in m.items() if k2 not in ("previous", "runs")}
                            for m in noise_measurements(ctx.ledger.noise())]
        ctx.ledger.write_noise(data)
        a._ledger_commit(f"noise floor sd={data['floor']:.6f} over {len(everything)} runs of {champ['commit'][:7]}")
    if pending:
        raise KeyboardInterrupt
    return data


def noise_summary(data: dict, campaign) -> list[str]:
    """Lines that explain a noise floor: spread, and what the single gate would do with it."""
    from .gate import simulate

    sd = data["floor"]
    lines = [f"noise floor: sd {sd:.6f} of {data['objective']} over {data['n_with_receipts']} runs "
             f"of {data['commit'][:7]} (mean {data['mean']:.6f})"]
    if sd > 0 and math.isfinite(sd):
        n = max(2, data["n_with_receipts"])
        gate = GateSettings.from_campaign(campaign)
        single = simulate(GateSettings("single", campaign.min_delta), true_gain=0.0, sigma=sd, champion_runs=n,
                          trials=1000)
        lines.append(f"an unchanged recipe would be kept {100 * single['keep_rate']:.0f}% of the time "
                     "by the single gate")
        if campaign.gate == "significance":
            for gain in (sd, 2 * sd, 3 * sd):
                sim = simulate(gate, true_gain=gain, sigma=sd, champion_runs=n, trials=500)
                lines.append(f"significance gate keeps a true gain of {gain:.6f} about "
                             f"{100 * sim['keep_rate']:.0f}% of the time ({sim['mean_runs']:.1f} runs on average)")
    return lines
