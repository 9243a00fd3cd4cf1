"""One experiment, as `mlx-ar run -m "..."` does it.

1. Refuse (a receipt, nothing else touched) when a policy check gives a reason: files
   outside the mutable surface changed, train.py missing, the same train.py already scored,
   a config-tier campaign sees code edits, the edit would not run on this backend or only
   touches constants the data profile overrides (policy.py).
2. Commit the mutable surface as a candidate commit (kept reachable under
   refs/mlx-ar/attempts/<seq>); the branch does not move yet (ratchet.py).
3. Run train.py as a child with a hard timeout, once or (significance gate) with more seeds
   until the gate decides; a run far slower than the branch's usual tok/s is recorded as
   `suspect` and re-run; vetoes discard whatever the score.
4. Under the ledger lock: keep (move the branch to the candidate) or restore train.py to the
   champion's; write the receipt and the results.tsv row; make the "ledger:" commit.

A stop signal (Ctrl-C, SIGTERM, SIGHUP) at any point after the candidate exists kills the
child's process group, records a `crash` row with reason "interrupted", restores train.py to
the champion, and raises `Interrupted` (exit 130). If the loop itself is killed outright, its
in-flight marker lets the next run record the attempt as a `crash` ("lost: ...").

Collaborators are parameters (`runner`, `sleep`, `echo`, `now`), so tests drive the whole
loop with fake train.py scripts and without waiting.
"""
import time
from dataclasses import dataclass, field

from ..harness.summary import utc_timestamp
from . import git_ops, policy, ratchet, receipts as rc
from .campaign import data_profile
from .context import EXIT_CODES, EXIT_INTERRUPTED, Interrupted, open_context, shielded, worker_env
from .format import sanitize
from .gate import GateSettings, Verdict, decide, floor_of, gate_kind, gate_note, mean
from .ledger import champion, samples_of, usual_rate, variance_groups
from .runner import RunOutcome, assess, run_child


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
    interrupted: bool = False        # a stop signal arrived; the attempt was still recorded in full
    profile: dict | None = None      # the data profile: name, dataset, recipe overrides

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.interrupted else EXIT_CODES[self.status]


def aggregate(outcomes: list[RunOutcome]) -> dict | None:
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


class Runs:
    """Runs train.py for a candidate: one child per seed, judged into a RunOutcome."""

    def __init__(self, ctx, campaign, d: rc.Draft, run_dir, runner, echo):
        self.ctx, self.c, self.d, self.dir, self.runner, self.echo = ctx, campaign, d, run_dir, runner, echo
        self.index = 0

    def run_seed(self, seed: int) -> RunOutcome:
        self.index += 1
        i, d = self.index, self.dir
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
            wrong = policy.executed_mismatch((out.record or {}).get("executed_files"), self.d.cand_files)
            if wrong:
                out.status, out.reason = "fail", wrong
        if out.status == "ok":
            v = out.metrics.get(self.c.objective)
            self.echo(f"  {self.c.objective} {v:.6f}  ({out.metrics.get('tok_per_sec')} tok/s, "
                      f"{child.duration_s:.0f} s)")
        else:
            self.echo(f"  failed: {out.reason}")
        return out

    def throttled(self, out: RunOutcome, receipts) -> str | None:
        """Why this run looks throttled (tok/s far below the branch's usual), or None."""
        if out.status != "ok":
            return None
        rec = out.record or {}
        usual, n = usual_rate(receipts, rec.get("backend"), rec.get("device"), self.c.throttle_window)
        return policy.throttle_reason((out.metrics or {}).get("tok_per_sec"), usual, n, self.c)


class Attempt:
    """State of one `mlx-ar run` once its candidate exists; see the module docstring."""

    def __init__(self, ctx, campaign, d: rc.Draft, created: bool, runner, sleep, echo, now):
        self.ctx, self.c, self.d, self.created = ctx, campaign, d, created
        self.sleep, self.echo, self.now = sleep, echo, now
        self.outcomes: list[RunOutcome] = []
        run_dir = ctx.root / campaign.runs_dir / f"{d.seq:05d}-{d.cand[:7]}"
        self.runs = Runs(ctx, campaign, d, run_dir, runner, echo)

    def judge(self, receipts, noise) -> Verdict:
        """The gate's verdict on the ok runs so far against the current champion."""
        c, d = self.c, self.d
        contract = next((o.record.get("contract") for o in self.outcomes if o.record), None)
        champ = champion(receipts, c.objective, c.sign, c.allow_smoke, contract=contract)
        other = champion(receipts, c.objective, c.sign, c.allow_smoke) if champ is None else None
        if other is not None:
            return Verdict("refused", f"contract {contract} differs from the champion's {other.get('contract')} "
                           "(data, tokenizer or evaluation changed): start a new branch for the new contract")
        d.champ = champ
        settings = GateSettings.from_campaign(c, gate_kind(c, noise))
        values = [c.sign * o.metrics[c.objective] for o in self.outcomes if o.status == "ok"]
        if champ is None:
            return decide(settings, values, [])
        champ_vals = [c.sign * v for v in samples_of(receipts, noise, champ["surface_sha"], c.objective)]
        if not champ_vals:  # an old receipt without runs: its recorded metric is all there is
            champ_vals = [c.sign * champ["metrics"][c.objective]]
        sha = git_ops.surface_sha(d.cand_files)
        groups = [[c.sign * v for v in g] for g in
                  variance_groups(receipts, noise, c.objective, exclude={champ["surface_sha"], sha})]
        return decide(settings, values, champ_vals, groups)

    def heldout_vetoed(self, receipts, noise) -> str | None:
        """policy.heldout_veto on the held-out bpb of this candidate's runs against the champion's."""
        champ = self.d.champ
        if champ is None or self.c.objective != "val_bpb":
            return None
        champ_vals = (samples_of(receipts, noise, champ["surface_sha"], "heldout_bpb")
                      or [(champ.get("metrics") or {}).get("heldout_bpb")])
        cand = [(o.metrics or {}).get("heldout_bpb") for o in self.outcomes if o.status == "ok"]
        return policy.heldout_veto(cand, champ_vals, floor_of(noise))

    def run_until_decided(self) -> tuple[str, str, bool]:
        """Run seeds until something decides: (status, reason, decided by the gate?)."""
        c, ctx = self.c, self.ctx
        problem = policy.syntax_problem(self.d.cand_files)
        if problem:
            return "crash", problem, False
        retries = 0
        while True:
            seed = self.d.seed + len([o for o in self.outcomes if o.status == "ok"])
            out = self.runs.run_seed(seed)
            if out.status != "ok":
                self.outcomes.append(out)
                return "crash", (out.reason if len(self.outcomes) == 1 else f"seed {seed}: {out.reason}"), False
            receipts, noise = ctx.ledger.receipts(), ctx.ledger.noise()
            why = self.runs.throttled(out, receipts)
            if why and retries < c.suspect_retries:
                retries += 1
                self.echo(f"suspect: {why}")
                if rc.write_suspect(ctx, c, self.d, out, why, self.now):
                    raise KeyboardInterrupt
                if c.suspect_cooldown:
                    self.echo(f"waiting {c.suspect_cooldown:.0f} s before the re-run")
                    self.sleep(c.suspect_cooldown)
                continue
            if why:
                out.notes.append("slow again on re-run: taken as the candidate's own speed")
            retries = 0
            self.outcomes.append(out)
            veto = policy.veto_reason(out.metrics, out.record, receipts, c)
            if veto:
                return "discard", veto, False
            verdict = self.judge(receipts, noise)
            self.d.gate_stats = dict(verdict.stats)
            why = self.heldout_vetoed(receipts, noise) if verdict.action == "keep" else None
            if why:
                return "discard", why, False
            if verdict.action == "more":
                self.echo(f"gate: {verdict.reason}; running another seed")
                continue
            return verdict.action, verdict.reason, verdict.action != "refused"

    def finish(self, status: str, reason: str, recheck: bool = False) -> AttemptResult | None:
        """Keep or restore, then write the receipt, the row and the ledger commit (under the lock).

        With `recheck`, the gate is asked again under the lock first (another worker may have
        kept a new champion since); None means it now wants more runs and nothing was written.
        """
        ctx, c, d = self.ctx, self.c, self.d
        with shielded() as pending, ctx.ledger.lock():
            receipts = ctx.ledger.receipts()
            if recheck:
                fresh = self.judge(receipts, ctx.ledger.noise())
                if fresh.action == "more":
                    self.echo(f"gate: the champion changed meanwhile; {fresh.reason}")
                    return None
                d.gate_stats = dict(fresh.stats)
                status, reason = fresh.action, fresh.reason
            commit = d.cand
            if status == "keep":
                commit = ratchet.keep(ctx, d, self.created)
            else:
                ratchet.restore(ctx, c, d, champion(receipts, c.objective, c.sign, c.allow_smoke))
            metrics = aggregate(self.outcomes)
            receipt = rc.build_receipt(d, status=status, reason=reason, commit=commit, metrics=metrics,
                                       runs=self.outcomes, campaign=c, branch=ctx.branch, worker=ctx.worker,
                                       finished_at=self.now())
            rel = ctx.ledger.write_receipt(receipt)
            value = (metrics or {}).get(c.objective)
            rc.ledger_commit(ctx, f"{d.seq:05d} {status}" + (f" {value:.6f}" if value is not None else "")
                             + f" {d.description}")
            rc.in_flight_path(ctx.ledger, d.seq).unlink(missing_ok=True)
        log = self.outcomes[0].log_path if self.outcomes else None
        return AttemptResult(status, reason, d.seq, rel, commit, metrics, receipt["gate"].get("champion"),
                             receipt["gate"], receipt["runs"], log, d.notes,
                             interrupted=bool(pending) or reason == "interrupted", profile=receipt.get("profile"))


def run_experiment(root, description: str, campaign, *, runner=run_child, sleep=time.sleep, echo=print,
                   now=utc_timestamp, seed: int | None = None) -> AttemptResult:
    """Score the working tree's mutable surface as one experiment; see the module docstring."""
    ctx = open_context(root)
    dataset, profile, _problem = data_profile(campaign)
    c = campaign.for_profile(profile)
    d = rc.Draft(sanitize(description), now(), c.seed if seed is None else int(seed))
    if profile is not None:
        d.profile = {"name": profile.name, "dataset": dataset, "overrides": dict(profile.recipe_overrides)}
    repaired = ctx.ledger.repair()
    if repaired:
        d.notes.append(f"re-added {len(repaired)} results.tsv row(s) for receipts without one")
    lost = rc.record_lost_attempts(ctx, c, now)
    if lost:
        d.notes.append(f"recorded {len(lost)} attempt(s) whose mlx-ar process died as crashes: {', '.join(lost)}")
    receipts, noise = ctx.ledger.receipts(), ctx.ledger.noise()
    note = gate_note(c, noise)
    if note:
        d.notes.append(note)

    def refuse(reason: str) -> AttemptResult:
        seq, rel, head, stopped = rc.write_refusal(ctx, c, d, reason, now)
        echo(f"refused: {reason}")
        return AttemptResult("refused", reason, seq, rel, head, notes=d.notes, interrupted=stopped,
                             profile=d.profile)

    # --- 1. refusals: nothing is touched but the ledger ----------------------------------------
    head = git_ops.head_sha(ctx.repo)
    d.base = head
    worktree = git_ops.read_worktree(ctx.root, c.mutable)
    d.cand_files, d.base_files = worktree, git_ops.read_commit(ctx.repo, head, c.mutable)
    why = policy.unrelated_reason(git_ops.status_paths(ctx.repo), c) or policy.missing_reason(worktree)
    if why:
        return refuse(why)
    try:
        parent = ratchet.hand_commit_base(ctx, c, receipts, head)
    except ratchet.Refusal as e:
        return refuse(str(e))
    if parent is not None:  # a commit made by hand on the ledger is the candidate
        d.base, d.base_files = parent, git_ops.read_commit(ctx.repo, parent, c.mutable)
        if not d.description:
            d.description = sanitize(git_ops.commit_info(ctx.repo, head)["message"])
    champ = champion(receipts, c.objective, c.sign, c.allow_smoke)
    ref_files = git_ops.read_commit(ctx.repo, champ["commit"], c.mutable) if champ else d.base_files
    why = (policy.already_scored_reason(receipts, worktree, c)
           or (policy.config_tier_reason(c, ref_files, worktree) if champ else None)
           or policy.inert_reason(c.backend, ref_files, worktree)
           or policy.eval_data_reason(worktree)
           or policy.overridden_reason(profile, ref_files.get("train.py"), worktree.get("train.py"))
           or policy.description_reason(d.description))
    if why:
        return refuse(why)
    overridden = policy.overridden_note(profile, ref_files.get("train.py"), worktree.get("train.py"))
    if overridden:
        d.notes.append(overridden)

    # --- 2. the candidate commit (signals wait until it is marked in flight) ---------------------
    with shielded() as pending:
        d.seq = ctx.ledger.reserve_seq()
        created = ratchet.candidate(ctx, c, d, worktree, folded=parent is not None)
        a = Attempt(ctx, c, d, created, runner, sleep, echo, now)
        rc.mark_in_flight(ctx, d, str(a.runs.dir.relative_to(ctx.root)))
    echo(f"attempt {d.seq:05d} on {ctx.branch}: {d.description} (candidate {d.cand[:7]}, "
         f"gate {gate_kind(c, noise)})")

    # --- 3. runs until the gate decides, 4. bookkeeping ------------------------------------------
    while True:
        try:
            if pending:
                raise KeyboardInterrupt
            status, reason, by_gate = a.run_until_decided()
        except KeyboardInterrupt:
            result = a.finish("crash", "interrupted")
            echo("interrupted: recorded as a crash, the mutable surface restored to the champion")
            raise Interrupted(result) from None
        result = a.finish(status, reason, recheck=by_gate)
        if result is not None:
            return result

