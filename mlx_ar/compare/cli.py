"""`mlx-ar compare`, `mlx-ar transplant` and `mlx-ar plot`.

    mlx-ar compare                         # all autoresearch/* branches, local and remote-tracking
    mlx-ar compare --fetch --json          # fetch every remote first; machine-readable output
    mlx-ar transplant --from mar5-h100 --keys MATRIX_LR,DEPTH
    mlx-ar plot                            # runs/plots/progress.png and .svg (gitignored)
    mlx-ar plot --out ~/progress.png       # anywhere; inside the repository it is git-excluded

git and matplotlib are imported only when a command runs, so `mlx-ar --help` stays fast.
"""
from pathlib import Path

import click

from .branches import CompareError
from .plot import DEFAULT_PLOT_PATH

_repo_option = click.option("--repo", "repo_path", default=".", show_default=True,
                            type=click.Path(file_okay=False), help="Repository to read (any path inside it).")


def _echo_err(msg):
    click.echo(msg, err=True)


def _load(repo_path, names, fetch):
    """(repo, ledgers) for the named branches, or every autoresearch/* branch when none is named."""
    from .branches import fetch_remotes, list_branches, open_repo, read_branch, resolve_branch

    repo = open_repo(repo_path)
    if fetch:
        fetch_remotes(repo, _echo_err)
    refs = [resolve_branch(repo, n) for n in names] if names else list_branches(repo)
    if not refs:
        raise CompareError(
            f"no autoresearch/* branches in {repo.working_tree_dir or repo.git_dir} "
            "(name branches to compare, or `--fetch` the remotes' branches)"
        )
    _echo_err(f"reading {len(refs)} branch{'es' if len(refs) != 1 else ''} ...")
    return repo, [read_branch(repo, ref) for ref in refs]


@click.command("compare")
@click.argument("branches", nargs=-1)
@click.option("--fetch", is_flag=True, help="Run `git fetch` on every remote first.")
@click.option("--json", "as_json", is_flag=True, help="Print the comparison as JSON.")
@_repo_option
def compare_command(branches, fetch, as_json, repo_path):
    """Compare experiment branches: per-machine results, recipe diffs, universal vs specific changes.

    BRANCHES default to every autoresearch/* branch (local and remote-tracking); a bare
    <tag>-<machine> name is looked up under autoresearch/. Branches under different contracts
    are grouped and never ranked together.
    """
    from .branches import recipe_reader
    from .report import build_report, format_text, to_json

    try:
        repo, ledgers = _load(repo_path, branches, fetch)
    except CompareError as e:
        raise click.ClickException(str(e)) from None
    report = build_report(ledgers, recipe_reader(repo))
    click.echo(to_json(report) if as_json else format_text(report).rstrip("\n"))


def _split_keys(values):
    keys = []
    for v in values:
        keys += [k.strip() for k in v.split(",") if k.strip()]
    return keys


@click.command("transplant")
@click.option("--from", "source", required=True, metavar="BRANCH", help="Branch whose best recipe to carry over.")
@click.option("--keys", "keys", multiple=True, metavar="K[,K...]",
              help="Only these constants (repeat or comma-separate). Default: the branch's baseline->best deltas.")
@click.option("--no-commit", is_flag=True, help="Write train.py but leave it uncommitted.")
@_repo_option
def transplant_command(source, keys, no_commit, repo_path):
    """Apply another branch's recipe deltas to the current train.py as a candidate commit."""
    from .branches import open_repo
    from .transplant import transplant

    try:
        repo = open_repo(repo_path)
        result = transplant(repo, source, keys=_split_keys(keys) or None, commit=not no_commit)
    except CompareError as e:
        raise click.ClickException(str(e)) from None
    plan = result.plan
    click.echo(f"from {plan.source} @ {plan.best_commit[:7]} (val_bpb {plan.best_bpb:.6f}):")
    for k, v in plan.updates.items():
        click.echo(f"  {k} = {v!r}")
    if plan.already:
        click.echo(f"already equal here: {', '.join(plan.already)}")
    if plan.refused:
        click.echo(f"refused (train.py here does not define them; the current backend does not know them): "
                   f"{', '.join(plan.refused)}")
    if plan.removed:
        click.echo(f"not carried (removed on {plan.source}): {', '.join(plan.removed)}")
    for note in plan.notes:
        click.echo(f"note: {note}")
    if result.commit:
        click.echo(f"committed candidate {result.commit[:7]}; score it with `mlx-ar run`")
    else:
        summary = plan.message().splitlines()[0]
        click.echo(f"{result.path} written, not committed; score it with `mlx-ar run -m {summary!r}`")


@click.command("plot")
@click.argument("branches", nargs=-1)
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help=f"PNG to write (default: <repo>/{DEFAULT_PLOT_PATH}); the SVG goes beside it with the same stem.")
@click.option("--no-svg", is_flag=True, help="Write only the PNG.")
@click.option("--fetch", is_flag=True, help="Run `git fetch` on every remote first.")
@_repo_option
def plot_command(branches, out, no_svg, fetch, repo_path):
    """Plot val_bpb per experiment for each branch, and size vs score.

    The files never block `mlx-ar run`: by default they go under runs/ (ignored by git and by
    the ledger); a path given with --out inside the repository is added to .git/info/exclude.
    """
    from .plot import plot_progress

    if out is not None and Path(out).suffix.lower() != ".png":
        raise click.BadParameter(f"{out} must end in .png (the SVG is written beside it)", param_hint="--out")
    try:
        repo, ledgers = _load(repo_path, branches, fetch)
        root = Path(repo.working_tree_dir) if repo.working_tree_dir else Path(repo_path)
        if out is None:
            out = root / DEFAULT_PLOT_PATH
            out.parent.mkdir(parents=True, exist_ok=True)
        paths = plot_progress(ledgers, out, svg=not no_svg)
        if repo.working_tree_dir:
            from ..ledger.git_ops import exclude_paths

            exclude_paths(root, paths)
    except CompareError as e:
        raise click.ClickException(str(e)) from None
    click.echo("wrote " + ", ".join(str(p) for p in paths))
