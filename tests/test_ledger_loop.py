"""The research loop end to end, on real git repositories with a fake train.py.

Covers the ratchet (keep / discard / refused), the fault matrix of issue #5 (every fault
ends with a clear reason, a row + receipt, the branch at the last kept commit and no user
file lost), the significance gate with seed re-runs, the throttle sentinel, vetoes, the
noise floor and the CLI.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from _ledger_fakes import (assert_consistent, campaign, edit, git, last_kept, make_repo, pid_alive, receipts,
                           rows)
from mlx_ar.ledger.attempt import run_experiment
from mlx_ar.ledger.context import Interrupted, LoopError
from mlx_ar.ledger.noise import measure_noise
from mlx_ar.ledger.policy import config_tier_problems

QUIET = dict(echo=lambda *a: None)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    from _ledger_fakes import set_identity

    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo")


def run(root, message, c=None, **kw):
    return run_experiment(root, message, c or campaign(), **QUIET, **kw)


# --- the ratchet ------------------------------------------------------------------------------
def test_baseline_keep_better_keep_worse_discard(repo):
    initial = git(repo, "rev-parse", "HEAD")
    r = run(repo, "baseline")
    assert (r.status, r.commit, r.exit_code) == ("keep", initial, 0)
    assert "baseline" in r.reason

    edit(repo, VALUE=0.9)
    r = run(repo, "lower value")
    assert r.status == "keep" and r.metrics["val_bpb"] == pytest.approx(0.9)
    kept = r.commit
    assert git(repo, "log", "-1", "--format=%s", kept) == "lower value"
    assert_consistent(repo, kept)

    edit(repo, VALUE=0.95, TOK_PER_SEC=900)
    r = run(repo, "worse value")
    assert r.status == "discard" and "does not beat" in r.reason
    assert_consistent(repo, kept)
    assert "VALUE = 0.9 " in (repo / "train.py").read_text()
    # The discarded candidate stays reachable and its diff is in the receipt.
    rec = receipts(repo)[-1]
    assert git(repo, "rev-parse", "refs/mlx-ar/attempts/00003") == rec["commit"] == rec["attempt_commit"]
    assert "-VALUE = 0.9 " in rec["diff"] and "+VALUE = 0.95 " in rec["diff"]
    assert rec["parent"] == git(repo, "rev-parse", "HEAD~1")  # the ledger commit it built on
    assert rec["recipe"]["VALUE"] == 0.95 and rec["seed"] == 42 and rec["contract"] == "c0ffee"
    assert rec["gate"]["champion"]["commit"] == kept

    table = rows(repo)
    assert [r["status"] for r in table] == ["keep", "keep", "discard"]
    assert table[1]["commit"] == kept[:7] and table[1]["val_bpb"] == "0.900000"
    assert table[1]["memory_gb"] == "2.0" and table[2]["tok_per_sec"] == "900"
    subjects = [s for _sha, s in __import__("_ledger_fakes").first_parent_log(repo)]
    assert subjects[0].startswith("ledger: 00003 discard 0.950000 worse value")


def test_identical_train_py_is_never_scored_twice(repo):
    run(repo, "baseline")
    edit(repo, VALUE=0.95)
    run(repo, "try")            # kept
    edit(repo, VALUE=1.0)       # back to the baseline's exact file
    r = run(repo, "again")
    assert r.status == "refused" and "already scored in receipts/00001-" in r.reason and r.exit_code == 2
    assert "VALUE = 1.0 " in (repo / "train.py").read_text()  # the edit is left for the agent
    assert len(receipts(repo)) == 3 and len(list((repo / "runs").iterdir())) == 2  # nothing ran


def test_description_sanitized_in_tsv(repo):
    run(repo, "base\tline\nwith breaks")
    assert rows(repo)[0]["description"] == "base line with breaks"


def test_hand_made_commit_on_top_is_judged_and_removed_on_discard(repo):
    run(repo, "baseline")
    edit(repo, VALUE=0.8)
    git(repo, "commit", "-q", "-am", "transplant from other: VALUE=0.8")
    hand = git(repo, "rev-parse", "HEAD")
    r = run(repo, "")
    assert r.status == "keep" and r.commit == hand  # the same commit, now kept
    assert receipts(repo)[-1]["description"] == "transplant from other: VALUE=0.8"

    edit(repo, VALUE=0.85)
    git(repo, "commit", "-q", "-am", "hand edit")
    bad = git(repo, "rev-parse", "HEAD")
    r = run(repo, "")
    assert r.status == "discard"
    assert_consistent(repo, hand)
    assert git(repo, "branch", "--contains", bad) == ""  # off the branch, only under its attempt ref


# --- refusals: nothing touched ------------------------------------------------------------------
def test_dirty_unrelated_files_are_refused_and_nothing_is_touched(repo):
    run(repo, "baseline")
    edit(repo, VALUE=0.5)
    (repo / "README.md").write_text("the agent's own notes, uncommitted\n")
    (repo / "scratch.py").write_text("print('idea')\n")
    head = git(repo, "rev-parse", "HEAD")
    r = run(repo, "should refuse")
    assert r.status == "refused" and r.exit_code == 2
    assert "README.md" in r.reason and "scratch.py" in r.reason and "commit, revert or .gitignore" in r.reason
    # User files intact, the edit still in place, the branch only gained the ledger commit.
    assert (repo / "README.md").read_text() == "the agent's own notes, uncommitted\n"
    assert (repo / "scratch.py").exists() and "VALUE = 0.5 " in (repo / "train.py").read_text()
    assert git(repo, "rev-parse", "HEAD~1") == head
    # The refusal is a committed receipt, not a results.tsv row (upstream's table has no such rows).
    assert git(repo, "show", "--name-only", "--format=", "HEAD").split() == ["receipts/00002-" + head[:7] + ".json"]
    assert [r["status"] for r in rows(repo)] == ["keep"] and receipts(repo)[-1]["status"] == "refused"
    assert "+VALUE = 0.5 " in receipts(repo)[-1]["diff"]
    assert_consistent(repo, clean=False)


def test_config_tier_refuses_code_edits(repo):
    c = campaign(tier="config")
    run(repo, "baseline", c)
    edit(repo, VALUE=0.9)
    assert run(repo, "recipe only", c).status == "keep"
    src = (repo / "train.py").read_text()
    (repo / "train.py").write_text(src.replace("time.sleep(SLEEP)", "time.sleep(SLEEP * 2)"))
    r = run(repo, "code edit", c)
    assert r.status == "refused" and "config tier" in r.reason and "train.py:" in r.reason
    assert "SLEEP * 2" in (repo / "train.py").read_text()  # left for the agent to revert
    assert_consistent(repo, clean=False)


def test_config_tier_checker():
    old = {"train.py": b"A = 1\nB = 'x'  # note\nimport os\ndef f():\n    return A\n"}
    assert config_tier_problems(old, {"train.py": b"A = 2\nB = 'y'  # other note\nimport os\ndef f():\n    return A\n"}) == []
    assert "code outside" in config_tier_problems(old, {"train.py": b"A = 1\nB = 'x'\nimport os\ndef f():\n    return B\n"})[0]
    assert "set of recipe constants" in config_tier_problems(old, {"train.py": b"A = 1\nB = 'x'\nC = 3\nimport os\ndef f():\n    return A\n"})[0]
    assert "syntax" in config_tier_problems(old, {"train.py": b"A = (\n"})[0]
    # a statement appended after the code is a code change, named by its line
    appended = {"train.py": b"A = 1\nB = 'x'\nimport os\ndef f():\n    return A\nprint(A)\n"}
    assert config_tier_problems(old, appended) == ["train.py:6: code outside the recipe constants changed"]
    assert "deleted" in config_tier_problems(old, {"train.py": None})[0]
    grown = {"train.py": b"A = 1\nB = 'x'\nC = 3\nimport os\ndef f():\n    return A\n"}
    assert config_tier_problems(old, grown, new_constants=True) == []
    assert config_tier_problems(old, {"train.py": b"A = 1\nimport os\ndef f():\n    return 0\n"}, new_constants=True)


# --- the fault matrix --------------------------------------------------------------------------
FAULTS = [
    ("raise", "ValueError: shapes do not match"),
    ("die", "exit code 1: ValueError: boom in the model code"),
    ("nan", "non-finite loss at step 3"),
    ("oom", "out of memory"),
    ("kill", "killed by SIGKILL"),
    ("hang", "timeout: killed after"),
    ("norecord", "wrote no run record"),
    ("mismatch", "the run record says val_bpb"),
]


@pytest.mark.parametrize("mode,expected", FAULTS, ids=[f[0] for f in FAULTS])
def test_fault_ends_as_crash_with_branch_at_last_kept(repo, mode, expected):
    c = campaign(time_budget=0.5, eval_allowance=1.0)  # a hanging child is killed after 2 s
    run(repo, "baseline", c)
    kept = last_kept(repo)
    readme = (repo / "README.md").read_bytes()
    edit(repo, VALUE=0.1, MODE=mode)
    r = run(repo, f"fault {mode}", c)
    assert r.status == "crash" and r.exit_code == 1
    assert expected in r.reason, r.reason
    assert_consistent(repo, kept)
    assert (repo / "README.md").read_bytes() == readme
    rec = receipts(repo)[-1]
    assert rec["status"] == "crash" and rec["reason"] == r.reason and rec["metrics"] is None
    assert "+MODE = " in rec["diff"] and Path(repo / rec["runs"][0]["log"]).exists()
    assert rows(repo)[-1]["val_bpb"] == "0.000000"


def test_syntax_error_is_a_crash_without_running(repo):
    run(repo, "baseline")
    (repo / "train.py").write_text((repo / "train.py").read_text().replace("VALUE = 1.0", "VALUE = (1.0"))
    r = run(repo, "typo")
    assert r.status == "crash" and r.reason.startswith("syntax error: train.py:") and r.runs == []
    assert_consistent(repo)


def test_interrupted_runner_records_crash_and_restores(repo):
    run(repo, "baseline")
    kept = last_kept(repo)
    edit(repo, VALUE=0.5)

    def runner(*args, **kw):
        raise KeyboardInterrupt

    with pytest.raises(Interrupted) as e:
        run(repo, "interrupted one", runner=runner)
    assert e.value.result.status == "crash" and e.value.result.reason == "interrupted"
    assert e.value.result.exit_code == 130
    assert_consistent(repo, kept)
    assert receipts(repo)[-1]["reason"] == "interrupted" and "+VALUE = 0.5 " in receipts(repo)[-1]["diff"]


def test_ctrl_c_kills_the_child_group_and_records_crash(repo, tmp_path):
    (repo / "campaign.toml").write_text("time_budget = 30\neval_allowance = 30\nsuspect_cooldown = 0\n")
    git(repo, "add", "campaign.toml")
    git(repo, "commit", "-q", "-m", "campaign")
    cli = [sys.executable, "-m", "mlx_ar.cli", "run"]
    assert subprocess.run(cli + ["-m", "baseline"], cwd=repo, capture_output=True).returncode == 0
    kept = last_kept(repo)
    edit(repo, MODE="hang", VALUE=0.1)
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, FAKE_PID_FILE=str(pid_file))
    # A shell that starts the suite in the background hands it SIGINT ignored, and Python keeps
    # an inherited SIG_IGN; restore the default so the child gets KeyboardInterrupt as at a terminal.
    proc = subprocess.Popen(cli + ["-m", "hangs"], cwd=repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err.decode()
    assert b"status:       crash" in out and b"interrupted" in out
    for _ in range(50):
        if not pid_alive(child):
            break
        time.sleep(0.1)
    assert not pid_alive(child), "the training child survived Ctrl-C"
    assert_consistent(repo, kept)
    assert rows(repo)[-1]["status"] == "crash" and receipts(repo)[-1]["reason"] == "interrupted"


# --- nothing lost when bookkeeping itself is cut short -------------------------------------------
def test_receipt_without_row_is_repaired_on_next_run(repo):
    from mlx_ar.ledger.ledger import Ledger, atomic_write, dump_json

    run(repo, "baseline")
    rec = receipts(repo)[0]
    # A crash after the receipt was written but before its row: simulate with a stray receipt.
    stray = dict(rec, seq=7, status="discard", description="orphan", commit="abcdef1234567")
    atomic_write(repo / "receipts" / "00007-abcdef1.json", dump_json(stray))
    edit(repo, VALUE=0.9)
    r = run(repo, "next")
    assert any("re-added 1" in n for n in r.notes)
    assert [x["description"] for x in rows(repo)] == ["baseline", "orphan", "next"]
    assert_consistent(repo)
    assert Ledger(repo).repair() == []


def test_crash_while_writing_keeps_old_results(repo):
    from mlx_ar.ledger.ledger import atomic_write

    run(repo, "baseline")
    before = (repo / "results.tsv").read_bytes()

    def half_then_crash():
        yield before[:20]
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(repo / "results.tsv", half_then_crash())
    assert (repo / "results.tsv").read_bytes() == before
    assert [p.name for p in repo.iterdir() if p.name.endswith(".tmp")] == []


# --- gates, sentinel, vetoes -----------------------------------------------------------------
def test_significance_gate_reruns_promising_and_fails_losers_fast(repo):
    c = campaign(gate="significance", noise_runs=4)
    edit(repo, NOISE=0.004)
    git(repo, "commit", "-q", "-am", "noisy fake")
    assert run(repo, "baseline", c).status == "keep"
    data = measure_noise(repo, c, **QUIET)
    assert data["n"] == 4 and data["floor"] > 0 and len(set(data["seeds"])) == 4 and 42 not in data["seeds"]
    assert git(repo, "log", "-1", "--format=%s").startswith("ledger: noise floor sd=")
    assert json.loads((repo / "noise.json").read_text())["samples"] == data["samples"]

    edit(repo, VALUE=1.05)
    r = run(repo, "clear loser", c)
    assert r.status == "discard" and len(r.runs) == 1 and r.reason.startswith("no gain")

    edit(repo, VALUE=0.97)
    r = run(repo, "real gain", c)
    assert r.status == "keep" and len(r.runs) >= 2 and "significant" in r.reason
    assert [x["seed"] for x in r.runs] == list(range(42, 42 + len(r.runs)))
    assert rows(repo)[-1]["n_runs"] == str(len(r.runs))
    assert r.gate["p"] <= r.gate["alpha"]
    assert_consistent(repo, r.commit)


def test_throttled_run_is_suspect_and_rerun(repo, monkeypatch, tmp_path):
    run(repo, "baseline")
    for v in (1.1, 1.2):
        edit(repo, VALUE=v)
        run(repo, f"v{v}")
    slow = tmp_path / "slow"
    slow.write_text("0.2")
    monkeypatch.setenv("FAKE_SLOW_FILE", str(slow))
    waited = []
    edit(repo, VALUE=0.9)
    r = run(repo, "throttled then fine", sleep=waited.append, c=campaign(suspect_cooldown=5.0))
    assert waited == [5.0]
    assert r.status == "keep" and r.metrics["tok_per_sec"] == 1000
    assert [x["status"] for x in rows(repo)][-2:] == ["discard", "keep"]  # no row for the suspect run
    assert sorted(x["status"] for x in receipts(repo)[-2:]) == ["keep", "suspect"]
    sus = receipts(repo)[-2] if receipts(repo)[-2]["status"] == "suspect" else receipts(repo)[-1]
    assert "20% of the branch's usual 1000" in sus["reason"]
    assert_consistent(repo, r.commit)


def test_memory_veto_and_smoke_runs(repo):
    c = campaign(max_memory_gb=4.0)
    run(repo, "baseline", c)
    edit(repo, VALUE=0.5, MEMORY_MB=8192.0)
    r = run(repo, "huge", c)
    assert r.status == "discard" and "veto: peak memory 8.0 GB > max_memory_gb 4" in r.reason

    edit(repo, VALUE=0.4, MEMORY_MB=1024.0)
    r = run(repo, "smoke", campaign(smoke=0.5))
    assert r.status == "discard" and "smoke run" in r.reason
    assert receipts(repo)[-1]["smoke"] is True
    # Without allow_smoke a smoke discard does not count as scored, so the real run may follow.
    edit(repo, VALUE=0.4, MEMORY_MB=1024.0)
    r = run(repo, "real run of the same file", c)
    assert r.status == "keep" and r.metrics["val_bpb"] == pytest.approx(0.4)
    edit(repo, VALUE=0.3)
    r = run(repo, "smoke allowed", campaign(smoke=0.5, allow_smoke=True))
    assert r.status == "keep" and receipts(repo)[-1]["smoke"] is True


def test_contract_change_is_refused_after_the_run(repo, monkeypatch):
    run(repo, "baseline")
    monkeypatch.setenv("FAKE_CONTRACT", "different")
    edit(repo, VALUE=0.5)
    r = run(repo, "other data")
    assert r.status == "refused" and "contract different differs" in r.reason and len(r.runs) == 1
    assert_consistent(repo)


def test_noise_needs_a_clean_champion(repo):
    with pytest.raises(LoopError, match="no kept run yet"):
        measure_noise(repo, campaign(), **QUIET)
    run(repo, "baseline")
    edit(repo, VALUE=0.3)
    with pytest.raises(LoopError, match="working tree differs"):
        measure_noise(repo, campaign(), **QUIET)


# --- the CLI -----------------------------------------------------------------------------------
def test_cli_run_and_results(repo, monkeypatch):
    from mlx_ar.ledger.cli import results_command, run_command

    (repo / "campaign.toml").write_text("time_budget = 1\neval_allowance = 3\n")
    git(repo, "add", "campaign.toml")
    git(repo, "commit", "-q", "-m", "campaign")
    monkeypatch.chdir(repo)
    cli = CliRunner()
    res = cli.invoke(run_command, ["-m", "baseline"])
    assert res.exit_code == 0, res.output
    assert "status:       keep" in res.output and "val_bpb:      1.000000" in res.output
    edit(repo, VALUE=1.2)
    res = cli.invoke(run_command, ["-m", "worse"])
    assert res.exit_code == 0 and "status:       discard" in res.output
    assert "champion:     1.000000" in res.output
    edit(repo, VALUE=0.2)
    (repo / "README.md").write_text("changed\n")
    res = cli.invoke(run_command, ["-m", "dirty"])
    assert res.exit_code == 2 and "status:       refused" in res.output
    (repo / "README.md").write_text("notes the agent must not lose\n")

    res = cli.invoke(results_command, [])
    assert res.exit_code == 0
    assert "keep 1  discard 1  crash 0  refused 1" in res.output and "best:     1.000000" in res.output
    assert "dirty  [files outside the mutable surface (train.py) are changed: README.md." in res.output
    res = cli.invoke(results_command, ["--json"])
    data = json.loads(res.output)
    assert data["counts"]["keep"] == 1 and data["best"]["val_bpb"] == 1.0 and len(data["rows"]) == 3
    assert [t["description"] for t in data["trajectory"]] == ["baseline"]

    (repo / "campaign.toml").write_text("gate = 'sometimes'\n")
    res = cli.invoke(run_command, ["-m", "x"])
    assert res.exit_code == 1 and "campaign.toml: gate must be one of auto, single, significance" in res.output


def test_cuda_refuses_edits_to_code_it_does_not_run(repo):
    (repo / "train_torch.py").write_text("import math\n\ndef block(x):\n    return x\n")
    git(repo, "add", "train_torch.py")
    git(repo, "commit", "-q", "-m", "torch twin")
    c = campaign(backend="cuda")
    assert c.mutable == ("train.py", "train_torch.py")
    run(repo, "baseline", c)
    src = (repo / "train.py").read_text()
    (repo / "train.py").write_text(src.replace("time.sleep(SLEEP)", "time.sleep(SLEEP + 0.0)"))
    r = run(repo, "mlx-only code edit", c)
    assert r.status == "refused" and "would not run" in r.reason and "executes only the recipe constants of train.py" in r.reason
    assert r.runs == [] and not (repo / "runs" / f"{r.seq:05d}-{r.commit[:7]}").exists()
    (repo / "train.py").write_text(src)
    edit(repo, VALUE=0.7)  # the recipe is read by every backend
    assert run(repo, "recipe edit", c).status == "keep"
    # A new dial in the recipe (for train_torch.py to read) is not MLX code: it runs.
    src = (repo / "train.py").read_text()
    (repo / "train.py").write_text(src.replace("SLEEP = 0.0 ", "SLEEP = 0.0\nNEW_DIAL = 3 "))
    assert run(repo, "new recipe dial", c).status == "discard"
    (repo / "train_torch.py").write_text("import math\n\ndef block(x):\n    return 2 * x\n")
    r = run(repo, "torch model edit", c)
    assert r.status == "discard" and len(r.runs) == 1  # it ran (the fake ignores the file)
    # On mlx the torch twin never runs: with it in the surface, an edit to it is refused.
    (repo / "train_torch.py").write_text("import math\n\ndef block(x):\n    return 3 * x\n")
    r = run(repo, "torch edit on mlx", campaign(mutable=("train.py", "train_torch.py")))
    assert r.status == "refused" and "train_torch.py (the mlx backend does not execute it)" in r.reason


def test_tok_per_sec_veto_is_relative_to_the_branch_baseline(repo):
    c = campaign(min_tok_per_sec_ratio=0.7, throttle_ratio=0.0)
    run(repo, "baseline", c)                       # 1000 tok/s
    edit(repo, VALUE=0.5, TOK_PER_SEC=600)
    r = run(repo, "slow but good", c)
    assert r.status == "discard" and "veto: 600 tok/s < 0.7 x the branch baseline's 1000" in r.reason
    edit(repo, VALUE=0.5, TOK_PER_SEC=800)
    assert run(repo, "a bit slower", c).status == "keep"


def test_run_that_executed_other_code_is_a_crash(repo):
    from mlx_ar.ledger.runner import run_child

    run(repo, "baseline")
    edit(repo, VALUE=0.5)

    def runner(cmd, **kw):  # the agent edits train.py while it is starting
        child = run_child(cmd, **kw)
        record = Path(cmd[cmd.index("--record") + 1])
        data = json.loads(record.read_text())
        data["executed_files"] = {"train.py": "0" * 64}
        record.write_text(json.dumps(data))
        return child

    r = run(repo, "raced", runner=runner)
    assert r.status == "crash" and "executed a different train.py" in r.reason
    assert_consistent(repo)


def test_cli_noise_reports_the_floor(repo, monkeypatch):
    from mlx_ar.ledger.cli import noise_command, run_command

    edit(repo, NOISE=0.004)
    (repo / "campaign.toml").write_text("time_budget = 1\neval_allowance = 3\ngate = 'significance'\n")
    git(repo, "add", "campaign.toml", "train.py")
    git(repo, "commit", "-q", "-m", "noisy fake, campaign")
    monkeypatch.chdir(repo)
    cli = CliRunner()
    assert cli.invoke(run_command, ["-m", "baseline"]).exit_code == 0
    res = cli.invoke(noise_command, ["-k", "3"])
    assert res.exit_code == 0, res.output
    assert "noise floor: sd 0.00" in res.output
    # -k 3 measured 3 runs; the baseline's own run counts too, and the line says so.
    assert "over 3 new runs and 1 earlier run of the same train.py (4 in all)" in res.output
    assert "gate single: keeps an unchanged recipe" in res.output
    assert "gate significance (confidence 0.95): keeps an unchanged recipe" in res.output
    assert "detects a gain of" in res.output
    assert git(repo, "status", "--porcelain") == ""


def test_attempt_of_a_killed_loop_is_recorded_next_time(repo, tmp_path):
    (repo / "campaign.toml").write_text("time_budget = 30\neval_allowance = 30\n")
    git(repo, "add", "campaign.toml")
    git(repo, "commit", "-q", "-m", "campaign")
    run(repo, "baseline", campaign(time_budget=30))
    edit(repo, VALUE=0.5, MODE="hang")
    pid_file = tmp_path / "child.pid"
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ar.cli", "run", "-m", "killed"], cwd=repo,
                            env=dict(os.environ, FAKE_PID_FILE=str(pid_file)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.kill()  # SIGKILL: no bookkeeping at all
    proc.wait()
    os.kill(int(pid_file.read_text()), signal.SIGKILL)  # the orphaned training child
    assert len(rows(repo)) == 1

    edit(repo, MODE="ok")
    r = run(repo, "after the kill", campaign(time_budget=30))
    assert any("recorded 1 attempt(s) whose mlx-ar process died" in n for n in r.notes)
    lost = receipts(repo)[1]
    assert lost["status"] == "crash" and lost["reason"].startswith("lost:") and lost["description"] == "killed"
    assert "+VALUE = 0.5 " in lost["diff"] and "+MODE = 'hang'" in lost["diff"]
    assert [x["status"] for x in rows(repo)] == ["keep", "crash", "keep"]
    assert_consistent(repo, r.commit)


def test_hand_commits_the_loop_cannot_judge_are_refused(repo):
    from mlx_ar.ledger.git_ops import GitError

    run(repo, "baseline")
    (repo / "README.md").write_text("changed in the same commit\n")
    edit(repo, VALUE=0.5)
    git(repo, "commit", "-q", "-am", "train.py and README together")
    r = run(repo, "x")
    assert r.status == "refused" and "changes files outside the mutable surface: README.md" in r.reason
    git(repo, "reset", "-q", "--hard", "HEAD~2")  # back to the baseline's ledger commit (test setup only)
    for v in (0.5, 0.6):
        edit(repo, VALUE=v)
        git(repo, "commit", "-q", "-am", f"v{v}")
    r = run(repo, "y")
    assert r.status == "refused" and "more than one commit was made by hand" in r.reason

    git(repo, "checkout", "-q", "--detach")
    with pytest.raises(GitError, match="HEAD is detached"):
        run(repo, "z")
    with pytest.raises(GitError, match="run mlx-ar from the repository root"):
        run(repo / "receipts", "z")
