"""`mlx-ar doctor` on real repositories with fake machine probes."""
import dataclasses
import json

import pytest
from click.testing import CliRunner

from _ledger_fakes import campaign, git, make_repo, set_identity
from mlx_ar.constants import DEMO
from mlx_ar.doctor import Probes, diagnose, doctor_command, rough_need_gb
from mlx_ar.ledger.attempt import run_experiment

FAKE = Probes(mlx=lambda: {"version": "0.0", "device": "Metal (GPU)"}, torch=lambda: None,
              module=lambda name: "9.9", memory_bytes=lambda: 16 * 2**30, need_gb=lambda recipe, profile: 3.0,
              ceiling_gb=lambda: 10.7, battery=lambda: None)


@pytest.fixture
def repo(tmp_path, monkeypatch):
    set_identity(monkeypatch)
    root = make_repo(tmp_path / "repo")
    (root / "campaign.toml").write_text("time_budget = 1\neval_allowance = 3\n")
    git(root, "add", "campaign.toml")
    git(root, "commit", "-q", "-m", "campaign settings")
    cache = tmp_path / "cache"
    (cache / "datasets" / "demo").mkdir(parents=True)
    (cache / "datasets" / "demo" / "manifest.json").write_text(
        json.dumps({"schema": 1, "profile": dataclasses.asdict(DEMO)}))
    (cache / "current").write_text("demo\n")
    monkeypatch.setenv("MLX_AR_CACHE", str(cache))
    return root


def _texts(report, section):
    return [c.text for c in report.checks if c.section == section]


def test_ready_branch_says_baseline_next_and_lists_the_overrides(repo):
    r = diagnose(repo, probes=FAKE)
    assert r.ok, r.lines()
    assert r.next_step.startswith('mlx-ar run -m "baseline"')
    assert any("MLX 0.0 on Metal (GPU)" in t for t in _texts(r, "installed"))
    assert any("the demo profile overrides DEPTH=2" in t for t in _texts(r, "data"))
    assert any("machine 16.0 GB; the current recipe needs about 3.0 GB" in t for t in _texts(r, "memory"))
    assert any("no champion yet" in t for t in _texts(r, "ledger"))


def test_after_the_baseline_it_asks_for_the_noise_floor(repo):
    assert run_experiment(repo, "baseline", campaign(), echo=lambda *a: None).status == "keep"
    r = diagnose(repo, probes=FAKE)
    assert r.ok and any("champion" in t and "val_bpb 1.000000" in t for t in _texts(r, "ledger"))
    assert r.next_step == "mlx-ar noise 2> run.log"


def test_what_would_make_a_run_fail_fails(repo, monkeypatch, tmp_path):
    (repo / "progress.png").write_bytes(b"png")
    r = diagnose(repo, probes=FAKE)
    assert not r.ok and any("a run would be refused" in t and "progress.png" in t for t in _texts(r, "ledger"))
    monkeypatch.setenv("MLX_AR_CACHE", str(tmp_path / "empty"))
    r = diagnose(repo, probes=dataclasses.replace(FAKE, mlx=lambda: None))
    assert any(c.status == "fail" and "MLX not installed" in c.text for c in r.checks)
    assert r.next_step.startswith("pip install") or r.next_step.startswith("python prepare.py")
    big = dataclasses.replace(FAKE, need_gb=lambda recipe, profile: 15.0)
    monkeypatch.setenv("MLX_AR_CACHE", str(repo.parent / "cache"))
    (repo / "progress.png").unlink()
    r = diagnose(repo, probes=big)
    assert any(c.status == "warn" and "close to or above" in c.text for c in r.checks if c.section == "memory")


def test_cli_exit_code(repo, monkeypatch):
    monkeypatch.chdir(repo)
    (repo / "stray.txt").write_text("x\n")
    res = CliRunner().invoke(doctor_command, [])
    assert res.exit_code == 1 and "a run would be refused" in res.output and res.output.rstrip().splitlines()[-1].startswith("next: ")


def test_rough_need_grows_with_the_model():
    small = rough_need_gb({"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": 4}, DEMO)
    big = rough_need_gb({"DEPTH": 8, "ASPECT_RATIO": 64, "HEAD_DIM": 128, "DEVICE_BATCH_SIZE": 4}, DEMO)
    assert 0 < small < big
    assert rough_need_gb({"DEPTH": 2}, DEMO) is None
    auto = rough_need_gb({"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "DEVICE_BATCH_SIZE": "auto"}, DEMO)
    assert 0 < auto < small


def test_memory_names_the_machine_ceiling_and_power_the_battery(repo):
    r = diagnose(repo, probes=FAKE)
    assert any("veto above 10.7 GB" in t for t in _texts(r, "memory")), r.lines()
    assert _texts(r, "power") == []                     # not a Mac: no power line
    on_battery = dataclasses.replace(FAKE, battery=lambda: {"on_battery": True, "percent": 41})
    r = diagnose(repo, probes=on_battery)
    (check,) = [c for c in r.checks if c.section == "power"]
    assert check.status == "warn" and "on battery (41%)" in check.text
    mains = dataclasses.replace(FAKE, battery=lambda: {"on_battery": False, "percent": None})
    (check,) = [c for c in diagnose(repo, probes=mains).checks if c.section == "power"]
    assert check.status == "ok" and check.text == "on mains power"
