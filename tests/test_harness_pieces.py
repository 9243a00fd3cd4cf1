"""Budget clock, schedules, gc control, Metal limit sizing and the progress line."""
import gc
import math
import sys

import pytest

from mlx_ar.backends.timing import median_seconds
from mlx_ar.harness.clock import BudgetClock
from mlx_ar.backends.mlx.memory import GIB, apply_metal_limits, metal_memory_limits, recommended_working_set
from mlx_ar.harness.memory import GcControl
from mlx_ar.harness.progress import ProgressLine
from mlx_ar.harness.schedules import RECIPE_NAMES, Schedule, ScheduleError


# --- clock -----------------------------------------------------------------------------------
class FakeTime:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def run_step(clock, fake, seconds):
    clock.step_started()
    fake.t += seconds
    return clock.step_finished()


def test_clock_excludes_warmup_steps_and_counts_the_rest():
    fake = FakeTime()
    clock = BudgetClock(10.0, warmup_steps=2, now=fake)
    assert run_step(clock, fake, 5.0) == 5.0   # compile step: timed, not counted
    assert run_step(clock, fake, 4.0) == 4.0
    assert clock.training_seconds == 0.0 and clock.progress == 0.0 and not clock.done
    assert clock.excluded_seconds == 9.0
    run_step(clock, fake, 2.5)
    assert clock.steps == 3 and clock.counted_steps == 1
    assert clock.training_seconds == 2.5
    assert clock.progress == pytest.approx(0.25)
    assert clock.remaining_seconds == pytest.approx(7.5)


def test_clock_time_outside_steps_is_not_counted():
    fake = FakeTime()
    clock = BudgetClock(10.0, warmup_steps=0, now=fake)
    run_step(clock, fake, 1.0)
    fake.t += 100.0  # evaluation, logging, data loading between steps
    run_step(clock, fake, 1.0)
    assert clock.training_seconds == 2.0 and clock.counted_steps == 2


def test_clock_done_and_progress_clamped_at_budget():
    fake = FakeTime()
    clock = BudgetClock(3.0, warmup_steps=0, now=fake)
    while not clock.done:
        run_step(clock, fake, 0.7)
    assert clock.counted_steps == 5  # 2.8 s < 3 s, the fifth step crosses the budget
    assert clock.training_seconds == pytest.approx(3.5)
    assert clock.progress == 1.0 and clock.remaining_seconds == 0.0


def test_clock_misuse_is_reported():
    clock = BudgetClock(1.0, now=FakeTime())
    with pytest.raises(RuntimeError, match="without step_started"):
        clock.step_finished()
    clock.step_started()
    with pytest.raises(RuntimeError, match="twice"):
        clock.step_started()
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="budget_s"):
            BudgetClock(bad)
    with pytest.raises(ValueError, match="warmup_steps"):
        BudgetClock(1.0, warmup_steps=-1)


def test_median_seconds_skips_the_warmup_calls():
    t = [0.0]
    durations = iter([50.0, 40.0, 3.0, 1.0, 2.0, 9.0, 2.5])   # two compile calls, then five timed

    def run():
        t[0] += next(durations)

    assert median_seconds(run, repeats=5, now=lambda: t[0]) == 2.5


def test_clock_in_warmup_flag():
    fake = FakeTime()
    clock = BudgetClock(1.0, warmup_steps=1, now=fake)
    assert clock.in_warmup
    run_step(clock, fake, 0.1)
    assert not clock.in_warmup


# --- schedules -------------------------------------------------------------------------------
RECIPE = {
    "DEPTH": 4,  # unrelated names are ignored
    "WARMUP_RATIO": 0.1,
    "WARMDOWN_RATIO": 0.5,
    "FINAL_LR_FRAC": 0.1,
    "WEIGHT_DECAY": 0.2,
    "MUON_MOMENTUM": 0.95,
    "MUON_MOMENTUM_START": 0.85,
    "MUON_MOMENTUM_WARMUP_STEPS": 300,
}


@pytest.mark.parametrize("progress, expected", [
    (0.0, 0.0),      # start of warmup
    (0.05, 0.5),     # mid warmup
    (0.1, 1.0),      # end of warmup
    (0.3, 1.0),      # flat
    (0.5, 1.0),      # start of warmdown
    (0.75, 0.55),    # mid warmdown: halfway from 1 to FINAL_LR_FRAC
    (1.0, 0.1),      # end: FINAL_LR_FRAC
    (1.5, 0.1),      # past the end (the last step can overshoot the budget)
    (-0.2, 0.0),
])
def test_lr_multiplier_at_key_points(progress, expected):
    assert Schedule.from_recipe(RECIPE).lr_multiplier(progress) == pytest.approx(expected)


def test_lr_multiplier_shape_is_monotone_and_continuous():
    s = Schedule.from_recipe(RECIPE)
    xs = [i / 1000 for i in range(1001)]
    ys = [s.lr_multiplier(x) for x in xs]
    assert all(b >= a for a, b in zip(ys[:101], ys[1:101]))          # warmup rises
    assert all(b <= a + 1e-12 for a, b in zip(ys[100:], ys[101:]))   # then never rises
    assert max(abs(b - a) for a, b in zip(ys, ys[1:])) <= 0.011      # no jumps


def test_lr_multiplier_without_warmup_or_warmdown():
    s = Schedule.from_recipe({**RECIPE, "WARMUP_RATIO": 0.0, "WARMDOWN_RATIO": 0.0})
    assert [s.lr_multiplier(p) for p in (0.0, 0.5, 1.0)] == [1.0, 1.0, 1.0]
    s = Schedule.from_recipe({**RECIPE, "WARMUP_RATIO": 0.0, "WARMDOWN_RATIO": 1.0, "FINAL_LR_FRAC": 0.0})
    assert [s.lr_multiplier(p) for p in (0.0, 0.5, 1.0)] == pytest.approx([1.0, 0.5, 0.0])


def test_muon_momentum_warmup():
    s = Schedule.from_recipe(RECIPE)
    assert s.muon_momentum(0) == pytest.approx(0.85)
    assert s.muon_momentum(150) == pytest.approx(0.90)
    assert s.muon_momentum(300) == pytest.approx(0.95)
    assert s.muon_momentum(10_000) == pytest.approx(0.95)
    s0 = Schedule.from_recipe({**RECIPE, "MUON_MOMENTUM_WARMUP_STEPS": 0})
    assert s0.muon_momentum(0) == 0.95


def test_weight_decay_falls_linearly_to_zero():
    s = Schedule.from_recipe(RECIPE)
    assert [s.weight_decay(p) for p in (0.0, 0.5, 1.0, 2.0)] == pytest.approx([0.2, 0.1, 0.0, 0.0])


def test_hyper_bundles_all_three():
    h = Schedule.from_recipe(RECIPE).hyper(step=150, progress=0.75)
    assert h == pytest.approx({"lr_mult": 0.55, "muon_momentum": 0.90, "weight_decay": 0.05})


def test_missing_recipe_names_are_all_named():
    recipe = {k: v for k, v in RECIPE.items() if k not in ("WARMDOWN_RATIO", "MUON_MOMENTUM_START")}
    with pytest.raises(ScheduleError) as e:
        Schedule.from_recipe(recipe)
    assert "WARMDOWN_RATIO" in str(e.value) and "MUON_MOMENTUM_START" in str(e.value)
    assert "train.py" in str(e.value)
    assert set(RECIPE_NAMES) <= set(RECIPE)


@pytest.mark.parametrize("name, value, match", [
    ("WARMUP_RATIO", 1.5, "WARMUP_RATIO must be in"),
    ("WARMDOWN_RATIO", 0.95, "WARMUP_RATIO \\+ WARMDOWN_RATIO"),
    ("FINAL_LR_FRAC", -0.1, "FINAL_LR_FRAC"),
    ("WEIGHT_DECAY", "0.2", "WEIGHT_DECAY must be a finite number"),
    ("MUON_MOMENTUM", 1.0, "MUON_MOMENTUM must be in"),
    ("MUON_MOMENTUM_WARMUP_STEPS", 2.5, "MUON_MOMENTUM_WARMUP_STEPS"),
    ("MUON_MOMENTUM_START", True, "MUON_MOMENTUM_START must be a finite number"),
])
def test_bad_recipe_values_are_named(name, value, match):
    with pytest.raises(ScheduleError, match=match):
        Schedule.from_recipe({**RECIPE, name: value})


# --- gc control ------------------------------------------------------------------------------
def test_gc_frozen_and_disabled_after_step_1_with_real_gc():
    was_enabled = gc.isenabled()
    gc.enable()
    ctl = GcControl(collect_every=500)
    try:
        ctl.after_step(1)
        assert not gc.isenabled()
        assert gc.get_freeze_count() > 0
        ctl.after_step(2)
        assert not gc.isenabled()
    finally:
        ctl.restore()
        restored = gc.isenabled(), gc.get_freeze_count()
        if not was_enabled:
            gc.disable()
    assert restored == (True, 0)


class FakeGc:
    def __init__(self, enabled=True):
        self.enabled = enabled
        self.calls = []

    def isenabled(self):
        return self.enabled

    def collect(self):
        self.calls.append("collect")

    def freeze(self):
        self.calls.append("freeze")

    def unfreeze(self):
        self.calls.append("unfreeze")

    def disable(self):
        self.enabled = False
        self.calls.append("disable")

    def enable(self):
        self.enabled = True
        self.calls.append("enable")


def test_gc_periodic_collect_and_restore_order():
    fake = FakeGc()
    ctl = GcControl(collect_every=3, gc_module=fake)
    for step in range(1, 8):
        ctl.after_step(step)
    assert fake.calls == ["collect", "freeze", "disable", "collect", "collect"]  # steps 1, 3, 6
    assert ctl.collections == 3
    ctl.restore()
    ctl.restore()  # idempotent
    assert fake.calls[-2:] == ["unfreeze", "enable"] and fake.enabled


def test_gc_restore_keeps_gc_off_if_it_was_off_and_zero_means_never():
    fake = FakeGc(enabled=False)
    ctl = GcControl(collect_every=0, gc_module=fake)
    for step in range(1, 2000):
        ctl.after_step(step)
    assert fake.calls.count("collect") == 1
    ctl.restore()
    assert not fake.enabled
    with pytest.raises(ValueError, match="collect_every"):
        GcControl(collect_every=-5)


# --- Metal limits ----------------------------------------------------------------------------
# Metal's recommended working set is about 2/3 of memory on small Macs and 3/4 on large ones.
@pytest.mark.parametrize("total_gb, recommended_gb, wired_gb, cache_gb", [
    (8, 5.33, 5.0, 1.25),      # 3 GB left to macOS, small cache
    (16, 10.67, 10.67, 2.67),  # capped by Metal's recommended working set
    (36, 27.0, 27.0, 13.5),
    (128, 96.0, 96.0, 48.0),
])
def test_metal_limits_by_machine_size(total_gb, recommended_gb, wired_gb, cache_gb):
    total, rec = total_gb * GIB, int(recommended_gb * GIB)
    lim = metal_memory_limits(total, rec)
    assert lim["wired_limit"] / GIB == pytest.approx(wired_gb, abs=0.01)
    assert lim["cache_limit"] / GIB == pytest.approx(cache_gb, abs=0.01)
    assert lim["wired_limit"] <= rec
    assert lim["wired_limit"] + lim["os_reserve"] <= total
    assert lim["os_reserve"] >= 3 * GIB
    assert lim["cache_limit"] <= lim["wired_limit"]


def test_metal_limits_without_recommended_size_and_bad_input():
    lim = metal_memory_limits(64 * GIB, None)
    assert lim["wired_limit"] == 48 * GIB and lim["os_reserve"] == 16 * GIB
    tiny = metal_memory_limits(2 * GIB, None)  # nothing left after the OS: no wiring at all
    assert tiny["wired_limit"] == 0 and tiny["cache_limit"] == 0
    with pytest.raises(ValueError, match="total_bytes"):
        metal_memory_limits(0, None)


class FakeMetal:
    def __init__(self, available):
        self.available = available

    def is_available(self):
        return self.available


class FakeMx:
    def __init__(self, available):
        self.metal = FakeMetal(available)
        self.calls = []

    def set_wired_limit(self, n):
        self.calls.append(("wired", n))
        return 0

    def set_cache_limit(self, n):
        self.calls.append(("cache", n))
        return 0

    def device_info(self):
        return {"max_recommended_working_set_size": 27 * GIB, "memory_size": 36 * GIB}


def test_apply_metal_limits_only_on_metal():
    limits = metal_memory_limits(36 * GIB, 27 * GIB)
    on, off = FakeMx(True), FakeMx(False)
    assert apply_metal_limits(on, limits) is True
    assert on.calls == [("wired", limits["wired_limit"]), ("cache", limits["cache_limit"])]
    assert apply_metal_limits(off, limits) is False and off.calls == []
    assert recommended_working_set(on) == 27 * GIB
    assert recommended_working_set(off) is None


# --- progress line ---------------------------------------------------------------------------
def test_progress_ema_is_debiased():
    line = ProgressLine()
    assert line.smoothed is None
    assert line.update(4.0) == pytest.approx(4.0)  # no pull toward 0 on the first value
    # ema = 0.9*0.4 + 0.1*2.0 = 0.56; debiased by 1 - 0.81
    assert line.update(2.0) == pytest.approx(0.56 / 0.19)
    for _ in range(200):
        line.update(3.0)
    assert line.smoothed == pytest.approx(3.0)


def test_progress_line_format():
    line = ProgressLine()
    text = line.format(step=42, progress=0.123, loss=3.45678, lr_mult=1.0, step_seconds=0.1234,
                       tok_per_sec=531234.4, mfu=12.34, remaining_s=263.2, epoch=1)
    assert text == ("step 00042 (12.3%) | loss 3.4568 | lrm 1.00 | 123.4 ms | 531,234 tok/s"
                    " | mfu 12.3% | epoch 1 | 263 s left")


def test_progress_line_update_every_step_format_sometimes_counts_each_loss_once():
    by_update, by_format = ProgressLine(), ProgressLine()
    losses = [5.0, 4.0, 3.5, 3.0, 2.0, 2.5]
    for i, loss in enumerate(losses, 1):
        by_update.update(loss)
        if i % 3 == 0:  # the loop prints every third step
            last_printed = by_update.format(i, 0.1, loss, 1.0, 0.1, 1.0, None, 10.0, 1)
        by_format.format(i, 0.1, loss, 1.0, 0.1, 1.0, None, 10.0, 1)
    reference = ProgressLine()
    for loss in losses:
        reference.update(loss)
    assert by_update.smoothed == pytest.approx(reference.smoothed)
    assert by_format.smoothed == pytest.approx(reference.smoothed)
    # the printed line shows the average over all six losses
    assert f"| loss {reference.smoothed:.4f} |" in last_printed
    assert reference.smoothed != pytest.approx(2.5)


def test_progress_line_unknown_mfu_and_epoch():
    text = ProgressLine().format(1, 0.0, 9.0, 0.0, 2.5, 10.0, None, 300.0, None)
    assert "| mfu unknown |" in text and "| epoch ? |" in text and "2500.0 ms" in text
    assert math.isclose(float(text.split("loss ")[1].split(" ")[0]), 9.0)


def test_a_backend_without_its_framework_names_the_extra_to_install(monkeypatch):
    import builtins

    from mlx_ar.backends import BackendUnavailable, get_backend

    real_import = builtins.__import__

    def no_torch(name, *args, **kwargs):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError("No module named 'torch'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_torch)
    with pytest.raises(BackendUnavailable, match=r'cuda backend needs torch.*pip install -e "\.\[cuda\]"'):
        get_backend("cuda", "train.py")


def test_progress_line_rate_is_a_recent_mean_so_a_queued_last_step_reads_sanely():
    import io
    from types import SimpleNamespace

    from mlx_ar.harness.loop import StepInfo
    from mlx_ar.harness.main import RATE_WINDOW_S, _Progress

    out = io.StringIO()
    progress = _Progress(SimpleNamespace(flops_per_token=1e6), tokens_per_step=1000, peak=1e12, stream=out)
    hyper = {"lr_mult": 1.0}
    # A compile step, then queued steps whose times pair up (0.15 + 0.05 s) and a last one near zero.
    seconds = [30.0] + [0.15, 0.05] * 50 + [0.0001]
    for i, s in enumerate(seconds):
        remaining = 0.0 if i == len(seconds) - 1 else 100.0
        progress(StepInfo(i + 1, 3.0, s, hyper, i / len(seconds), remaining, 0, counted=i > 0))
    lines = out.getvalue().splitlines()

    def rate(line):
        return float(line.split(" tok/s")[0].rsplit("| ", 1)[1].replace(",", ""))
    assert "| 30000.0 ms |" in lines[0] and rate(lines[0]) == 33    # warmup: its own time
    assert rate(lines[-1]) == pytest.approx(10_000, rel=0.1), lines[-1]   # ~0.1 s a step, not 0.0001
    assert "| mfu 1.0% |" in lines[-1]
    assert RATE_WINDOW_S >= 1.0
