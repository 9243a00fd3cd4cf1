"""program.md end to end: section 1 and a few section 10 iterations, typed as the protocol says.

A fresh clone of this repository whose main has a commit touching other files (README.md),
the demo dataset prepared into a temporary cache, the real train.py trained by real child
processes on MLX. The only concession to speed is campaign.toml (committed as section 1.4
says): 5-second smoke budgets that may be kept, two noise runs, no throttle sentinel on a
shared test machine. The shell script below is the protocol's own commands, verbatim.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from _ledger_fakes import git, set_identity
from mlx_ar.ledger.format import parse_results

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]

CAMPAIGN = """\
train_args = ["--data", "demo"]
smoke = 5
allow_smoke = true
noise_runs = 2
throttle_ratio = 0.0
"""

# Section 1 (steps 1, 4, 5, 6), then section 10: results, edit, run, read the block. What an agent
# reads from stdout goes to $SCRATCH (outside the repository); progress goes to run.log as written.
PROTOCOL = r"""
set -u
mlx-ar() { python -m mlx_ar.cli "$@"; }
git checkout -q -b autoresearch/e2e-cpu
test -s "$MLX_AR_CACHE/current"
printf '%s' "$CAMPAIGN" > campaign.toml
git add campaign.toml && git commit -q -m "campaign settings"
mlx-ar run -m "baseline" 2> run.log > "$SCRATCH/out.1"; echo "exit $?" >> "$SCRATCH/out.1"
mlx-ar noise 2> run.log > "$SCRATCH/out.noise"; echo "exit $?" >> "$SCRATCH/out.noise"

mlx-ar results --last 10 > "$SCRATCH/out.results.1"
sed -i 's/^MATRIX_LR = .*/MATRIX_LR = 0.00001/' train.py
mlx-ar run -m "MATRIX_LR 0.04 -> 0.00001" 2> run.log > "$SCRATCH/out.2"; echo "exit $?" >> "$SCRATCH/out.2"

mlx-ar plot > "$SCRATCH/out.plot" 2>&1; echo "exit $?" >> "$SCRATCH/out.plot"

mlx-ar results --last 10 > "$SCRATCH/out.results.2"
cp train.py "$SCRATCH/champion.py"
sed -i 's/^DEPTH = .*/DEPTH = 3/' train.py
mlx-ar run -m "DEPTH down" 2> run.log > "$SCRATCH/out.3"; echo "exit $?" >> "$SCRATCH/out.3"
cp "$SCRATCH/champion.py" train.py

mlx-ar results --last 10 > "$SCRATCH/out.results.3"
sed -i 's/^WARMDOWN_RATIO = .*/WARMDOWN_RATIO = (0.4/' train.py
mlx-ar run -m "typo" 2> run.log > "$SCRATCH/out.4"; echo "exit $?" >> "$SCRATCH/out.4"
mlx-ar results --last 10 > "$SCRATCH/out.results.4"
mlx-ar doctor > "$SCRATCH/out.doctor"; echo "exit $?" >> "$SCRATCH/out.doctor"
"""


def _block(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        if ":" in line and not line.startswith(" "):
            k, v = line.split(":", 1)
            out.setdefault(k.strip(), v.strip())
    return out


def test_program_md_section_1_and_loop_from_a_fresh_clone(tmp_path, monkeypatch):
    set_identity(monkeypatch)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # main's HEAD touches files outside the mutable surface, as this project's main always does.
    (clone / "README.md").write_text((clone / "README.md").read_text() + "\nA note on main.\n")
    git(clone, "commit", "-q", "-am", "README: a note")
    cache = tmp_path / "cache"
    env = dict(os.environ, MLX_AR_CACHE=str(cache), CAMPAIGN=CAMPAIGN, PYTHONPATH=str(clone))
    subprocess.run([sys.executable, "prepare.py", "--source", "demo"], cwd=clone, env=env, check=True,
                   capture_output=True)
    # `python` is this interpreter (its virtual environment's bin first on PATH).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env["SCRATCH"] = str(tmp_path)
    p = subprocess.run(["bash", "-c", PROTOCOL], cwd=clone, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stderr[-3000:]
    read = lambda name: (tmp_path / name if name.startswith("out.") else clone / name).read_text()  # noqa: E731

    baseline = _block(read("out.1"))
    assert baseline["status"] == "keep" and "baseline" in baseline["reason"], read("out.1") + read("run.log")
    assert "exit 0" in read("out.1") and baseline["overrides"].startswith("DEPTH=2")
    assert "no noise floor yet" in read("out.1") and "mlx-ar noise" in read("out.1")
    assert "noise floor: sd" in read("out.noise") and "exit 0" in read("out.noise")

    lr = _block(read("out.2"))
    assert lr["status"] == "discard" and "exit 0" in read("out.2"), read("out.2")
    assert "gate significance at noise floor" in read("out.2")
    assert "exit 0" in read("out.plot") and (clone / "runs/plots/progress.png").exists()

    depth = _block(read("out.3"))
    assert depth["status"] == "refused" and "the demo profile overrides DEPTH" in depth["reason"], read("out.3")
    assert "exit 2" in read("out.3")

    typo = _block(read("out.4"))
    assert typo["status"] == "crash" and typo["reason"].startswith("syntax error: train.py:"), read("out.4")
    assert "exit 1" in read("out.4")

    # results.tsv as upstream's tools read it: scored rows only, the baseline first.
    table = parse_results(read("results.tsv"))
    assert [r["status"] for r in table] == ["keep", "discard", "crash"]
    assert [r["description"] for r in table] == ["baseline", "MATRIX_LR 0.04 -> 0.00001", "typo"]
    assert float(table[0]["val_bpb"]) > 0 and table[2]["val_bpb"] == "0.000000"
    statuses = [json.loads(f.read_text())["status"] for f in sorted((clone / "receipts").glob("*.json"))]
    assert statuses == ["keep", "discard", "refused", "crash"]
    assert "refused 1" in read("out.results.4") and "DEPTH down" in read("out.results.4")

    # The branch: main, the campaign commit, the baseline as checked out, then only ledger commits.
    subjects = git(clone, "log", "--first-parent", "--format=%s", "main..HEAD").splitlines()[::-1]
    assert subjects[0] == "campaign settings"
    assert all(s.startswith("ledger: ") for s in subjects[1:]), subjects
    assert subjects[1].startswith("ledger: 00001 keep") and "noise floor" in subjects[2]
    assert git(clone, "status", "--porcelain") == ""
    assert git(clone, "diff", "main", "HEAD", "--", "train.py") == ""  # the baseline is still the champion
    assert "exit 0" in read("out.doctor") and "next: " in read("out.doctor")
    shutil.rmtree(clone / "runs", ignore_errors=True)
