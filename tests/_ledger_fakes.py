"""Fakes for the research-loop tests: a fake train.py, a git repository around it, and checks.

The fake train.py behaves like the real one from the loop's point of view (same arguments,
summary block and run record, built with mlx_ar.harness.summary) but trains nothing: its
recipe constants say what to report or how to fail, so a test "edits train.py" by changing
VALUE or MODE, exactly as an agent edits the real recipe.
"""
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

from mlx_ar.ledger.campaign import Campaign
from mlx_ar.ledger.format import LEDGER_COMMIT_PREFIX, parse_receipt, parse_results

FAKE_TRAIN = textwrap.dedent('''\
    """Fake train.py for the ledger tests."""
    VALUE = 1.0                # the val_bpb this recipe scores, plus seed noise
    NOISE = 0.0                # s.d. of the seed noise
    MODE = "ok"                # ok raise die nan oom hang kill norecord mismatch
    TOK_PER_SEC = 1000         # reported throughput
    MEMORY_MB = 2048.0         # reported peak memory
    SLEEP = 0.0                # seconds of "training"

    import argparse
    import os
    import random
    import signal
    import sys
    import time

    from mlx_ar.harness.summary import SUMMARY_KEYS, build_record, fail_line, format_summary, write_record


    def main():
        p = argparse.ArgumentParser()
        p.add_argument("--record", default="run.json")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--backend", default="mlx")
        p.add_argument("--smoke", type=float, default=None)
        p.add_argument("--data", default=None)
        a = p.parse_args()
        if os.environ.get("FAKE_PID_FILE"):
            with open(os.environ["FAKE_PID_FILE"], "w") as f:
                f.write(str(os.getpid()))
        rate = TOK_PER_SEC
        slow = os.environ.get("FAKE_SLOW_FILE")
        if slow and os.path.exists(slow):  # one throttled run, then the machine recovers
            rate = TOK_PER_SEC * float(open(slow).read())
            os.unlink(slow)
        fields = dict(status="fail", backend=a.backend, device="Fake Chip", profile="demo",
                      smoke=a.smoke is not None, time_budget=a.smoke or 1.0, seed=a.seed, dataset="fake",
                      recipe={"VALUE": VALUE}, contract=os.environ.get("FAKE_CONTRACT", "c0ffee"),
                      contract_parts={"data": "fake"}, executed_files={}, versions={"python": "3"},
                      started_at="2025-01-01T00:00:00Z", finished_at="2025-01-01T00:00:01Z")
        print("step 1 | loss 9.0", flush=True)
        if MODE == "hang":
            while True:
                print("step ... | loss 8.0", flush=True)
                time.sleep(0.2)
        if MODE == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if MODE == "die":
            raise ValueError("boom in the model code")
        if MODE in ("raise", "nan", "oom"):
            reason = {"raise": "ValueError: shapes do not match",
                      "nan": "non-finite loss at step 3",
                      "oom": "RuntimeError: [METAL] Command buffer execution failed: Insufficient Memory "
                             "(00000008:kIOGPUCommandBufferCallbackErrorOutOfMemory)"}[MODE]
            print(fail_line(reason), flush=True)
            write_record(a.record, build_record(reason=reason, metrics={}, **fields))
            sys.exit(1)
        time.sleep(SLEEP)
        val = VALUE + NOISE * random.Random(a.seed).gauss(0.0, 1.0)
        metrics = dict(val_bpb=round(val, 6), training_seconds=1.0, total_seconds=1.5, peak_vram_mb=MEMORY_MB,
                       mfu_percent=None, total_tokens_M=0.1, num_steps=100, num_params_M=1.0, depth=2,
                       tok_per_sec=int(rate), startup_seconds=0.2)
        if MODE != "norecord":
            fields["status"] = "ok"
            write_record(a.record, build_record(metrics=metrics, **fields))
        shown = dict(metrics, val_bpb=val + 0.5) if MODE == "mismatch" else metrics
        values = {**dict.fromkeys(SUMMARY_KEYS), **shown, "backend": a.backend, "device": "Fake Chip",
                  "profile": "demo", "budget": "1 s", "seed": a.seed, "contract": "c0ffee", "record": a.record}
        print(format_summary({k: v for k, v in values.items() if k in SUMMARY_KEYS}), flush=True)


    main()
''')


def git(root, *args) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout.strip()


def show(root, rev_path: str) -> bytes:
    """A file's exact bytes at a revision (`git show rev:path`)."""
    return subprocess.run(["git", "show", rev_path], cwd=root, check=True, capture_output=True).stdout


def set_identity(monkeypatch) -> None:
    for k, v in (("GIT_AUTHOR_NAME", "Test"), ("GIT_AUTHOR_EMAIL", "test@example.com"),
                 ("GIT_COMMITTER_NAME", "Test"), ("GIT_COMMITTER_EMAIL", "test@example.com")):
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    # The loop reads the data profile from the cache; an empty one keeps the tests hermetic.
    import tempfile
    monkeypatch.setenv("MLX_AR_CACHE", tempfile.mkdtemp(prefix="mlx-ar-empty-cache-"))


def make_repo(root: Path, branch: str = "autoresearch/test-box", extra_files: dict | None = None) -> Path:
    """A repository with the fake train.py, a README and a .gitignore for runs/, on `branch`."""
    root.mkdir(parents=True, exist_ok=True)
    git(root, "init", "-q", "-b", branch)
    (root / "train.py").write_text(FAKE_TRAIN)
    (root / "README.md").write_text("notes the agent must not lose\n")
    (root / ".gitignore").write_text("runs/\n__pycache__/\n")
    for name, text in (extra_files or {}).items():
        (root / name).write_text(text)
    git(root, "add", "train.py", "README.md", ".gitignore", *(extra_files or {}))
    git(root, "commit", "-q", "-m", "initial")
    return root


def campaign(**kw) -> Campaign:
    """Settings for fast tests: a 1 s budget, a short timeout, no cool-down waits."""
    base = dict(time_budget=1.0, eval_allowance=3.0, suspect_cooldown=0.0, train_command=(sys.executable, "train.py"))
    base.update(kw)
    return Campaign(**base)


def edit(root: Path, **constants) -> None:
    """Set recipe constants of the fake train.py (what an agent's edit looks like)."""
    p = root / "train.py"
    src = p.read_text()
    for name, value in constants.items():
        src, n = re.subn(rf"^{name} = .*?(\s+#.*)?$", lambda m: f"{name} = {value!r}{m.group(1) or ''}", src,
                         count=1, flags=re.M)
        assert n == 1, name
    p.write_text(src)


def receipts(root: Path) -> list[dict]:
    return [parse_receipt(p.read_text()) for p in sorted((root / "receipts").glob("*.json"))]


def rows(root: Path) -> list[dict]:
    p = root / "results.tsv"
    return parse_results(p.read_text()) if p.exists() else []


def first_parent_log(root: Path) -> list[tuple[str, str]]:
    out = git(root, "log", "--first-parent", "--format=%H%x09%s")
    return [tuple(line.split("\t", 1)) for line in out.splitlines()]


def last_kept(root: Path) -> str:
    """The newest non-ledger commit on the branch (the last kept experiment)."""
    for sha, subject in first_parent_log(root):
        if not subject.startswith(LEDGER_COMMIT_PREFIX):
            return sha
    raise AssertionError("no kept commit")


def assert_consistent(root: Path, kept_sha: str | None = None, clean: bool = True) -> None:
    """The fault-matrix invariants: branch at the last kept commit, a row per scored receipt (none for
    refusals and suspect runs, as upstream's results.tsv has none), all committed."""
    if kept_sha is not None:
        assert last_kept(root) == kept_sha
    head_train = show(root, "HEAD:train.py")
    kept_train = show(root, f"{last_kept(root)}:train.py")
    assert head_train == kept_train, "the branch tip's train.py differs from the last kept commit's"
    scored = [p for p in sorted((root / "receipts").glob("*.json"))
              if parse_receipt(p.read_text())["status"] in ("keep", "discard", "crash")]
    rows_ = rows(root)
    assert [r["receipt"] for r in rows_] == [f"receipts/{p.name}" for p in scored]
    assert all(r["status"] in ("keep", "discard", "crash") for r in rows_)
    if clean:
        assert git(root, "status", "--porcelain") == "", git(root, "status", "--porcelain")
        assert (root / "train.py").read_bytes() == kept_train


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still "exists"; read its state.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
        return state != "Z"
    except OSError:
        return True
