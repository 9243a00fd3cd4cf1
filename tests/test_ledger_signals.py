"""`mlx-ar run` stopped the way a terminal stops it: a signal to its whole process group.

A terminal's Ctrl-C sends SIGINT to every process of the foreground group, closing the
terminal sends SIGHUP, a supervisor sends SIGTERM. The loop runs as a real `mlx-ar run`
process, in a group of its own that gets the signal (os.killpg), or on a real pseudo-terminal
where Ctrl-C is typed or which closes, while the fake train.py is training. Every case must end as the program.md promises: a crash
receipt and row with reason `interrupted`, train.py back at the champion, exit 130, no
in-flight marker, the training child gone.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from _ledger_fakes import assert_consistent, campaign, edit, git, make_repo, pid_alive, receipts, rows, set_identity
from mlx_ar.ledger.attempt import run_experiment


@pytest.fixture
def repo(tmp_path, monkeypatch):
    set_identity(monkeypatch)
    root = make_repo(tmp_path / "repo", extra_files={"campaign.toml": "time_budget = 5\neval_allowance = 60\n"})
    r = run_experiment(root, "baseline", campaign(), echo=lambda *a: None)
    assert r.status == "keep"
    return root


def _wait_for(path, timeout=60.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists() and path.read_text().strip():
            return int(path.read_text())
        time.sleep(0.05)
    raise AssertionError(f"{path} never appeared")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_group_signal_mid_training_records_crash_restores_and_exits_130(repo, tmp_path, sig):
    champion_train = (repo / "train.py").read_bytes()
    edit(repo, VALUE=0.5, SLEEP=60.0)
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, FAKE_PID_FILE=str(pid_file))
    proc = subprocess.Popen([sys.executable, "-m", "mlx_ar.cli", "run", "-m", "slow edit"], cwd=repo, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        child = _wait_for(pid_file)
        time.sleep(0.3)  # the child is training (sleeping), the loop waits on it
        os.killpg(proc.pid, sig)  # the whole group, as a terminal does
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out, err = out.decode(), err.decode()
    assert proc.returncode == 130, (proc.returncode, out, err)
    assert "status:       crash" in out and "reason:       interrupted" in out, out
    last = receipts(repo)[-1]
    assert (last["status"], last["reason"], last["description"]) == ("crash", "interrupted", "slow edit")
    assert rows(repo)[-1]["status"] == "crash"
    assert (repo / "train.py").read_bytes() == champion_train
    assert list((repo / ".git" / "mlx-ar" / "in-flight").glob("*.json")) == []
    assert not pid_alive(child)
    assert_consistent(repo)



@pytest.mark.parametrize("action", ["ctrl-c", "close"])
def test_terminal_ctrl_c_or_close_mid_training_records_crash_and_exits_130(repo, tmp_path, action):
    """A real pseudo-terminal: the loop runs on it as typed; Ctrl-C is typed, or the terminal closes."""
    import pty

    champion_train = (repo / "train.py").read_bytes()
    edit(repo, VALUE=0.5, SLEEP=60.0)
    pid_file = tmp_path / "child.pid"
    env = dict(os.environ, FAKE_PID_FILE=str(pid_file))
    pid, master = pty.fork()
    if pid == 0:  # the child: `mlx-ar run` on the terminal, as a user types it
        os.chdir(repo)
        os.execve(sys.executable, [sys.executable, "-m", "mlx_ar.cli", "run", "-m", "slow edit"], env)
    shown = b""
    try:
        child = _wait_for(pid_file)
        time.sleep(0.3)
        if action == "ctrl-c":
            os.write(master, b"\x03")  # the line discipline sends SIGINT to the foreground group
            while True:
                try:
                    chunk = os.read(master, 65536)
                except OSError:  # EIO: the child closed the terminal's last descriptor
                    break
                if not chunk:
                    break
                shown += chunk
            os.close(master)
        else:
            os.close(master)  # the terminal window closes: SIGHUP
        end = time.monotonic() + 60
        while time.monotonic() < end:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            time.sleep(0.1)
        else:
            raise AssertionError("mlx-ar run did not stop")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert os.waitstatus_to_exitcode(status) == 130
    if action == "ctrl-c":
        assert b"status:       crash" in shown and b"interrupted" in shown, shown[-2000:]
    last = receipts(repo)[-1]
    assert (last["status"], last["reason"]) == ("crash", "interrupted")
    assert (repo / "train.py").read_bytes() == champion_train
    assert list((repo / ".git" / "mlx-ar" / "in-flight").glob("*.json")) == []
    assert not pid_alive(child)
    assert_consistent(repo)
