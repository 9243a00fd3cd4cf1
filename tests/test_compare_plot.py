"""`mlx-ar plot`: progress.png and .svg from every branch's ledger."""
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_builder import Campaign, git_identity, standard  # noqa: E402

from mlx_ar.compare.branches import CompareError, list_branches, open_repo, read_branch  # noqa: E402
from mlx_ar.compare.cli import plot_command  # noqa: E402
from mlx_ar.compare.analysis import summarize  # noqa: E402
from mlx_ar.compare.plot import _rows, _series, _y_limits, plot_progress  # noqa: E402
from test_compare_builder import CONTRACT_DEMO, CONTRACT_REAL  # noqa: E402

__all__ = ["git_identity", "standard"]  # fixtures, imported to apply here

pytest.importorskip("matplotlib")  # the `plot` extra; CI installs it


def _ledgers(camp):
    repo = open_repo(camp.root)
    return [read_branch(repo, r) for r in list_branches(repo)]


def test_series_marks_frontier_discards_and_crashes(standard):
    m4 = next(lg for lg in _ledgers(standard) if lg.name == "autoresearch/mar5-m4max")
    s = _series(m4, m4.attempts[0].contract)
    assert s["keep"] == [(1, 1.1), (2, 1.08), (5, 1.07)]
    assert s["discard"] == [(3, 1.09)] and s["crash"] == [4]
    assert s["frontier"] == [(1, 1.1), (2, 1.08), (5, 1.07)]
    assert sorted(p for p, _, _ in s["size"]) == [11.5, 11.5, 11.5, 17.0]


def test_series_draws_only_scored_attempts_as_points():
    from mlx_ar.compare.branches import Attempt, BranchLedger

    attempts = [Attempt(1, "keep", "a", metrics={"val_bpb": 1.2}, contract="c"),
                Attempt(2, "suspect", "b", metrics={"val_bpb": 1.1}, contract="c"),   # throttled: not a score
                Attempt(3, "discard", "c", metrics={"val_bpb": 1.3}, contract="other"),
                Attempt(4, "discard", "d", metrics={"val_bpb": 1.25}, contract="c")]
    s = _series(BranchLedger("autoresearch/x", "refs/heads/autoresearch/x", "t", attempts), "c")
    assert s["keep"] == [(1, 1.2)] and s["discard"] == [(4, 1.25)] and s["crash"] == []


def test_one_row_per_contract_and_wild_discards_clipped(standard):
    ledgers = _ledgers(standard)
    assert _rows([summarize(lg) for lg in ledgers]) == [CONTRACT_REAL, CONTRACT_DEMO]
    kept = [1.10, 1.08, 1.07, 1.00, 0.98, 0.96]
    lo, hi = _y_limits(kept + [1.09, 1.50], kept)
    assert lo < 0.96 and 1.10 < hi < 1.50  # the diverged 1.50 run goes to the top edge
    lo, hi = _y_limits([1.2, 1.3], [])  # nothing kept yet: everything in frame
    assert lo < 1.2 and hi > 1.3


def test_plot_writes_png_and_svg(standard, tmp_path):
    paths = plot_progress(_ledgers(standard), tmp_path / "progress.png")
    assert paths == [tmp_path / "progress.png", tmp_path / "progress.svg"]
    png, svg = (p.read_bytes() for p in paths)
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 20_000
    assert b"<svg" in svg[:2000] and len(svg) > 20_000
    assert not list(tmp_path.glob("*.tmp"))


def test_plot_without_scores(tmp_path):
    camp = Campaign(tmp_path / "r")
    c = camp.branch("t-mini", machine="mini")
    c.run("crash", description="baseline OOM")
    camp.branch("t-empty")
    paths = plot_progress(_ledgers(camp), tmp_path / "p.png", svg=False)
    assert paths == [tmp_path / "p.png"] and (tmp_path / "p.png").stat().st_size > 5_000
    assert not (tmp_path / "p.svg").exists()


def test_plot_missing_directory_and_missing_matplotlib(standard, tmp_path, monkeypatch):
    with pytest.raises(CompareError, match="directory .*nowhere does not exist"):
        plot_progress(_ledgers(standard), tmp_path / "nowhere" / "p.png")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if the extra were not installed
    with pytest.raises(CompareError, match=r"pip install 'mlx-autoresearch\[plot\]'"):
        plot_progress(_ledgers(standard), tmp_path / "p.png")


def test_cli_plot_default_path(standard, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    result = runner.invoke(plot_command, ["--repo", str(standard.root)])
    assert result.exit_code == 0, result.output
    # Under the repository's runs/, never where a run would see it as a stray file.
    png, svg = standard.root / "runs/plots/progress.png", standard.root / "runs/plots/progress.svg"
    assert f"wrote {png}, {svg}" in result.output
    assert png.stat().st_size > 0 and svg.stat().st_size > 0 and not (tmp_path / "progress.png").exists()
    status = lambda: subprocess.run(["git", "status", "--porcelain"], cwd=standard.root,  # noqa: E731
                                    capture_output=True, text=True, check=True).stdout
    assert status() == ""
    # A path the user names inside the repository is kept out of `git status` too.
    result = runner.invoke(plot_command, ["--repo", str(standard.root), "--out", str(standard.root / "mine.png")])
    assert result.exit_code == 0 and (standard.root / "mine.svg").exists() and status() == ""
    result = runner.invoke(plot_command, ["--repo", str(standard.root), "--out", "x.jpg"])
    assert result.exit_code == 2 and "must end in .png" in result.output
    result = runner.invoke(plot_command, ["--repo", str(standard.root), "--no-svg", "--out", "two.png",
                                          "mar5-h100", "mar5-m4max"])
    assert result.exit_code == 0 and (tmp_path / "two.png").exists() and not (tmp_path / "two.svg").exists()
