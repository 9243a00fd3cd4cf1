"""The shared training loop and the train.py entry point: fakes for the loop, real MLX end to end."""
import json
import math
import re
import subprocess
import sys

import numpy as np
import pytest

from mlx_ar.data import open_dataset
from mlx_ar.evaluate import evaluate_bpb
from mlx_ar.harness.clock import BudgetClock
from mlx_ar.harness.loop import train_loop
from mlx_ar.harness.main import batch_geometry, micro_batches
from mlx_ar.harness.memory import GcControl
from mlx_ar.harness.schedules import Schedule
from mlx_ar.harness.summary import FastFail, parse_summary
from mlx_ar.recipe import read_recipe

from _train_utils import ROOT, TRAIN_PY


class FakeClock:
    """Each step takes `dt` seconds of fake time."""

    def __init__(self, dt):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        return self.t

    def advance(self):
        self.t += self.dt


class FakeBackend:
    """A device that runs the queued steps in order, `clock.dt` seconds each; reading a loss waits for it."""

    def __init__(self, losses, clock):
        self.losses, self.clock = list(losses), clock
        self.hypers, self.steps, self.flops_per_token = [], [], 1.0
        self.finished = 0                   # steps the fake device has completed
        self.max_queued = 0

    def set_hyper(self, lr_mult, muon_momentum, weight_decay):
        self.hypers.append((lr_mult, muon_momentum, weight_decay))

    def step(self, inputs, targets):
        self.steps.append(inputs.copy())
        self.max_queued = max(self.max_queued, len(self.steps) - self.finished)
        return len(self.steps) - 1

    def loss_value(self, handle):
        while self.finished <= handle:
            self.clock.advance()
            self.finished += 1
        return self.losses[handle]


def batches(shape=(2, 3, 4)):
    i = 0
    while True:
        yield np.full(shape, i), np.full(shape, i + 1), 1 + i // 5
        i += 1


RECIPE = read_recipe(TRAIN_PY)


@pytest.mark.parametrize("queue_ahead", [True, False])
def test_loop_runs_to_budget_with_schedule_and_warmup_excluded(queue_ahead):
    clock = FakeClock(dt=1.0)
    backend = FakeBackend([5.0 - 0.1 * i for i in range(50)], clock)
    schedule = Schedule.from_recipe(RECIPE)
    budget = BudgetClock(10, warmup_steps=1, now=clock)
    seen = []
    result = train_loop(backend, batches(), budget, schedule, tokens_per_step=24, on_step=seen.append,
                        queue_ahead=queue_ahead)
    # one step runs while the next waits behind it, never more; none while compiling
    assert backend.max_queued == (2 if queue_ahead else 1)
    assert backend.finished == len(backend.steps)            # every dispatched step was finished and counted
    # 1 warmup step + 10 counted steps of 1 s each
    assert result.steps == 11 and result.counted_steps == 10
    assert result.training_seconds == 10 and result.warmup_seconds == 1
    assert result.tokens == 11 * 24 and result.counted_tokens == 10 * 24
    assert result.last_loss == pytest.approx(5.0 - 0.1 * 10)
    # batches are consumed in order, one per step
    assert [int(b.flat[0]) for b in backend.steps] == list(range(11))
    # the schedule is applied before each step, driven by progress
    assert backend.hypers[0] == tuple(schedule.hyper(0, 0.0).values())
    assert backend.hypers[-1][0] == pytest.approx(schedule.lr_multiplier(0.9))
    assert [s.counted for s in seen] == [False] + [True] * 10
    assert seen[-1].remaining_seconds == 0 and seen[-1].progress == 1.0


def test_queued_steps_with_uneven_step_times_stop_within_a_step_of_the_budget():
    class Jitter(FakeClock):
        def advance(self):
            self.t += (0.5, 1.5, 0.7, 1.3)[int(self.t * 10) % 4]

    clock = Jitter(dt=None)
    backend = FakeBackend([3.0] * 100, clock)
    seen = []
    result = train_loop(backend, batches(), BudgetClock(20, now=clock), Schedule.from_recipe(RECIPE), 24,
                        on_step=seen.append)
    assert 20 <= result.training_seconds < 20 + 1.5
    assert backend.finished == len(backend.steps) == result.steps
    assert sum(info.seconds for info in seen if info.counted) == pytest.approx(result.training_seconds)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 101.0])
def test_fast_fail_on_injected_bad_loss(bad):
    clock = FakeClock(dt=1.0)
    backend = FakeBackend([4.0, 3.9, bad, 3.8, 3.7], clock)
    with pytest.raises(FastFail, match="at step 3"):
        train_loop(backend, batches(), BudgetClock(100, now=clock), Schedule.from_recipe(RECIPE), 24)
    assert len(backend.steps) == 4  # stopped when step 3's loss was read; only step 4 was queued behind it


def test_gc_is_frozen_and_disabled_after_the_first_step():
    import gc

    clock = FakeClock(dt=1.0)
    control = GcControl(collect_every=1000)
    states = []
    backend = FakeBackend([3.0] * 10, clock)
    try:
        train_loop(backend, batches(), BudgetClock(3, now=clock), Schedule.from_recipe(RECIPE), 24,
                   on_step=lambda info: states.append(gc.isenabled()), gc_control=control)
        assert states and not any(states)
        assert gc.get_freeze_count() > 0
    finally:
        control.restore()
    assert gc.isenabled()


def test_batch_geometry():
    assert batch_geometry({"TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": 16}, 2048) == (32, 2, 16)
    # the demo profile keeps rows per step at its shorter sequence length
    assert batch_geometry({"TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": 8}, 256) == (32, 4, 8)
    with pytest.raises(ValueError, match="multiple of DEVICE_BATCH_SIZE"):
        batch_geometry({"TOTAL_BATCH_SIZE": 2**16, "DEVICE_BATCH_SIZE": 12}, 2048)
    with pytest.raises(ValueError, match="must be a positive integer"):
        batch_geometry({"TOTAL_BATCH_SIZE": 0, "DEVICE_BATCH_SIZE": 8}, 2048)


def test_micro_batches_reshape_rows_in_order():
    rows = np.arange(4 * 3).reshape(4, 3)
    (x, y, epoch), = list(micro_batches(iter([(rows, rows + 1, 2)]), 2, 2))
    assert x.shape == (2, 2, 3) and (x.reshape(4, 3) == rows).all() and epoch == 2


# --- the real entry point, MLX on the CPU ---------------------------------------------------
def _run_train(cwd, cache, *args, timeout=600):
    env = {**__import__("os").environ, "MLX_AR_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(cwd / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def demo_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo-cache")
    env = {**__import__("os").environ, "MLX_AR_CACHE": str(cache)}
    proc = subprocess.run([sys.executable, str(ROOT / "prepare.py"), "--source", "demo"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return cache


@pytest.mark.slow
def test_demo_run_loss_falls_and_summary_and_record_agree(demo_cache, tmp_path, monkeypatch):
    record = tmp_path / "run.json"
    proc = _run_train(ROOT, demo_cache, "--smoke", "15", "--record", str(record))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    losses = [float(m) for m in re.findall(r"^step \d+ .*?\| loss ([\d.]+)", proc.stdout, re.M)]
    assert len(losses) >= 2 and losses[-1] < losses[0] - 0.5, losses
    summary = parse_summary(proc.stdout)
    rec = json.loads(record.read_text())
    assert rec["status"] == "ok" and rec["profile"] == "demo" and rec["smoke"] is True
    assert summary["budget"] == "15 s (smoke run, not comparable)" and summary["profile"] == "demo"
    assert summary["val_bpb"] == pytest.approx(rec["metrics"]["val_bpb"], abs=1e-6)
    assert summary["contract"] == rec["contract"] and summary["backend"] == "mlx"
    # the trained model clearly beats a uniform guess over the vocabulary, scored the same way
    monkeypatch.setenv("MLX_AR_CACHE", str(demo_cache))
    ds = open_dataset()
    uniform = evaluate_bpb(lambda x, y: np.full(y.shape, math.log(ds.vocab_size)), ds)
    assert 0 < rec["metrics"]["val_bpb"] < uniform - 0.2, (rec["metrics"]["val_bpb"], uniform)
    assert rec["recipe"]["DEPTH"] == 2  # the demo profile's reduced model
    assert list(rec["executed_files"]) == ["train.py"]


@pytest.mark.slow
def test_nan_loss_fails_fast_with_record(demo_cache, tmp_path):
    # A copy of train.py whose loss is NaN from the first step.
    src = TRAIN_PY.read_text().replace(
        "return chunked_cross_entropy(self.hidden(idx), self.lm_head.weight, targets)",
        "return chunked_cross_entropy(self.hidden(idx), self.lm_head.weight, targets) * float('nan')")
    assert "float('nan')" in src
    (tmp_path / "train.py").write_text(src)
    (tmp_path / "mlx_ar").symlink_to(ROOT / "mlx_ar", target_is_directory=True)
    record = tmp_path / "run.json"
    proc = _run_train(tmp_path, demo_cache, "--smoke", "30", "--record", str(record))
    assert proc.returncode == 1
    assert "FAIL: non-finite loss at step 1" in proc.stdout
    assert "val_bpb:" not in proc.stdout
    rec = json.loads(record.read_text())
    assert rec["status"] == "fail" and rec["reason"] == "non-finite loss at step 1"
    assert rec["metrics"]["val_bpb"] is None


def test_missing_data_names_the_command(tmp_path):
    record = tmp_path / "run.json"
    proc = _run_train(ROOT, tmp_path / "empty-cache", "--record", str(record), timeout=120)
    assert proc.returncode == 1
    assert "FAIL:" in proc.stdout and "prepare.py" in proc.stdout
    assert json.loads(record.read_text())["status"] == "fail"


def test_cli_help_loads_no_framework():
    code = ("import sys; from click.testing import CliRunner; from mlx_ar.cli import main; "
            "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
            "assert all(c in r.output for c in ('prepare', 'train', 'bench', 'run', 'noise', 'results', 'workers', 'compare', 'transplant', 'plot')), r.output; "
            "heavy = [m for m in ('mlx', 'mlx.core', 'torch', 'pyarrow', 'git', 'matplotlib') if m in sys.modules]; "
            "assert not heavy, heavy")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_bench_train_reports_figures_on_random_and_real_tokens(demo_cache, monkeypatch):
    from mlx_ar.bench import run_train_bench
    from mlx_ar.constants import DEMO

    from _train_utils import TINY

    monkeypatch.setenv("MLX_AR_CACHE", str(demo_cache))
    for dataset in (None, open_dataset("demo")):
        figures = run_train_bench("mlx", TRAIN_PY, TINY, DEMO, steps=2, warmup=1, echo=None, dataset=dataset)
        assert figures["tok_per_sec"] > 0 and figures["ms_per_step"] > 0
        assert 0 < figures["optimizer_share_percent"] < 100 and figures["peak_memory_mb"] > 0
        assert figures["mfu_percent"] is None  # no honest peak for a CPU
        assert figures["tokens"] == ("random" if dataset is None else "dataset demo")
        assert figures["recipe_overrides"]["DEPTH"] == TINY["DEPTH"]


@pytest.mark.parametrize("args, message", [
    (["train", "--set", "DEPTH"], "--set expects NAME=VALUE, got 'DEPTH'"),
    (["train", "--set", "NOT_A_DIAL=1"], "has no recipe constant named NOT_A_DIAL"),
    (["train", "--set", "TOTAL_BATCH_SIZE=1000"], "TOTAL_BATCH_SIZE (1000) must be a multiple"),
    (["train", "--data", "nope"], "dataset 'nope' is not prepared"),
    (["loader", "--data", "nope"], "dataset 'nope' is not prepared"),
])
def test_bench_bad_input_is_a_one_line_error(args, message, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from mlx_ar.bench import bench_command

    monkeypatch.setenv("MLX_AR_CACHE", str(tmp_path))
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(bench_command, args)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert message in result.output and "Traceback" not in result.output
