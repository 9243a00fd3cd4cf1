"""The noise floor: how much the objective moves between seeds of one unchanged train.py.

`measure_noise` re-runs the champion with fresh seeds and stores the spread in noise.json
(`mlx-ar noise`); `noise_summary` says what each gate does at that floor. The floor decides
the default gate (see gate.gate_kind).
"""
import time

from ..harness.summary import utc_timestamp
from . import git_ops, policy, receipts as rc
from .campaign import data_profile
from .context import LoopError, open_context, shielded
from .format import NOISE_SCHEMA
from .attempt import Runs
from .gate import GateSettings, detectable_gain, detection_text, false_keep_rate, floor_of, gate_kind, mean, std
from .ledger import champion, noise_measurements, samples_of
from .runner import run_child

def measure_noise(root, campaign, *, runs: int | None = None, runner=run_child, sleep=time.sleep,
                  echo=print, now=utc_timestamp) -> dict:
    """Run the champion `runs` times with fresh seeds; store and commit noise.json; return it."""
    ctx = open_context(root)
    c = campaign.for_profile(data_profile(campaign)[1])
    k = runs or c.noise_runs
    if k < 2:
        raise LoopError(f"the noise floor needs at least 2 runs, got {k}")
    ctx.ledger.repair()
    rc.record_lost_attempts(ctx, c, now)
    receipts = ctx.ledger.receipts()
    champ = champion(receipts, c.objective, c.sign, c.allow_smoke)
    if champ is None:
        raise LoopError('no kept run yet: score the baseline first with `mlx-ar run -m "baseline"`')
    unrelated = sorted(p for p in git_ops.status_paths(ctx.repo) if not policy.owned(p, c))
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
    d = rc.Draft("noise floor", now(), c.seed, cand=champ["commit"], cand_files=champ_files, base_files=champ_files)
    stamp = now().replace(":", "").replace("-", "")
    r = Runs(ctx, c, d, ctx.root / c.runs_dir / f"noise-{champ['commit'][:7]}-{stamp}", runner, echo)
    outcomes, seed, retries = [], c.seed, 0
    echo(f"noise floor: {k} runs of the champion {champ['commit'][:7]} ({c.objective} "
         f"{champ['metrics'][c.objective]:.6f})")
    while len(outcomes) < k:
        while seed in used:
            seed += 1
        out = r.run_seed(seed)
        if out.status != "ok":
            raise LoopError(f"a noise run of the champion failed (seed {seed}): {out.reason}; "
                            f"log: {out.log_path}. Nothing was stored")
        why = r.throttled(out, receipts)
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
    earlier = samples_of(receipts, None, sha, c.objective)
    everything = earlier + values
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
    sd = floor_of(data)
    if sd is not None:
        gain, _runs = detectable_gain(GateSettings.from_campaign(c, "significance"), sd, max(2, len(everything)))
        data["detectable_gain"] = gain
    with shielded() as pending, ctx.ledger.lock():
        # Read again under the lock: another worker may have stored a measurement during these runs.
        data["previous"] = [{k2: v for k2, v in m.items() if k2 not in ("previous", "runs")}
                            for m in noise_measurements(ctx.ledger.noise())]
        ctx.ledger.write_noise(data)
        rc.ledger_commit(ctx, f"noise floor sd={data['floor']:.6f} over {len(everything)} runs of "
                              f"{champ['commit'][:7]}")
    if pending:
        raise KeyboardInterrupt
    return data


def noise_summary(data: dict, campaign) -> list[str]:
    """Lines that explain a noise floor: spread, and what each gate would do with it."""
    sd = data["floor"]
    n_new, n_all = data["n"], data["n_with_receipts"]
    earlier = n_all - n_new
    runs = f"{n_new} new run{'s' if n_new != 1 else ''}" + (
        f" and {earlier} earlier run{'s' if earlier != 1 else ''} of the same train.py ({n_all} in all)"
        if earlier else "")
    lines = [f"noise floor: sd {sd:.6f} of {data['objective']} over {runs} of {data['commit'][:7]} "
             f"(mean of the new runs {data['mean']:.6f})"]
    if floor_of(data) is None:
        return lines
    n = max(2, n_all)
    single = false_keep_rate(GateSettings("single", campaign.min_delta), sd, n, trials=1000)
    lines.append(f"gate single: keeps an unchanged recipe {100 * single:.0f}% of the time")
    sig = GateSettings.from_campaign(campaign, "significance")
    aa = false_keep_rate(sig, sd, n, trials=1000)
    lines.append(f"gate significance (confidence {campaign.confidence:g}): keeps an unchanged recipe "
                 f"{100 * aa:.0f}% of the time; {detection_text(campaign, data, sd, n)}")
    lines.append(f"this campaign decides with: {gate_kind(campaign, data)}"
                 + (" (gate = \"auto\")" if campaign.gate == "auto" else ""))
    return lines
