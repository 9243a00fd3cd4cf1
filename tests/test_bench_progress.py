"""`mlx-ar bench train` shows a live line with an ETA instead of silence."""
from types import SimpleNamespace

from mlx_ar.bench import StepProgress


def _info(step, seconds, counted):
    return SimpleNamespace(step=step, seconds=seconds, counted=counted)


def test_progress_line_has_compile_time_then_eta():
    lines, now = [], [0.0]

    def write(line, done=False):
        lines.append((line, done))
    write.interval_s = 1.0
    p = StepProgress(write, clock=lambda: now[0])
    p.start(warmup=2, steps=4)
    assert "warmup step 1 of 2" in lines[-1][0]
    now[0] = 30.0
    p(_info(1, 30.0, False))
    assert lines[-1][0] == "warmup step 1 of 2 | 30 s elapsed (compiling)"
    now[0] = 30.5
    p(_info(2, 0.5, False))        # within the interval: no new line
    assert len(lines) == 2
    now[0] = 32.0
    p(_info(3, 0.5, True))
    assert lines[-1] == ("step 1 of 4 | 500.0 ms/step | ETA 2 s", False)
    for i, t in ((4, 33.0), (5, 33.5), (6, 34.0)):
        now[0] = t
        p(_info(i, 0.5, True))
    assert lines[-1] == ("step 4 of 4 | 500.0 ms/step | done", True)


def test_a_long_step_still_moves_the_line():
    lines, now = [], [0.0]

    def write(line, done=False):
        lines.append((line, done))
    write.interval_s, write.tick_s = 1.0, 1.0
    p = StepProgress(write, clock=lambda: now[0])
    p.start(warmup=1, steps=2)
    now[0] = 0.5
    p.tick()                       # under tick_s since the last line: nothing new
    assert len(lines) == 1
    now[0] = 42.0                  # a first compile of minutes: elapsed time counts up
    p.tick()
    assert lines[-1] == ("compiling: warmup step 1 of 1 | 42 s elapsed", False)
    now[0] = 50.0
    p(_info(1, 50.0, False))
    now[0] = 60.0
    p(_info(2, 10.0, True))        # one timed step of 10 s: 10 s left
    assert lines[-1] == ("step 1 of 2 | 10000.0 ms/step | ETA 10 s", False)
    now[0] = 64.0                  # the ETA counts down while the next step runs
    p.tick()
    assert lines[-1] == ("step 1 of 2 | 10000.0 ms/step | ETA 6 s", False)
    now[0] = 70.0
    p(_info(3, 10.0, True))
    assert lines[-1] == ("step 2 of 2 | 10000.0 ms/step | done", True)
    now[0] = 80.0
    p.tick()                       # done: the finished line stays
    assert lines[-1] == ("step 2 of 2 | 10000.0 ms/step | done", True)


def test_bench_train_writes_progress_while_it_runs():
    from mlx_ar.bench import run_train_bench
    from mlx_ar.constants import DEMO

    lines = []

    def write(line, done=False):
        lines.append(line)
    write.interval_s = 0.0
    figures = run_train_bench("mlx", "train.py", {}, DEMO, steps=2, warmup=1, echo=None,
                              progress=StepProgress(write))
    assert figures["tok_per_sec"] > 0
    assert lines[0].startswith("compiling: warmup step 1 of") and lines[-1].endswith("| done")
    assert any("warmup step 1 of" in x and "elapsed" in x for x in lines)
