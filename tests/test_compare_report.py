"""Branch discovery, ledger reading through git objects, and the comparison report (text, JSON, CLI)."""
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_builder import (  # noqa: E402
    CONTRACT_DEMO, CONTRACT_REAL, BranchBuilder, Campaign, git_identity, standard,
)

from mlx_ar.compare.branches import (  # noqa: E402
    CompareError, fetch_remotes, list_branches, read_branch, recipe_reader, resolve_branch,
)
from mlx_ar.compare.cli import compare_command  # noqa: E402
from mlx_ar.compare.report import build_report, format_text  # noqa: E402

__all__ = ["git_identity", "standard"]  # fixtures must be importable here to apply


def _report(camp, names=None):
    repo = camp.repo
    refs = [resolve_branch(repo, n) for n in names] if names else list_branches(repo)
    return build_report([read_branch(repo, r) for r in refs], recipe_reader(repo))


def _branch(report, name):
    return next(b for b in report["branches"] if b["name"] == name)


# --- discovery and reading -------------------------------------------------------------------------


def test_lists_only_autoresearch_branches(standard):
    names = [b.name for b in list_branches(standard.repo)]
    assert names == ["autoresearch/mar5-empty", "autoresearch/mar5-h100", "autoresearch/mar5-m4max",
                     "autoresearch/mar5-mini", "autoresearch/mar5-mini-demo"]


def test_read_branch_from_git_objects_without_checkout(standard):
    repo = standard.repo
    before = (repo.active_branch.name, repo.head.commit.hexsha, (standard.root / "train.py").read_text())
    ledger = read_branch(repo, resolve_branch(repo, "mar5-m4max"))
    assert [a.status for a in ledger.attempts] == ["keep", "keep", "discard", "crash", "keep"]
    assert [a.seq for a in ledger.attempts] == [1, 2, 3, 4, 5]
    assert ledger.noise_floor == pytest.approx(0.004)
    assert ledger.source == "receipts" and ledger.notes == []
    assert ledger.attempts[3].val_bpb is None and ledger.attempts[4].val_bpb == pytest.approx(1.07)
    after = (repo.active_branch.name, repo.head.commit.hexsha, (standard.root / "train.py").read_text())
    assert before == after
    assert not (standard.root / "receipts").exists()  # main's working tree never saw the ledger


def test_resolve_branch_names_and_unknown(standard):
    repo = standard.repo
    assert resolve_branch(repo, "mar5-h100").name == "autoresearch/mar5-h100"
    assert resolve_branch(repo, "autoresearch/mar5-h100").ref == "refs/heads/autoresearch/mar5-h100"
    with pytest.raises(CompareError, match=r"no branch named 'mar5-nope'.*autoresearch/mar5-h100"):
        resolve_branch(repo, "mar5-nope")


# --- the report --------------------------------------------------------------------------------------


def test_table_per_branch(standard):
    report = _report(standard)
    m4 = _branch(report, "autoresearch/mar5-m4max")
    assert (m4["machine"], m4["backend"], m4["device"]) == ("m4max", "mlx", "Apple M4 Max (40-core GPU)")
    assert (m4["experiments"], m4["keeps"], m4["discards"], m4["crashes"], m4["other"]) == (5, 3, 1, 1, 0)
    assert m4["baseline_bpb"] == pytest.approx(1.10) and m4["best_bpb"] == pytest.approx(1.07)
    assert m4["gain"] == pytest.approx(0.03)
    assert m4["best_metrics"]["num_steps"] == 910 and m4["best_metrics"]["tok_per_sec"] == 152_000
    assert m4["noise_floor"] == pytest.approx(0.004)
    h = _branch(report, "autoresearch/mar5-h100")
    assert (h["experiments"], h["keeps"], h["discards"], h["crashes"]) == (4, 3, 1, 0)
    assert h["best_bpb"] == pytest.approx(0.96) and h["gain"] == pytest.approx(0.04)
    assert h["best_metrics"]["num_steps"] == 4200 and h["noise_floor"] is None


def test_contracts_grouped_never_ranked_together(standard):
    report = _report(standard)
    assert [g["contract"] for g in report["groups"]] == [CONTRACT_REAL, CONTRACT_DEMO]
    assert report["groups"][0]["ranking"] == ["autoresearch/mar5-h100", "autoresearch/mar5-m4max"]
    assert report["groups"][1]["ranking"] == ["autoresearch/mar5-mini-demo"]
    (diff,) = report["contract_differences"]
    assert diff["differs"] == {
        "profile": ["real", "demo"], "time_budget": [300, 60], "eval.tokens": [1572864, 65536],
        "vocab_size": [8192, 2048],
    }
    text = format_text(report)
    assert "eval.tokens 1572864 vs 65536" in text and "profile 'real' vs 'demo'" in text


def test_crash_only_and_empty_branches_not_ranked(standard):
    report = _report(standard)
    assert report["unranked"] == [
        {"branch": "autoresearch/mar5-empty", "reason": "no ledger yet"},
        {"branch": "autoresearch/mar5-mini", "reason": "only crashes"},
    ]
    mini = _branch(report, "autoresearch/mar5-mini")
    assert (mini["experiments"], mini["crashes"], mini["best_bpb"]) == (2, 2, None)
    empty = _branch(report, "autoresearch/mar5-empty")
    assert (empty["runs"], empty["machine"], empty["contract"]) == (0, "empty", None)  # from the branch name


def test_recipe_diff_and_universal_vs_specific(standard):
    report = _report(standard)
    rows = {r["key"]: r for r in report["recipe_diff"]}
    assert set(rows) == {"DEPTH", "MATRIX_LR", "WARMDOWN_RATIO", "COMPILE_MODE"}
    assert rows["DEPTH"]["values"]["autoresearch/mar5-h100"] == 12
    assert rows["DEPTH"]["values"]["autoresearch/mar5-m4max"] == 8  # discarded there
    assert rows["DEPTH"]["changed"] == ["autoresearch/mar5-h100"]
    assert "autoresearch/mar5-m4max" not in rows["COMPILE_MODE"]["values"]
    changes = {c["key"]: c for c in report["changes"]}
    assert changes["MATRIX_LR"]["kind"] == "universal" and changes["MATRIX_LR"]["direction"] == "down"
    assert changes["MATRIX_LR"]["machines"] == ["h100", "m4max", "mini"]
    assert changes["DEPTH"]["kind"] == "hardware-specific" and changes["DEPTH"]["machines"] == ["h100"]
    assert changes["WARMDOWN_RATIO"]["kind"] == "hardware-specific"
    assert changes["COMPILE_MODE"]["direction"] == "added = 'max-autotune'"
    assert [c["key"] for c in report["changes"]][0] == "MATRIX_LR"  # universal first


def test_text_report_lines(standard):
    text = format_text(_report(standard))
    lines = text.splitlines()
    assert lines[0].startswith(f"contract {CONTRACT_REAL} -- 2 branches, ranked")
    h_row = next(line for line in lines if line.strip().startswith("1  mar5-h100"))
    assert h_row.split()[-7:] == ["0", "1.000000", "0.960000", "0.040000", "4200", "880000", "-"]
    m_row = next(line for line in lines if line.strip().startswith("2  mar5-m4max"))
    assert m_row.split()[-7:] == ["0", "1.100000", "1.070000", "0.030000", "910", "152000", "0.004000"]
    assert any(line.split()[:2] == ["mar5-mini", "mini"] and line.endswith("only crashes") for line in lines)
    depth = next(line for line in lines if line.strip().startswith("DEPTH "))
    assert "12*" in depth and " 8 " in depth + " "
    assert any(line.strip().startswith("universal") and "MATRIX_LR" in line for line in lines)


def test_seed_runs_weight_scores_and_smoke_excluded(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-x", machine="x", device="X")
    b.run("keep", 1.10, description="baseline")
    # The significance gate re-ran this candidate: one receipt, three seed runs, metrics = mean.
    c = b.run("keep", change={"DEPTH": 9}, seeds=[1.04, 1.06, 1.05])
    b.run("keep", 1.02, commit=c, seed=7)  # and a later receipt of the same commit, one run
    b.run("keep", 0.50, change={"DEPTH": 10}, smoke=True)  # a smoke run: never scored
    b.run("discard", 1.01, contract="otherfingerprint")
    (s,) = _report(camp)["branches"]
    assert s["best_commit"] == c and s["best_runs"] == 4
    assert s["best_bpb"] == pytest.approx((3 * 1.05 + 1.02) / 4)
    assert s["experiments"] == 3 and s["smoke_runs"] == 1 and s["other_contract_runs"] == 1
    assert any("smoke" in n for n in s["notes"]) and any("another contract" in n for n in s["notes"])


def test_ties_go_to_the_later_keep(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-x", machine="x")
    b.run("keep", 1.10, description="baseline")
    b.run("keep", 1.05, change={"DEPTH": 9})
    later = b.run("keep", 1.05, change={"EMBED_LR": 0.5})
    (s,) = _report(camp)["branches"]
    assert s["best_commit"] == later


def test_noise_floor_read_defensively(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-x", machine="x")
    b.run("keep", 1.1, description="baseline")
    repo = camp.repo
    for noise, floor in (({"floor": 0.003, "samples": [1, 2]}, 0.003),
                         ({"samples": [1.100, 1.102, 1.104], "objective": "val_bpb"}, 0.002),
                         ({"samples": [1.1, 1.2], "objective": "peak_vram_mb"}, None),
                         ({"samples": [1.1]}, None)):
        b.write_file("noise.json", json.dumps(noise))
        ledger = read_branch(repo, resolve_branch(repo, "t-x"))
        assert ledger.noise_floor == (None if floor is None else pytest.approx(floor))


def test_conflicting_change_and_unnamed_contract_difference(tmp_path):
    camp = Campaign(tmp_path / "r")
    a = camp.branch("t-a", machine="a", device="A", parts=None)
    a.run("keep", 1.1, description="baseline")
    a.run("keep", 1.0, change={"EMBED_LR": 0.9})
    b = camp.branch("t-b", machine="b", device="B", parts=None, contract="ffff0000ffff0000")
    b.run("keep", 1.2, description="baseline")
    b.run("keep", 1.1, change={"EMBED_LR": 0.3})
    report = _report(camp)
    (change,) = report["changes"]
    assert change["kind"] == "conflicting" and change["direction"] is None
    assert report["contract_differences"][0]["differs"] is None
    assert "cannot be named" in format_text(report)


def test_upstream_results_tsv_only_branch(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-up")
    b.write_file("results.tsv", "commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                 "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n"
                 "b2c3d4e\t0.993200\t44.2\tkeep\tincrease LR\n"
                 "c3d4e5f\t1.005000\t44.0\tdiscard\tswitch to GeLU\n"
                 "d4e5f6g\t0.000000\t0.0\tcrash\tdouble width (OOM)\n")
    report = _report(camp)
    (s,) = report["branches"]
    assert (s["experiments"], s["keeps"], s["discards"], s["crashes"]) == (4, 2, 1, 1)
    assert s["best_bpb"] == pytest.approx(0.9932) and s["baseline_bpb"] == pytest.approx(0.9979)
    assert any("no receipts" in n for n in s["notes"])


def test_unreadable_receipt_and_noise_are_noted(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-x", machine="x")
    b.run("keep", 1.1, description="baseline")
    b.write_file("receipts/00002-deadbee.json", "{not json")
    b.write_file("noise.json", "[1, 2]")
    (s,) = _report(camp)["branches"]
    assert s["best_bpb"] == pytest.approx(1.1) and s["noise_floor"] is None
    assert any("00002-deadbee.json unreadable" in n for n in s["notes"])
    assert any("noise.json unreadable" in n for n in s["notes"])
    assert not any("rows but only" in n for n in s["notes"])


# --- remotes -----------------------------------------------------------------------------------------


def test_remote_tracking_branches_and_fetch(tmp_path):
    import git

    camp = Campaign(tmp_path / "local")
    m4 = camp.branch("mar5-m4max", machine="m4max", device="M4")
    m4.run("keep", 1.1, description="baseline")
    bare = git.Repo.init(tmp_path / "remote.git", bare=True)
    camp.repo.create_remote("origin", str(bare.git_dir))
    camp.repo.git.push("origin", "main", "autoresearch/mar5-m4max")

    # Another machine clones, runs its own campaign and pushes it.
    other = git.Repo.clone_from(str(bare.git_dir), tmp_path / "h100box", branch="main")
    other.git.checkout("-b", "autoresearch/mar5-h100")
    other.git.checkout("main")
    h = BranchBuilder(types.SimpleNamespace(repo=other, root=tmp_path / "h100box"), "autoresearch/mar5-h100",
                      "h100", "H100", "cuda", CONTRACT_REAL, None)
    h.run("keep", 1.0, description="baseline")
    h.run("keep", 0.9, change={"DEPTH": 12})
    other.git.push("origin", "autoresearch/mar5-h100")

    assert [b.name for b in list_branches(camp.repo)] == ["autoresearch/mar5-m4max"]
    said = []
    fetch_remotes(camp.repo, said.append)
    assert said == ["fetching origin ..."]
    # origin/autoresearch/mar5-m4max is the same commit as the local branch: listed once.
    assert [b.name for b in list_branches(camp.repo)] == ["autoresearch/mar5-m4max",
                                                           "origin/autoresearch/mar5-h100"]
    assert resolve_branch(camp.repo, "mar5-h100").ref == "refs/remotes/origin/autoresearch/mar5-h100"
    report = _report(camp)
    assert report["groups"][0]["ranking"] == ["origin/autoresearch/mar5-h100", "autoresearch/mar5-m4max"]

    m4.run("keep", 1.05, change={"MATRIX_LR": 0.03})  # the local branch moves ahead of origin's copy
    assert [b.name for b in list_branches(camp.repo)] == [
        "autoresearch/mar5-m4max", "origin/autoresearch/mar5-h100", "origin/autoresearch/mar5-m4max"]

    # The CLI's --fetch goes through the same path.
    result = CliRunner().invoke(compare_command, ["--repo", str(camp.root), "--fetch", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {b["name"] for b in data["branches"]} == {
        "autoresearch/mar5-m4max", "origin/autoresearch/mar5-h100", "origin/autoresearch/mar5-m4max"}


def test_fetch_failure_names_the_remote(tmp_path):
    camp = Campaign(tmp_path / "r")
    camp.repo.create_remote("gone", str(tmp_path / "does-not-exist.git"))
    with pytest.raises(CompareError, match="git fetch gone failed"):
        fetch_remotes(camp.repo)


# --- CLI ---------------------------------------------------------------------------------------------


def test_cli_compare_json_and_text(standard):
    runner = CliRunner()
    result = runner.invoke(compare_command, ["--repo", str(standard.root), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["schema"] == 1
    assert data["groups"][0]["ranking"] == ["autoresearch/mar5-h100", "autoresearch/mar5-m4max"]
    assert data["branches"][1]["best_recipe"]["ADAM_BETAS"] == [0.8, 0.95]

    result = runner.invoke(compare_command, ["--repo", str(standard.root), "mar5-m4max", "mar5-mini"])
    assert result.exit_code == 0, result.output
    assert "mar5-h100" not in result.stdout and "only crashes" in result.stdout


def test_cli_compare_errors(tmp_path, standard):
    runner = CliRunner()
    result = runner.invoke(compare_command, ["--repo", str(tmp_path)])
    assert result.exit_code == 1 and "not inside a git repository" in result.output
    result = runner.invoke(compare_command, ["--repo", str(standard.root), "nope"])
    assert result.exit_code == 1 and "no branch named 'nope'" in result.output
    bare = Campaign(tmp_path / "nobranches")
    result = runner.invoke(compare_command, ["--repo", str(bare.root)])
    assert result.exit_code == 1 and "no autoresearch/* branches" in result.output


def test_cli_module_imports_no_heavy_libraries():
    code = ("import sys, mlx_ar.compare.cli, mlx_ar.cli; "
            "heavy = [m for m in ('git', 'matplotlib', 'mlx', 'torch', 'pyarrow') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
