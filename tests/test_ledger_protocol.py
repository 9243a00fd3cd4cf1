"""program.md as a new user runs it, with the fake train.py: the first baseline on a fresh branch,
profiles that override recipe constants, the default gate at a noise floor, results.tsv as
upstream's tools read it.
"""
import dataclasses
import json

import pytest
from click.testing import CliRunner

from _ledger_fakes import assert_consistent, campaign, edit, git, make_repo, receipts, rows, set_identity
from mlx_ar.constants import DEMO
from mlx_ar.ledger import policy
from mlx_ar.ledger.attempt import run_experiment
from mlx_ar.ledger.campaign import Campaign
from mlx_ar.ledger.gate import GateSettings, gate_kind, gate_note, simulate

QUIET = dict(echo=lambda *a: None)


@pytest.fixture
def main_repo(tmp_path, monkeypatch):
    """A `main` whose history looks like this project's: code commits, one titled "ledger: ..."."""
    set_identity(monkeypatch)
    root = make_repo(tmp_path / "repo", branch="main")
    (root / "README.md").write_text("more docs\n")
    (root / "lib.py").write_text("x = 1\n")
    git(root, "add", "README.md", "lib.py")
    git(root, "commit", "-q", "-m", "ledger: a code change to the ledger module, on main")
    return root


def test_first_run_on_a_new_branch_is_the_baseline_whatever_main_holds(main_repo):
    """program.md section 1: branch, commit campaign.toml, baseline. No refusal, no fake row."""
    root = main_repo
    git(root, "checkout", "-q", "-b", "autoresearch/dec4-cpu")
    (root / "campaign.toml").write_text("time_budget = 1\neval_allowance = 3\n")
    git(root, "add", "campaign.toml")
    git(root, "commit", "-q", "-m", "campaign settings")
    head = git(root, "rev-parse", "HEAD")
    r = run_experiment(root, "baseline", campaign(), **QUIET)
    assert (r.status, r.commit) == ("keep", head), r.reason
    assert [x["status"] for x in receipts(root)] == ["keep"]
    assert [x["status"] for x in rows(root)] == ["keep"]
    # An edit on top is judged as usual; commits from before the campaign never are.
    edit(root, VALUE=0.9)
    assert run_experiment(root, "lower", campaign(), **QUIET).status == "keep"
    assert git(root, "log", "-1", "--format=%s", "HEAD~1") == "lower"
    assert_consistent(root)


def test_first_run_scores_an_edited_working_tree_as_the_baseline(main_repo):
    git(main_repo, "checkout", "-q", "-b", "autoresearch/dec4-cpu")
    edit(main_repo, VALUE=1.5)
    r = run_experiment(main_repo, "baseline with my edit", campaign(), **QUIET)
    assert r.status == "keep" and "baseline" in r.reason
    assert git(main_repo, "log", "-1", "--format=%s", "HEAD~1") == "baseline with my edit"
    assert_consistent(main_repo)


def test_results_tsv_has_only_scored_rows_for_upstreams_notebook(main_repo):
    git(main_repo, "checkout", "-q", "-b", "autoresearch/t-m")
    (main_repo / "scratch.txt").write_text("stray\n")
    r = run_experiment(main_repo, "baseline", campaign(), **QUIET)
    assert r.status == "refused"
    (main_repo / "scratch.txt").unlink()
    assert run_experiment(main_repo, "baseline", campaign(), **QUIET).status == "keep"
    edit(main_repo, VALUE=0.5, MODE="raise")
    assert run_experiment(main_repo, "crashes", campaign(), **QUIET).status == "crash"
    text = (main_repo / "results.tsv").read_text().splitlines()
    assert text[0].split("\t")[:5] == ["commit", "val_bpb", "memory_gb", "status", "description"]
    # Upstream's notebook takes the first row as the baseline and filters crash rows.
    assert [line.split("\t")[3] for line in text[1:]] == ["keep", "crash"]
    assert text[1].split("\t")[1] == "1.000000" and text[2].split("\t")[1:3] == ["0.000000", "0.0"]
    # The refusal is still a receipt, and `mlx-ar results` lists it.
    assert [x["status"] for x in receipts(main_repo)] == ["refused", "keep", "crash"]


# --- profiles that override recipe constants ---------------------------------------------------
def _demo_cache(root, monkeypatch):
    """A cache whose current dataset is a demo-profile one (its manifest is all the loop reads)."""
    cache = root.parent / "cache"
    d = cache / "datasets" / "demo"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"schema": 1, "profile": dataclasses.asdict(DEMO)}))
    (cache / "current").write_text("demo\n")
    monkeypatch.setenv("MLX_AR_CACHE", str(cache))


def _with_depth(root):
    src = (root / "train.py").read_text()
    (root / "train.py").write_text(src.replace('VALUE = 1.0 ', 'DEPTH = 4\nVALUE = 1.0 ', 1))
    git(root, "commit", "-q", "-am", "a DEPTH constant")


def test_edit_of_only_overridden_constants_is_refused_with_the_profile(main_repo, monkeypatch):
    _with_depth(main_repo)
    _demo_cache(main_repo, monkeypatch)
    git(main_repo, "checkout", "-q", "-b", "autoresearch/t-m")
    r = run_experiment(main_repo, "baseline", campaign(), **QUIET)
    assert r.status == "keep" and r.profile["name"] == "demo" and r.profile["overrides"]["DEPTH"] == 2
    edit(main_repo, DEPTH=3)
    r = run_experiment(main_repo, "DEPTH down", campaign(), **QUIET)
    assert r.status == "refused" and "the demo profile overrides DEPTH (= 2)" in r.reason, r.reason
    assert "DEPTH = 3" in (main_repo / "train.py").read_text()  # left for the agent
    # Together with a change that does act, it runs, and the result says what had no effect.
    edit(main_repo, VALUE=0.9)
    r = run_experiment(main_repo, "DEPTH and VALUE", campaign(), **QUIET)
    assert r.status == "keep"
    assert any("demo profile overrides DEPTH: that part of the edit had no effect" in n for n in r.notes)
    assert receipts(main_repo)[-1]["profile"]["overrides"]["DEPTH"] == 2


def test_result_block_lists_the_profile_overrides(main_repo, monkeypatch):
    from mlx_ar.ledger.cli import run_command

    _demo_cache(main_repo, monkeypatch)
    git(main_repo, "checkout", "-q", "-b", "autoresearch/t-m")
    (main_repo / "campaign.toml").write_text("time_budget = 1\neval_allowance = 3\n")
    git(main_repo, "add", "campaign.toml")
    git(main_repo, "commit", "-q", "-m", "campaign settings")
    monkeypatch.chdir(main_repo)
    res = CliRunner().invoke(run_command, ["-m", "baseline"])
    assert res.exit_code == 0, res.output
    line = next(x for x in res.output.splitlines() if x.startswith("overrides:"))
    for name, value in DEMO.recipe_overrides:
        assert f"{name}={value}" in line


def test_overridden_reason_is_generic_over_the_profiles_names():
    old = b"DEPTH = 4\nDEVICE_BATCH_SIZE = 'auto'\nLR = 0.1\nimport os\nx = 1\n"
    profile = DEMO
    assert policy.overridden_reason(profile, old, old.replace(b"'auto'", b"8")) is not None
    assert policy.overridden_reason(profile, old, old.replace(b"LR = 0.1", b"LR = 0.2")) is None
    assert policy.overridden_reason(profile, old, old.replace(b"x = 1", b"x = 2").replace(b"4", b"3")) is None
    real = dataclasses.replace(DEMO, name="real", recipe_overrides=())
    assert policy.overridden_reason(real, old, old.replace(b"DEPTH = 4", b"DEPTH = 3")) is None


# --- the default gate --------------------------------------------------------------------------
def test_default_gate_holds_false_keeps_at_5_percent_once_a_floor_exists():
    c = Campaign()
    floor = {"floor": 0.004, "n": 5, "n_with_receipts": 5}
    assert gate_kind(c, None) == "single" and gate_kind(c, floor) == "significance"
    settings = GateSettings.from_campaign(c, gate_kind(c, floor))
    aa = simulate(settings, true_gain=0.0, sigma=0.004, champion_runs=5, trials=2000)["keep_rate"]
    single = simulate(GateSettings("single"), true_gain=0.0, sigma=0.004, champion_runs=5, trials=2000)["keep_rate"]
    assert aa <= 0.05 and single > 0.3
    note = gate_note(c, floor)
    assert "<= 5% of the time" in note and "detects a gain of" in note
    before = gate_note(c, None)
    assert "no noise floor yet" in before and "`mlx-ar noise`" in before
    assert "keeps an unchanged recipe about" in gate_note(dataclasses.replace(c, gate="single"), floor)


def test_every_result_says_whether_a_noise_floor_exists(main_repo):
    git(main_repo, "checkout", "-q", "-b", "autoresearch/t-m")
    c = campaign()
    assert c.gate == "auto"
    r = run_experiment(main_repo, "baseline", c, **QUIET)
    assert any("no noise floor yet" in n and "mlx-ar noise" in n for n in r.notes)
    edit(main_repo, VALUE=1.1)
    r = run_experiment(main_repo, "worse", c, **QUIET)
    assert any("no noise floor yet" in n for n in r.notes) and r.gate["gate"] == "single"


def test_child_timeout_follows_the_demo_budget(main_repo, monkeypatch):
    from mlx_ar.ledger.runner import ChildResult

    _demo_cache(main_repo, monkeypatch)
    git(main_repo, "checkout", "-q", "-b", "autoresearch/t-m")
    seen = []

    def runner(cmd, *, cwd, log_path, timeout_s, env, heartbeat):
        seen.append(timeout_s)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("FAIL: stopped by the test\n")
        return ChildResult(1, False, 0.1, log_path, "FAIL: stopped by the test")
    c = campaign(time_budget=None, eval_allowance=None)
    r = run_experiment(main_repo, "baseline", c, runner=runner, **QUIET)
    assert r.status == "crash" and seen == [2 * DEMO.time_budget + 2 * DEMO.time_budget]  # 240 s, not 900
