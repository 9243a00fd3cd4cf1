"""Click commands of the research loop: `mlx-ar run`, `noise`, `results`, `workers`.

Everything heavier than click (the attempt, git, the ledger) is imported inside the commands so
`mlx-ar --help` stays instant. Settings come from campaign.toml (see mlx_ar.ledger.campaign); the options
here default to None and only override the file when given.

Exit codes of `mlx-ar run`: 0 keep or discard, 1 crash, 2 refused, 130 interrupted (SIGINT,
SIGTERM or SIGHUP: the attempt is recorded as a crash and train.py restored first).
"""
import json
import sys

import click


def _campaign(root, path, **overrides):
    from .campaign import CampaignError, load_campaign

    try:
        return load_campaign(root, path, overrides)
    except CampaignError as e:
        raise click.ClickException(str(e)) from None


def _training_campaign(root, path, **overrides):
    """The settings of commands that train: the memory ceiling follows this machine unless set
    (asked only here, since on a Mac it queries Metal)."""
    from ..backends.mlx.memory import default_max_memory_gb

    campaign = _campaign(root, path, **overrides)
    return campaign.for_machine(default_max_memory_gb() if campaign.backend == "mlx" else None)


def _echo_err(text):
    try:
        click.echo(text, err=True)
    except OSError:  # the terminal is gone (SIGHUP): the ledger still records everything
        _detach_from_terminal()


def _echo_out(text):
    try:
        click.echo(text)
    except OSError:
        _detach_from_terminal()


def _detach_from_terminal():
    """Send further output nowhere: a closed terminal must not turn exit 130 into a flush error."""
    import os

    sys.stdout = sys.stderr = open(os.devnull, "w")


def _stop_signals_interrupt():
    """SIGTERM (a supervisor) and SIGHUP (a closed terminal) are handled like Ctrl-C."""
    from .context import stop_signals_interrupt

    stop_signals_interrupt()


def _keep_awake():
    """On a Mac, hold an idle-sleep assertion for as long as this process lives, and say so once."""
    from ..backends.mlx.power import keep_awake

    if keep_awake() is not None:
        _echo_err("keeping this Mac awake while this runs (caffeinate -i; it ends with this process)")


def _fail_on_setup_errors(fn):
    """Turn the loop's precondition errors into one-line messages instead of tracebacks."""
    from .context import LoopError, WorkerError
    from .git_ops import GitError
    from .ledger import LedgerError

    try:
        return fn()
    except (GitError, LedgerError, LoopError, WorkerError) as e:
        raise click.ClickException(str(e)) from None


campaign_option = click.option("--campaign", "campaign_path", type=click.Path(dir_okay=False), default=None,
                               help="campaign TOML (default: ./campaign.toml if present)")


@click.command("run")
@click.option("-m", "--message", "message", required=True, help="what changed (one line; the commit message)")
@campaign_option
@click.option("--seed", type=int, default=None, help="first seed (default: the campaign's)")
@click.option("--gate", type=click.Choice(["auto", "single", "significance"]), default=None,
              help="override the keep gate")
@click.option("-v", "--verbose", is_flag=True, help="also stream train.py's output")
def run_command(message, campaign_path, seed, gate, verbose):
    """Commit train.py, train once (or until the gate decides), keep it or revert it, log it.

    Run from the repository root after editing train.py. Exit code: 0 keep/discard, 1 crash,
    2 refused, 130 interrupted. The result block at the end is grep-friendly.
    """
    from pathlib import Path

    from .attempt import run_experiment
    from .context import Interrupted
    from .runner import run_child

    root = Path.cwd()
    campaign = _training_campaign(root, campaign_path, gate=gate)
    _stop_signals_interrupt()
    _keep_awake()

    def runner(*args, **kw):
        if verbose:
            kw["tee"] = lambda chunk: (sys.stderr.buffer.write(chunk), sys.stderr.flush())
        return run_child(*args, **kw)

    try:
        result = _fail_on_setup_errors(lambda: run_experiment(root, message, campaign, runner=runner, echo=_echo_err,
                                                              seed=seed))
    except Interrupted as e:
        _print_result(e.result, campaign)
        sys.exit(130)
    except KeyboardInterrupt:  # before a candidate existed: there was nothing to record
        _echo_err("interrupted before the experiment started; nothing was run or recorded")
        sys.exit(130)
    _print_result(result, campaign)
    sys.exit(result.exit_code)


def _print_result(r, campaign):
    obj = campaign.objective
    m = r.metrics or {}
    lines = ["---", f"{'status:':<14}{r.status}"]
    if m.get(obj) is not None:
        lines.append(f"{obj + ':':<14}{m[obj]:.6f}")
    if r.champion and r.champion.get("value") is not None:
        # What the gate compared against: the mean of all the champion's runs (noise runs included).
        ref, n = r.gate.get("champion_mean", r.champion["value"]), r.gate.get("champion_n", 1)
        lines.append(f"{'champion:':<14}{ref:.6f} ({str(r.champion.get('commit'))[:7]}"
                     + (f", mean of {n} runs)" if n > 1 else ")"))
    if m.get("peak_vram_mb") is not None:
        lines.append(f"{'memory_gb:':<14}{m['peak_vram_mb'] / 1024:.1f}")
    if m.get("tok_per_sec") is not None:
        lines.append(f"{'tok_per_sec:':<14}{m['tok_per_sec']}")
    ok_runs = [x for x in r.runs if x.get("status") == "ok"]
    if r.runs:
        lines.append(f"{'runs:':<14}{len(ok_runs)} ok of {len(r.runs)} (seeds {', '.join(str(x['seed']) for x in r.runs)})")
    lines.append(f"{'reason:':<14}{r.reason}")
    if r.commit:
        lines.append(f"{'commit:':<14}{r.commit[:7]}")
    if r.receipt:
        lines.append(f"{'receipt:':<14}{r.receipt}")
    if r.log:
        lines.append(f"{'log:':<14}{r.log}")
    overrides = (r.profile or {}).get("overrides")
    if overrides:
        shown = " ".join(f"{k}={v}" for k, v in overrides.items())
        lines.append(f"{'overrides:':<14}{shown} (the {r.profile.get('name')} profile sets these; "
                     "edits of them alone are refused)")
    for n in r.notes:
        lines.append(f"{'note:':<14}{n}")
    if r.interrupted:
        lines.append(f"{'interrupted:':<14}yes (exit 130)")
    _echo_out("\n".join(lines))


@click.command("noise")
@click.option("-k", "--runs", type=click.IntRange(min=2), default=None,
              help="runs of the champion (default: the campaign's noise_runs)")
@campaign_option
def noise_command(runs, campaign_path):
    """Measure the noise floor: re-run the champion with fresh seeds, store noise.json.

    The significance gate pools this spread with every repeated run in the ledger.
    """
    from pathlib import Path

    from .noise import measure_noise, noise_summary

    root = Path.cwd()
    campaign = _training_campaign(root, campaign_path)
    _stop_signals_interrupt()
    _keep_awake()
    try:
        data = _fail_on_setup_errors(lambda: measure_noise(root, campaign, runs=runs, echo=_echo_err))
    except KeyboardInterrupt:
        _echo_err("interrupted: the noise floor was not stored")
        sys.exit(130)
    for line in noise_summary(data, campaign):
        click.echo(line)


@click.command("results")
@click.option("--json", "as_json", is_flag=True, help="print the rows and summary as JSON")
@click.option("--last", type=click.IntRange(min=0), default=30, show_default=True, help="rows shown (0: all)")
def results_command(as_json, last):
    """The ledger as a table: recent attempts, best so far, counts and the kept trajectory."""
    from pathlib import Path

    from .context import open_context
    from .ledger import row_for
    from .results import format_results, summarize

    ctx = _fail_on_setup_errors(lambda: open_context(Path.cwd()))
    # Every receipt, refusals and suspect runs included (results.tsv holds only scored rows).
    receipts = _fail_on_setup_errors(ctx.ledger.receipts)
    rows = [{**row_for(r, r["_path"]), "reason": r.get("reason")} for r in receipts]
    summary = summarize(rows, _fail_on_setup_errors(ctx.ledger.noise))
    if as_json:
        click.echo(json.dumps({**summary, "branch": ctx.ledger_branch, "rows": rows}, indent=2))
        return
    if not rows:
        click.echo(f"no attempts yet on {ctx.ledger_branch}; score the baseline with: mlx-ar run -m \"baseline\"")
        return
    click.echo(f"ledger of {ctx.ledger_branch} ({ctx.ledger.root})")
    click.echo(format_results(summary, rows, last=last or None))


@click.command("workers")
@click.argument("n", type=click.IntRange(min=1))
@click.option("--dir", "workers_dir", type=click.Path(file_okay=False), default=None,
              help="where the worktrees go (default: <repo>-workers next to the repository)")
@click.option("--gpus", default=None, help="comma-separated CUDA device ids, one per worker (default: 0..N-1)")
@campaign_option
def workers_command(n, workers_dir, gpus, campaign_path):
    """Create (or refresh) N worker worktrees that share this checkout's ledger.

    Then run one agent per worktree: `cd <worktree> && mlx-ar run -m "..."`. Each worker has
    its own runs/ directory and (cuda) its own GPU; every candidate is judged against the
    global champion.
    """
    from pathlib import Path

    from .workers import setup_workers

    root = Path.cwd()
    campaign = _campaign(root, campaign_path)
    gpu_list = None
    if gpus:
        try:
            gpu_list = [int(x) for x in gpus.split(",") if x.strip()]
        except ValueError:
            raise click.BadParameter(f"--gpus takes comma-separated integers, got {gpus!r}") from None
    infos = _fail_on_setup_errors(lambda: setup_workers(root, n, workers_dir=workers_dir, gpus=gpu_list,
                                                        campaign=campaign, echo=_echo_err))
    for w in infos:
        state = "new" if w.created else "existing"
        click.echo(f"{w.name}  {state:8}  {w.branch:40}  {w.path}  {w.note}")
    click.echo(f"\nshared ledger: {root} · run one agent per worktree: cd {infos[0].path} && mlx-ar run -m \"...\"")
