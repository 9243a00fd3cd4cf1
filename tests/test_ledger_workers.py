"""Parallel workers: worktrees sharing one ledger, concurrent runs, a globally chosen champion."""
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from _ledger_fakes import edit, git, make_repo, receipts, rows, set_identity
from mlx_ar.ledger.context import WorkerError, worker_env, worker_meta
from mlx_ar.ledger.workers import setup_workers

CAMPAIGN = "time_budget = 1\neval_allowance = 5\nsuspect_cooldown = 0\n"


@pytest.fixture
def main_repo(tmp_path, monkeypatch):
    set_identity(monkeypatch)
    root = make_repo(tmp_path / "repo", extra_files={"campaign.toml": CAMPAIGN})
    cli = [sys.executable, "-m", "mlx_ar.cli", "run", "-m", "baseline"]
    assert subprocess.run(cli, cwd=root, capture_output=True).returncode == 0
    return root


def _run(cwd, message):
    return subprocess.Popen([sys.executable, "-m", "mlx_ar.cli", "run", "-m", message], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_workers_share_the_ledger_and_follow_the_global_champion(main_repo, tmp_path):
    infos = setup_workers(main_repo, 2, echo=lambda *a: None)
    assert [(w.name, w.created, w.branch) for w in infos] == [
        ("w1", True, "autoresearch/test-box-w1"), ("w2", True, "autoresearch/test-box-w2")]
    w1, w2 = infos[0].path, infos[1].path
    assert w1 == tmp_path / "repo-workers" / "w1"
    assert git(w1, "status", "--porcelain") == ""  # the metadata lives in the git dir, not the tree

    edit(w1, VALUE=0.8)
    edit(w2, VALUE=0.9)
    procs = [_run(w1, "w1 idea"), _run(w2, "w2 idea")]  # both write the one ledger at once
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()

    table = rows(main_repo)
    assert [r["worker"] for r in table[1:]] and {r["worker"] for r in table[1:]} == {"w1", "w2"}
    assert len(table) == 3 and len(receipts(main_repo)) == 3
    assert git(main_repo, "status", "--porcelain") == ""  # ledger commits landed on the main branch
    best = min((r for r in receipts(main_repo) if r["status"] == "keep"), key=lambda r: r["metrics"]["val_bpb"])
    assert best["worker"] == "w1" and best["metrics"]["val_bpb"] == 0.8
    # Each worker's logs stay in its own worktree.
    assert (w1 / "runs").is_dir() and (w2 / "runs").is_dir()

    # w2 (0.9) either lost to w1's 0.8 or was kept first and then beaten; after a refresh both
    # workers start from the global champion.
    again = setup_workers(main_repo, 2, echo=lambda *a: None)
    assert [w.created for w in again] == [False, False]
    champion_train = (w1 / "train.py").read_text()
    assert "VALUE = 0.8 " in champion_train and (w2 / "train.py").read_text() == champion_train
    assert git(w2, "status", "--porcelain") == ""

    # A worker's candidate is judged against the global champion, not its own branch.
    edit(w2, VALUE=0.85)
    p = _run(w2, "w2 between")
    out, _ = p.communicate(timeout=60)
    assert b"status:       discard" in out and b"champion:     0.800000" in out

    # `mlx-ar results` inside a worker shows the shared ledger.
    from mlx_ar.ledger.cli import results_command
    import os
    cwd = os.getcwd()
    try:
        os.chdir(w2)
        res = CliRunner().invoke(results_command, ["--json"])
    finally:
        os.chdir(cwd)
    assert json.loads(res.output)["best"]["val_bpb"] == 0.8 and len(json.loads(res.output)["rows"]) == 4


def test_worker_setup_errors_and_env(main_repo, tmp_path):
    with pytest.raises(WorkerError, match="must be outside the repository"):
        setup_workers(main_repo, 1, workers_dir=main_repo / "inside", echo=lambda *a: None)
    infos = setup_workers(main_repo, 1, gpus=[3], echo=lambda *a: None)
    with pytest.raises(WorkerError, match="is itself a worker"):
        setup_workers(infos[0].path, 1, echo=lambda *a: None)
    from mlx_ar.ledger import git_ops
    meta = worker_meta(git_ops.open_repo(infos[0].path))
    assert meta["gpu"] == 3 and meta["ledger_root"] == str(main_repo)
    assert worker_env(meta, "cuda") == {"CUDA_VISIBLE_DEVICES": "3"} and worker_env(meta, "mlx") == {}
    assert worker_meta(git_ops.open_repo(main_repo)) is None
