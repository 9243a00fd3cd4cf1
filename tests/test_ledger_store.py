"""The ledger files: rows and receipts, atomic writes, repair, the lock under two writers at once,
and the questions asked of receipts (champion, samples, usual tok/s)."""
import subprocess
import sys
import textwrap

import pytest

from _ledger_fakes import git, make_repo, set_identity
from mlx_ar.ledger.format import RECEIPT_FIELDS, RESULTS_COLUMNS, header_line, parse_results, receipt_name
from mlx_ar.ledger.ledger import (Ledger, LedgerError, atomic_write, champion, find_scored, samples_of,
                                  usual_rate, variance_groups)


def _receipt(seq, status="discard", val=1.0, sha="s1", commit="abcdef123", runs=None, **kw):
    runs = runs if runs is not None else [{"seed": 42, "status": "ok", "metrics": {"val_bpb": val, "tok_per_sec": 1000}}]
    r = {f: None for f in RECEIPT_FIELDS}
    r.update(schema=1, seq=seq, status=status, description=f"attempt {seq}", commit=commit, surface_sha=sha,
             metrics={"val_bpb": val, "peak_vram_mb": 3072.0, "tok_per_sec": 1000, "num_steps": 10},
             backend="mlx", device="M4", seed=42, contract="c", runs=runs, smoke=False)
    r.update(kw)
    return r


def test_receipt_then_row(tmp_path):
    led = Ledger(tmp_path)
    assert led.rows() == [] and led.receipts() == []
    rel = led.write_receipt(_receipt(led.reserve_seq(), "keep", 1.2345671, description="a\tb\nc"))
    assert rel == receipt_name(1, "abcdef123") == "receipts/00001-abcdef1.json"
    row = led.rows()[0]
    assert (row["commit"], row["val_bpb"], row["memory_gb"], row["status"], row["description"]) == \
        ("abcdef1", "1.234567", "3.0", "keep", "a b c")
    assert row["receipt"] == rel and row["n_runs"] == "1"
    assert (tmp_path / "results.tsv").read_text().startswith(header_line())
    with pytest.raises(LedgerError, match="already exists"):
        led.write_receipt(_receipt(1))
    crash = _receipt(led.reserve_seq(), "crash", None, runs=[], metrics=None)
    led.write_receipt(crash)
    assert led.rows()[-1]["val_bpb"] == "0.000000" and led.rows()[-1]["memory_gb"] == "0.0"
    assert [r["_path"] for r in led.receipts()] == [rel, "receipts/00002-abcdef1.json"]


def test_upstream_five_column_table_is_kept(tmp_path):
    (tmp_path / "results.tsv").write_text("commit\tval_bpb\tmemory_gb\tstatus\tdescription\n"
                                          "a1b2c3d\t0.997900\t44.0\tkeep\tbaseline\n")
    led = Ledger(tmp_path)
    led.write_receipt(_receipt(5))
    rows = parse_results((tmp_path / "results.tsv").read_text())
    assert [r["description"] for r in rows] == ["baseline", "attempt 5"]
    assert (tmp_path / "results.tsv").read_text().splitlines()[0].split("\t") == list(RESULTS_COLUMNS)


def test_atomic_write_failure_leaves_the_old_file(tmp_path):
    p = tmp_path / "results.tsv"
    atomic_write(p, "old content\n")

    def chunks():
        yield "new con"
        raise RuntimeError("power cut")

    with pytest.raises(RuntimeError):
        atomic_write(p, chunks())
    assert p.read_text() == "old content\n" and [x.name for x in tmp_path.iterdir()] == ["results.tsv"]


def test_atomic_write_keeps_the_replaced_files_permissions(tmp_path):
    p = tmp_path / "train.py"
    atomic_write(p, "a = 1\n")
    p.chmod(0o750)
    atomic_write(p, "a = 2\n")
    assert p.read_text() == "a = 2\n" and (p.stat().st_mode & 0o777) == 0o750


def test_repair_restores_rows_for_orphan_receipts(tmp_path):
    led = Ledger(tmp_path)
    led.write_receipt(_receipt(1))
    atomic_write(tmp_path / "receipts" / "00002-abcdef1.json",
                 __import__("json").dumps(_receipt(2, description="orphan")))
    assert led.repair() == ["receipts/00002-abcdef1.json"]
    assert [r["description"] for r in led.rows()] == ["attempt 1", "orphan"] and led.repair() == []


def test_corrupt_receipt_names_the_file(tmp_path):
    (tmp_path / "receipts").mkdir()
    (tmp_path / "receipts" / "00001-x.json").write_text("{")
    with pytest.raises(LedgerError, match="00001-x.json is unreadable"):
        Ledger(tmp_path).receipts()


WRITER = textwrap.dedent('''
    import sys
    from mlx_ar.ledger import git_ops
    from mlx_ar.ledger.ledger import Ledger
    root, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    repo = git_ops.open_repo(root)
    led = Ledger(root, git_ops.common_dir(repo) / "mlx-ar")
    for i in range(n):
        with led.lock():
            seq = led.reserve_seq()
            r = {"schema": 1, "seq": seq, "status": "discard", "description": f"{name} {i}",
                 "commit": f"{seq:07d}", "metrics": {"val_bpb": 1.0}, "runs": [], "worker": name}
            rel = led.write_receipt(r)
            git_ops.commit_on_branch(repo, branch=git_ops.branch_name(repo), write_files=False,
                                     files=git_ops.read_worktree(root, ["results.tsv", rel]),
                                     message=f"ledger: {seq:05d} {name}")
''')


def test_two_writers_at_once_lose_nothing(tmp_path, monkeypatch):
    set_identity(monkeypatch)
    root = make_repo(tmp_path / "repo")
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    n = 12
    procs = [subprocess.Popen([sys.executable, str(script), str(root), name, str(n)], stderr=subprocess.PIPE)
             for name in ("w1", "w2")]
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read().decode()
    rows = Ledger(root).rows()
    assert len(rows) == 2 * n and len(list((root / "receipts").glob("*.json"))) == 2 * n
    assert sorted(int(r["receipt"][9:14]) for r in rows) == list(range(1, 2 * n + 1))  # unique seqs
    assert {r["description"] for r in rows} == {f"{w} {i}" for w in ("w1", "w2") for i in range(n)}
    assert git(root, "status", "--porcelain") == ""  # everything committed
    assert int(git(root, "rev-list", "--count", "HEAD")) == 1 + 2 * n
    git(root, "fsck", "--no-progress")


# --- questions asked of receipts ---------------------------------------------------------------
def test_champion_samples_and_groups():
    rs = [
        _receipt(1, "keep", 1.00, sha="base", runs=[{"seed": 42, "status": "ok", "metrics": {"val_bpb": 1.0}}]),
        _receipt(2, "discard", 0.99, sha="x", runs=[{"seed": 42, "status": "ok", "metrics": {"val_bpb": 0.99}},
                                                    {"seed": 43, "status": "ok", "metrics": {"val_bpb": 1.0}}]),
        _receipt(3, "keep", 0.95, sha="best", contract="other"),
        _receipt(4, "keep", 0.90, sha="smoke", smoke=True),
        _receipt(5, "crash", None, sha="c", runs=[{"seed": 42, "status": "fail", "metrics": None}]),
    ]
    assert champion(rs, "val_bpb", 1.0, False)["seq"] == 3
    assert champion(rs, "val_bpb", 1.0, False, contract="c")["seq"] == 1
    assert champion(rs, "val_bpb", 1.0, True)["seq"] == 4
    assert champion(rs, "val_bpb", -1.0, False)["seq"] == 1  # maximising
    assert find_scored(rs, "x", False)["seq"] == 2 and find_scored(rs, "c", False) is None
    assert find_scored(rs, "smoke", False) is None and find_scored(rs, "smoke", True)["seq"] == 4
    noise = {"surface_sha": "base", "objective": "val_bpb", "samples": [1.01, 0.99],
             "previous": [{"surface_sha": "old", "samples": [2.0, 2.1]}]}
    assert samples_of(rs, noise, "base", "val_bpb") == [1.0, 1.01, 0.99]
    groups = variance_groups(rs, noise, "val_bpb", exclude={"base"})
    assert sorted(map(sorted, groups)) == [[0.99, 1.0], [2.0, 2.1]]


def test_usual_rate_is_a_recent_median():
    rs = [_receipt(i, runs=[{"status": "ok", "metrics": {"val_bpb": 1, "tok_per_sec": v}}])
          for i, v in enumerate([100, 900, 1000, 1100, 5000], 1)]
    assert usual_rate(rs, "mlx", "M4", window=10) == (1000, 5)
    assert usual_rate(rs, "mlx", "M4", window=2) == (3050, 2)
    assert usual_rate(rs, "mlx", "other chip", window=10) == (None, 0)
