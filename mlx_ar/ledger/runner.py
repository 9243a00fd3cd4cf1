"""One training run as a child process: hard timeout, full log, and a verdict on what it produced.

    child = run_child(cmd, cwd=root, log_path=run_dir / "train.log", timeout_s=900)
    outcome = assess(child, record_path=run_dir / "run.json", seed=42)
    outcome.status, outcome.reason, outcome.metrics

The child runs in its own process group (session), so a timeout or a Ctrl-C kills it and
everything it started, and Ctrl-C in the terminal reaches only the loop, which decides what
to record. `assess` trusts the JSON record train.py writes and cross-checks it against the
summary block printed in the log; anything missing, failed or inconsistent becomes a
failed outcome with a one-line reason (out of memory, exception, NaN loss, timeout, ...).
"""
import json
import math
import os
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

# Seconds a child gets to exit after SIGTERM before SIGKILL.
KILL_GRACE_S = 3.0
# Seconds between heartbeat lines while a child runs (when a heartbeat callback is given).
HEARTBEAT_S = 30.0
# Phrases that mark an out-of-memory failure (MLX/Metal, CUDA, Python, C++).
OOM_PATTERNS = (
    "out of memory", "outofmemory", "insufficient memory", "memoryerror", "std::bad_alloc",
    "cannot allocate memory", "failed to allocate",
)


@dataclass
class ChildResult:
    returncode: int | None           # None when the child had to be killed
    timed_out: bool
    duration_s: float
    log_path: Path
    last_line: str = ""


def _kill_group(proc: subprocess.Popen, grace_s: float = KILL_GRACE_S) -> None:
    """SIGTERM the child's process group, then SIGKILL whatever is left after `grace_s`."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=wait_s)
            if sig == signal.SIGKILL:
                return
        except subprocess.TimeoutExpired:
            continue
        # The leader exited on SIGTERM; make sure nothing else in its group survives.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def run_child(cmd, *, cwd, log_path, timeout_s: float, env: dict | None = None, heartbeat=None,
              tee=None, clock=time.monotonic, poll_s: float = 0.1, heartbeat_s: float = HEARTBEAT_S) -> ChildResult:
    """Run `cmd` in `cwd` with stdout+stderr going to `log_path`; kill its group after `timeout_s`.

    `heartbeat(elapsed_s, last_line)` is called about every `heartbeat_s` seconds, `tee(bytes)`
    with every chunk of output (a verbose terminal). KeyboardInterrupt kills the child's
    group and is re-raised once the child is gone.
    """
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    last = {"line": b""}

    with open(log_path, "wb") as log:
        start = clock()
        proc = subprocess.Popen(list(map(str, cmd)), cwd=str(cwd), env=full_env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

        def pump():
            # Copy output as it comes, so the log is complete even if the loop is killed.
            for chunk in iter(lambda: proc.stdout.read1(65536), b""):
                log.write(chunk)
                log.flush()
                lines = [ln for ln in re.split(rb"[\r\n]", chunk) if ln.strip()]
                if lines:
                    last["line"] = lines[-1]
                if tee is not None:
                    tee(chunk)

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        timed_out = False
        next_beat = start + heartbeat_s
        try:
            while True:
                try:
                    proc.wait(timeout=poll_s)
                    break
                except subprocess.TimeoutExpired:
                    pass
                now = clock()
                if now - start > timeout_s:
                    timed_out = True
                    _kill_group(proc)
                    break
                if heartbeat is not None and now >= next_beat:
                    next_beat = now + heartbeat_s
                    heartbeat(now - start, last["line"].decode(errors="replace").strip())
        except BaseException:  # Ctrl-C (KeyboardInterrupt) or a signal turned into an exception
            _kill_group(proc)
            reader.join(timeout=5.0)
            raise
        finally:
            if proc.poll() is None:
                _kill_group(proc)
        # A grandchild that inherited the pipe would keep the reader alive; kill the group.
        reader.join(timeout=2.0)
        if reader.is_alive():
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            reader.join(timeout=5.0)
        duration = clock() - start
    rc = None if timed_out else proc.returncode
    return ChildResult(rc, timed_out, duration, log_path, last["line"].decode(errors="replace").strip())


# --- reading what the run produced -----------------------------------------------------------
@dataclass
class RunOutcome:
    """One run judged: status "ok" (trustworthy metrics) or "fail" (with a reason)."""

    status: str
    reason: str | None
    seed: int
    metrics: dict | None = None
    record: dict | None = None
    summary: dict = field(default_factory=dict)
    returncode: int | None = None
    timed_out: bool = False
    duration_s: float = 0.0
    log_path: str | None = None
    record_path: str | None = None
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        """The run as a receipt entry (metrics only, not the whole record)."""
        return {"seed": self.seed, "status": self.status, "reason": self.reason, "metrics": self.metrics,
                "returncode": self.returncode, "timed_out": self.timed_out,
                "duration_s": round(self.duration_s, 1), "log": self.log_path, "record": self.record_path,
                "notes": list(self.notes)}


def read_log(path, limit: int = 2_000_000) -> str:
    """The log's last `limit` bytes as text (a runaway child must not exhaust memory)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def fail_reason_from_log(text: str) -> str | None:
    """The reason printed on the log's last `FAIL: ` line, if any."""
    found = None
    for line in re.split(r"[\r\n]", text):
        if line.startswith("FAIL: "):
            found = line[len("FAIL: "):].strip()
    return found


def exception_from_log(text: str) -> str | None:
    """The exception line of the log's last Python traceback (`ValueError: boom`), if any."""
    i = text.rfind("Traceback (most recent call last):")
    if i < 0:
        return None
    # Frames are indented; the first unindented line after them names the exception.
    for line in text[i:].splitlines()[1:]:
        if line.strip() and not line[0].isspace():
            return line.strip()
    return None


def _squash(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def looks_like_oom(*texts) -> str | None:
    """The first line of `texts` that reads like an out-of-memory failure."""
    patterns = [_squash(p) for p in OOM_PATTERNS]
    for text in texts:
        for line in (text or "").splitlines():
            if any(p in _squash(line) for p in patterns):
                return line.strip()
    return None


def _signal_name(rc: int) -> str:
    try:
        return signal.Signals(-rc).name
    except ValueError:
        return f"signal {-rc}"


def _load_record(path: Path) -> tuple[dict | None, str | None]:
    if not path.exists():
        return None, None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return None, f"the run record {path} is unreadable ({e})"
    if not isinstance(data, dict) or data.get("status") not in ("ok", "fail"):
        return None, f"the run record {path} has no status ok/fail"
    return data, None


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def cross_check(metrics: dict, summary: dict) -> str | None:
    """Where the printed summary disagrees with the record, or None when they agree."""
    checks = (("val_bpb", 5e-7), ("num_steps", 0), ("peak_vram_mb", 0.051), ("tok_per_sec", 0.51))
    for key, tol in checks:
        a, b = metrics.get(key), summary.get(key)
        if _finite(a) and _finite(b) and abs(float(a) - float(b)) > tol:
            return f"the run record says {key} = {a} but the printed summary says {b}"
    return None


def assess(child: ChildResult, record_path, seed: int, objective: str = "val_bpb", parse_summary=None) -> RunOutcome:
    """Judge one finished child from its exit status, its record and its log."""
    if parse_summary is None:
        from ..harness.summary import parse_summary
    record_path = Path(record_path)
    log_text = read_log(child.log_path)
    out = RunOutcome("fail", None, seed, returncode=child.returncode, timed_out=child.timed_out,
                     duration_s=child.duration_s, log_path=str(child.log_path), record_path=str(record_path))
    try:
        out.summary = parse_summary(log_text)
    except ValueError as e:
        out.notes.append(f"summary block unreadable: {e}")
    record, record_problem = _load_record(record_path)
    out.record = record
    if record is not None:
        out.metrics = record.get("metrics")
    oom = looks_like_oom(log_text, (record or {}).get("reason"))

    def fail(reason):
        if oom and not reason.lower().startswith("out of memory"):
            # Name the failure class first; keep the original words when they already say it.
            reason = f"out of memory: {reason}" if looks_like_oom(reason) else f"out of memory: {oom} ({reason})"
        out.reason = " ".join(str(reason).split())[:500]
        return out

    if child.timed_out:
        return fail(f"timeout: killed after {child.duration_s:.0f} s without finishing "
                    f"(limit is 2 x budget + eval allowance)")
    rc = child.returncode
    if rc is not None and rc < 0:
        return fail(f"killed by {_signal_name(rc)}"
                    + (" (the OS kills processes that exhaust memory)" if rc == -signal.SIGKILL else ""))
    if record_problem:
        return fail(record_problem)
    if record is not None and record["status"] == "fail":
        return fail(record.get("reason") or fail_reason_from_log(log_text) or f"train.py failed (exit {rc})")
    if rc != 0:
        why = fail_reason_from_log(log_text) or exception_from_log(log_text) or child.last_line or "no output"
        return fail(f"exit code {rc}: {why}")
    if record is None:
        return fail(f"train.py exited 0 but wrote no run record at {record_path}")
    metrics = record.get("metrics") or {}
    if not _finite(metrics.get(objective)):
        return fail(f"the run record has no finite {objective}")
    if not out.summary:
        out.notes.append("no summary block in the log; metrics taken from the run record")
    else:
        mismatch = cross_check(metrics, out.summary)
        if mismatch:
            return fail(mismatch)
    out.status = "ok"
    out.metrics = metrics
    return out
