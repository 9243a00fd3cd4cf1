"""Validation out of training's reach: the ledger refuses candidates that reach for the prepared
data, and vetoes a keep whose held-out score worsens beyond the noise floor while val improves."""
import random
import re
from pathlib import Path

import pytest

from _ledger_fakes import FAKE_TRAIN, campaign, edit, git, make_repo, receipts
from mlx_ar.ledger.attempt import run_experiment
from mlx_ar.ledger.noise import measure_noise
from mlx_ar.ledger.policy import eval_data_reason, heldout_veto

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(echo=lambda *a: None)


# --- refusing code that reaches for the data ------------------------------------------------------
@pytest.mark.parametrize("line, what", [
    ('tokens = np.load(os.path.expanduser("~/.cache/mlx-autoresearch/datasets/climbmix/tokens/val_00000.tokens.npy"))',
     "cache directory"),
    ('root = os.environ["MLX_AR_CACHE"]', "MLX_AR_CACHE"),
    ("from mlx_ar.data import open_dataset", "data, paths or evaluate module"),
    ("from mlx_ar import data as d", "data, paths or evaluate module"),
    ("extra = ds.val_batches(8, 2048)", "split API"),
    ('table = ds.split_table("heldout")', "split API"),
    ('shard = "heldout_00000"', "token shard files"),
])
def test_each_way_into_the_data_is_refused(line, what):
    src = FAKE_TRAIN.replace("import time\n", "import time\n" + line + "\n", 1)
    reason = eval_data_reason({"train.py": src.encode()})
    assert reason is not None and what in reason and reason.startswith("train.py:")


def test_the_shipped_model_files_are_not_refused():
    files = {p: (ROOT / p).read_bytes() for p in ("train.py", "train_torch.py")}
    assert eval_data_reason(files) is None
    assert eval_data_reason({"train.py": None}) is None


@pytest.fixture
def repo(tmp_path, monkeypatch):
    from _ledger_fakes import set_identity

    set_identity(monkeypatch)
    return make_repo(tmp_path / "repo")


def test_a_candidate_that_opens_the_validation_file_is_refused(repo):
    assert run_experiment(repo, "baseline", campaign(), **QUIET).status == "keep"
    src = (repo / "train.py").read_text()
    (repo / "train.py").write_text(src.replace(
        "import time\n", 'import time\nVAL = open(os.path.expanduser("~/.cache/mlx-autoresearch/datasets/'
                         'climbmix/tokens/val_00000.tokens.npy"), "rb")\n', 1))
    r = run_experiment(repo, "train on validation", campaign(), **QUIET)
    assert r.status == "refused" and r.exit_code == 2
    assert "train.py:" in r.reason and "may not read the prepared data" in r.reason
    assert receipts(repo)[-1]["status"] == "refused" and not r.runs


# --- the held-out veto ---------------------------------------------------------------------------
def test_heldout_veto_fires_on_a_real_loss():
    why = heldout_veto([1.52, 1.521], [1.50, 1.501], floor=0.002)
    assert why and why.startswith("veto: held-out bpb worsens by 0.020000")


def test_heldout_veto_needs_scores_and_a_floor():
    assert heldout_veto([1.6], [1.5], floor=None) is None            # no noise floor: no way to tell noise
    assert heldout_veto([None], [1.5], floor=0.002) is None           # a dataset without a held-out split
    assert heldout_veto([1.6], [], floor=0.002) is None
    assert heldout_veto([1.49], [1.5], floor=0.002) is None           # held-out improved too


def test_heldout_veto_is_silent_on_aa_pairs():
    # Two runs of the same recipe differ only by seed noise: the veto must (almost) never fire.
    rng = random.Random(0)
    sd = 0.002
    fired = sum(bool(heldout_veto([1.5 + rng.gauss(0, sd) for _ in range(n)], [1.5 + rng.gauss(0, sd) for _ in range(m)],
                                  floor=sd)) for n, m in [(1, 1), (2, 3), (1, 4)] * 300)
    assert fired <= 3


HELDOUT_FAKE = FAKE_TRAIN.replace(
    "SLEEP = 0.0 ", "HELDOUT = 1.0              # the held-out bpb this recipe scores, plus seed noise\nSLEEP = 0.0 ", 1,
).replace("startup_seconds=0.2)", "startup_seconds=0.2, "
          "heldout_bpb=round(HELDOUT + NOISE * random.Random(a.seed + 7).gauss(0.0, 1.0), 6))", 1)


def test_the_loop_vetoes_a_keep_whose_heldout_score_worsens(repo, monkeypatch):
    assert "HELDOUT = 1.0" in HELDOUT_FAKE and "heldout_bpb=round(" in HELDOUT_FAKE
    (repo / "train.py").write_text(HELDOUT_FAKE)
    edit(repo, NOISE=0.002)
    git(repo, "commit", "-q", "-am", "a fake train.py that reports a held-out score")
    c = campaign()
    assert run_experiment(repo, "baseline", c, **QUIET).status == "keep"
    measure_noise(repo, c, runs=3, **QUIET)
    # val improves, held-out as before: kept.
    edit(repo, VALUE=0.98)
    r = run_experiment(repo, "a real gain", c, **QUIET)
    assert r.status == "keep", r.reason
    # val improves again, held-out worsens far beyond the floor: vetoed.
    edit(repo, VALUE=0.96, HELDOUT=1.05)
    r = run_experiment(repo, "a gain that does not generalise", c, **QUIET)
    assert r.status == "discard" and "held-out bpb worsens" in r.reason
    assert "VALUE = 0.98 " in (repo / "train.py").read_text()      # restored to the champion
    assert receipts(repo)[-1]["metrics"]["heldout_bpb"] == pytest.approx(1.05, abs=0.01)
    # `mlx-ar results` shows the held-out score beside val_bpb, the best row's included.
    from click.testing import CliRunner

    from mlx_ar.ledger.cli import results_command

    monkeypatch.chdir(repo)
    out = CliRunner().invoke(results_command, []).output
    header = next(line for line in out.splitlines() if "val_bpb" in line)
    assert header.split()[2:4] == ["val_bpb", "held-out"]
    table = {line.split()[1]: line.split()[2:4] for line in out.splitlines() if line[:4].strip().isdigit()}
    held = {commit: float(cells[1]) for commit, cells in table.items() if cells[1] != "-"}
    assert len(held) == 3 and sorted(round(v, 2) for v in held.values()) == [1.0, 1.0, 1.05]
    assert re.search(r"best: .* held-out 1\.00\d+\)", out), out
