"""The child runner: log capture, hard timeout and Ctrl-C kill the whole process group, and
`assess` turns exit codes, records and logs into one trustworthy verdict with a clear reason."""
import signal
import sys
import time

import pytest

from _ledger_fakes import pid_alive
from mlx_ar.harness.summary import SUMMARY_KEYS, build_record, format_summary, write_record
from mlx_ar.ledger.runner import (ChildResult, assess, exception_from_log, fail_reason_from_log, looks_like_oom,
                                  run_child)

PY = sys.executable


def test_child_output_goes_to_the_log(tmp_path):
    beats = []
    r = run_child([PY, "-c", "import sys, time; print('hello'); print('oops', file=sys.stderr); time.sleep(1.0); "
                              "print('last line'); sys.exit(3)"],
                  cwd=tmp_path, log_path=tmp_path / "a" / "train.log", timeout_s=10,
                  heartbeat=lambda s, line: beats.append(line), heartbeat_s=0.15)
    assert (r.returncode, r.timed_out, r.last_line) == (3, False, "last line")
    assert (tmp_path / "a" / "train.log").read_text().split() == ["hello", "oops", "last", "line"]
    assert "oops" in beats  # the latest line at some heartbeat during the sleep


def test_timeout_kills_the_child_and_its_children(tmp_path):
    script = ("import subprocess, sys, time; "
              f"p = subprocess.Popen([{PY!r}, '-c', 'import time; time.sleep(60)']); "
              f"open({str(tmp_path / 'gc.pid')!r}, 'w').write(str(p.pid)); print('started', flush=True); time.sleep(60)")
    t0 = time.monotonic()
    r = run_child([PY, "-c", script], cwd=tmp_path, log_path=tmp_path / "t.log", timeout_s=1.0)
    assert r.timed_out and r.returncode is None and time.monotonic() - t0 < 10
    grandchild = int((tmp_path / "gc.pid").read_text())
    for _ in range(50):
        if not pid_alive(grandchild):
            break
        time.sleep(0.1)
    assert not pid_alive(grandchild)


def test_ctrl_c_in_the_loop_kills_the_child(tmp_path):
    pid_file = tmp_path / "pid"
    calls = {"n": 0}

    def clock():  # the loop's wait is interrupted as Ctrl-C would interrupt it
        calls["n"] += 1
        if pid_file.exists() and pid_file.read_text():
            raise KeyboardInterrupt
        return time.monotonic()

    with pytest.raises(KeyboardInterrupt):
        run_child([PY, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"],
                  cwd=tmp_path, log_path=tmp_path / "c.log", timeout_s=60, clock=clock)
    assert not pid_alive(int(pid_file.read_text()))


# --- assess ----------------------------------------------------------------------------------------
METRICS = dict(val_bpb=1.234567, training_seconds=1.0, total_seconds=2.0, peak_vram_mb=100.0, mfu_percent=None,
               total_tokens_M=0.1, num_steps=10, num_params_M=1.0, depth=2, tok_per_sec=500, startup_seconds=0.1)


def _record(path, status="ok", reason=None, metrics=METRICS):
    write_record(path, build_record(status=status, reason=reason, backend="mlx", device="X", profile="demo",
                                    smoke=False, time_budget=1.0, seed=1, dataset="d", recipe={}, contract="c",
                                    contract_parts={}, metrics=metrics if status == "ok" else {},
                                    executed_files={}, versions={}, started_at="t", finished_at="t"))


def _summary(**over):
    # Every summary key (None prints `unknown`), so keys added to the block later need no edit here.
    return format_summary({**dict.fromkeys(SUMMARY_KEYS), **METRICS, **over, "backend": "mlx", "device": "X",
                           "profile": "demo", "budget": "1 s", "seed": 1, "contract": "c", "record": "run.json"})


def _judge(tmp_path, log_text, rc=0, timed_out=False, record=None):
    log = tmp_path / "train.log"
    log.write_text(log_text)
    rec = tmp_path / "run.json"
    if record is not None:
        record(rec)
    return assess(ChildResult(rc, timed_out, 1.0, log), rec, seed=1)


def test_ok_run_trusts_the_record_and_cross_checks_the_summary(tmp_path):
    out = _judge(tmp_path, "step 1\n" + _summary(), record=_record)
    assert out.status == "ok" and out.metrics["val_bpb"] == 1.234567 and out.reason is None
    out = _judge(tmp_path, "step 1\n" + _summary(val_bpb=1.3), record=_record)
    assert out.status == "fail" and "record says val_bpb = 1.234567 but the printed summary says 1.3" in out.reason
    out = _judge(tmp_path, "step 1\n", record=_record)
    assert out.status == "ok" and "no summary block" in out.notes[0]


@pytest.mark.parametrize("log,rc,timed_out,record,expected", [
    ("FAIL: non-finite loss at step 7\n", 1, False, "nan", "non-finite loss at step 7"),
    ("Traceback (most recent call last):\n  File \"train.py\", line 3, in <module>\n    f()\n"
     "ZeroDivisionError: division by zero\n", 1, False, None, "exit code 1: ZeroDivisionError: division by zero"),
    ("RuntimeError: [METAL] Command buffer execution failed: Insufficient Memory\n", 1, False, None,
     "out of memory: RuntimeError: [METAL]"),
    ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\n", 1, False, None, "out of memory"),
    ("step 1\n", -signal.SIGKILL, False, None, "killed by SIGKILL (the OS kills processes that exhaust memory)"),
    ("step 1\n", -signal.SIGSEGV, False, None, "killed by SIGSEGV"),
    ("step 1\n", None, True, None, "timeout: killed after 1 s"),
    ("step 1\n", 0, False, None, "train.py exited 0 but wrote no run record"),
    ("", 2, False, None, "exit code 2: no output"),
])
def test_failures_get_one_clear_reason(tmp_path, log, rc, timed_out, record, expected):
    rec = (lambda p: _record(p, "fail", "non-finite loss at step 7")) if record == "nan" else None
    out = _judge(tmp_path, log, rc=rc, timed_out=timed_out, record=rec)
    assert out.status == "fail" and expected in out.reason, out.reason


def test_unreadable_record_and_ok_record_with_bad_exit(tmp_path):
    out = _judge(tmp_path, "x\n", record=lambda p: p.write_text("{half"))
    assert "is unreadable" in out.reason
    out = _judge(tmp_path, _summary(), rc=1, record=_record)
    assert out.status == "fail" and out.reason.startswith("exit code 1")


def test_log_helpers():
    assert fail_reason_from_log("a\nFAIL: first\nb\rFAIL: second one\n") == "second one"
    assert fail_reason_from_log("no failure") is None
    tb = "Traceback (most recent call last):\n  File \"x\", line 1\n    boom()\nKeyError: 'DEPTH'\n"
    assert exception_from_log("noise\n" + tb + "after\n") == "KeyError: 'DEPTH'"
    assert exception_from_log("fine") is None
    assert looks_like_oom("ok\nkIOGPUCommandBufferCallbackErrorOutOfMemory\n") == "kIOGPUCommandBufferCallbackErrorOutOfMemory"
    assert looks_like_oom("loss 3.2\nstep 4") is None
