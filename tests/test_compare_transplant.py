"""`mlx-ar transplant`: another branch's recipe deltas onto the current train.py, committed alone."""
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_builder import Campaign, git_identity  # noqa: E402

from mlx_ar.compare.cli import transplant_command  # noqa: E402
from mlx_ar.compare.transplant import TransplantError, plan_transplant, transplant  # noqa: E402
from mlx_ar.recipe import parse_recipe  # noqa: E402

__all__ = ["git_identity"]

REAL_TRAIN_PY = Path(__file__).resolve().parents[1] / "train.py"


def _two_machines(root, train_py=None):
    camp = Campaign(root, **({"train_py": train_py} if train_py else {}))
    m4 = camp.branch("t-m4max", machine="m4max", device="Apple M4 Max")
    m4.run("keep", 1.10, description="baseline")
    m4.run("keep", 1.08, change={"WARMDOWN_RATIO": 0.7})
    h = camp.branch("t-h100", machine="h100", device="NVIDIA H100", backend="cuda")
    h.run("keep", 1.00, description="baseline")
    h.run("keep", 0.98, change={"MATRIX_LR": 0.03})
    best = h.run("keep", 0.96, change={"DEPTH": 12}, add_code='COMPILE_MODE = "max-autotune"\n')
    h.run("discard", 0.99, change={"EMBED_LR": 0.9})
    camp.repo.git.checkout("autoresearch/t-m4max")
    return camp, best


def _files_in_head(repo):
    return repo.git.show("--name-only", "--format=", "HEAD").split()


def test_transplant_deltas_commits_only_train_py(tmp_path):
    camp, best = _two_machines(tmp_path / "r")
    repo = camp.repo
    (camp.root / "notes.txt").write_text("someone else's staged work\n")
    repo.git.add("notes.txt")
    before = repo.head.commit.hexsha

    result = transplant(repo, "t-h100")

    plan = result.plan
    assert plan.updates == {"DEPTH": 12, "MATRIX_LR": 0.03}
    assert plan.refused == ["COMPILE_MODE"] and plan.best_commit == best
    assert result.commit == repo.head.commit.hexsha and repo.head.commit.parents[0].hexsha == before
    msg = repo.head.commit.message
    assert msg.splitlines()[0] == "transplant from autoresearch/t-h100: DEPTH=12, MATRIX_LR=0.03"
    assert f"{best[:7]} on autoresearch/t-h100" in msg and "Refused (not defined by this train.py): COMPILE_MODE" in msg
    assert _files_in_head(repo) == ["train.py"]
    assert repo.git.diff("--cached", "--name-only").split() == ["notes.txt"]  # still staged, not committed
    recipe = parse_recipe((camp.root / "train.py").read_text())
    # This branch's own win (WARMDOWN_RATIO) survives; the discarded EMBED_LR does not come along.
    assert (recipe["DEPTH"], recipe["MATRIX_LR"], recipe["WARMDOWN_RATIO"], recipe["EMBED_LR"]) == (12, 0.03, 0.7, 0.6)
    assert "COMPILE_MODE" not in recipe
    assert "MATRIX_LR = 0.03          # Muon learning rate" in (camp.root / "train.py").read_text()
    assert repo.active_branch.name == "autoresearch/t-m4max"


def test_transplant_selected_keys(tmp_path):
    camp, _ = _two_machines(tmp_path / "r")
    result = transplant(camp.repo, "autoresearch/t-h100", keys=["MATRIX_LR", "MATRIX_LR"])
    assert result.plan.updates == {"MATRIX_LR": 0.03} and result.plan.refused == []
    assert camp.repo.head.commit.message.startswith("transplant from autoresearch/t-h100: MATRIX_LR=0.03\n")
    assert parse_recipe((camp.root / "train.py").read_text())["DEPTH"] == 8


@pytest.mark.parametrize("keys, message", [
    (["COMPILE_MODE"], "does not define COMPILE_MODE: the current backend does not know them"),
    (["NOPE"], "defines no NOPE"),
    (["EMBED_LR"], "already has autoresearch/t-h100's values for EMBED_LR"),
])
def test_transplant_refusals_change_nothing(tmp_path, keys, message):
    camp, _ = _two_machines(tmp_path / "r")
    head, text = camp.repo.head.commit.hexsha, (camp.root / "train.py").read_text()
    with pytest.raises(TransplantError, match=message):
        transplant(camp.repo, "t-h100", keys=keys)
    assert camp.repo.head.commit.hexsha == head and (camp.root / "train.py").read_text() == text


def test_transplant_refuses_dirty_train_py_detached_head_and_self(tmp_path):
    camp, _ = _two_machines(tmp_path / "r")
    train = camp.root / "train.py"
    train.write_text(train.read_text() + "# my edit\n")
    with pytest.raises(TransplantError, match="train.py has uncommitted changes"):
        transplant(camp.repo, "t-h100")
    assert train.read_text().endswith("# my edit\n")
    camp.repo.git.checkout("train.py")
    with pytest.raises(TransplantError, match="you are on autoresearch/t-m4max itself"):
        transplant(camp.repo, "t-m4max")
    camp.repo.git.checkout("--detach")
    with pytest.raises(TransplantError, match="HEAD is detached"):
        transplant(camp.repo, "t-h100")


def test_transplant_from_crash_only_branch(tmp_path):
    camp, _ = _two_machines(tmp_path / "r")
    c = camp.branch("t-mini", machine="mini")
    c.run("crash", description="baseline OOM")
    camp.repo.git.checkout("autoresearch/t-m4max")
    with pytest.raises(TransplantError, match="t-mini has no kept run to transplant from \\(only crashes\\)"):
        transplant(camp.repo, "t-mini")


def test_transplant_no_commit_leaves_candidate_uncommitted(tmp_path):
    camp, _ = _two_machines(tmp_path / "r")
    head = camp.repo.head.commit.hexsha
    result = transplant(camp.repo, "t-h100", commit=False)
    assert result.commit is None and camp.repo.head.commit.hexsha == head
    assert camp.repo.git.status("--porcelain").split() == ["M", "train.py"]
    assert parse_recipe((camp.root / "train.py").read_text())["DEPTH"] == 12


def test_transplant_on_the_real_train_py(tmp_path):
    camp = Campaign(tmp_path / "r", train_py=REAL_TRAIN_PY.read_text())
    a = camp.branch("t-a", machine="a")
    a.run("keep", 1.2, description="baseline")
    b = camp.branch("t-b", machine="b")
    b.run("keep", 1.1, description="baseline")
    b.run("keep", 1.0, change={"TOTAL_BATCH_SIZE": 2**17, "ADAM_BETAS": (0.9, 0.95), "QK_SCALE": 0.12})
    camp.repo.git.checkout("autoresearch/t-a")
    result = transplant(camp.repo, "t-b")
    text = (camp.root / "train.py").read_text()
    recipe = parse_recipe(text)
    assert result.plan.updates == {"QK_SCALE": 0.12, "TOTAL_BATCH_SIZE": 131072, "ADAM_BETAS": (0.9, 0.95)}
    assert (recipe["TOTAL_BATCH_SIZE"], recipe["ADAM_BETAS"], recipe["QK_SCALE"]) == (131072, (0.9, 0.95), 0.12)
    assert "TOTAL_BATCH_SIZE = 131072           # tokens per optimizer step" in text
    # Everything below the recipe block is untouched.
    tail = REAL_TRAIN_PY.read_text().split("\nimport math\n", 1)[1]
    assert text.endswith(tail)


def test_plan_keeps_tuple_type_from_json_recipes():
    summary = types.SimpleNamespace(
        name="autoresearch/x", best_commit="a" * 40, best_bpb=1.0, device=None,
        baseline_recipe={"ADAM_BETAS": [0.8, 0.95], "DEPTH": 8},
        best_recipe={"ADAM_BETAS": [0.9, 0.95], "DEPTH": 8},
    )
    src = "DEPTH = 8\nADAM_BETAS = (0.8, 0.95)\n"
    plan = plan_transplant(summary, src)
    assert plan.updates == {"ADAM_BETAS": (0.9, 0.95)} and isinstance(plan.updates["ADAM_BETAS"], tuple)
    summary.baseline_recipe = None  # unknown baseline: deltas against the current file
    plan = plan_transplant(summary, src)
    assert plan.updates == {"ADAM_BETAS": (0.9, 0.95)} and "baseline recipe is unknown" in plan.notes[0]


def test_cli_transplant(tmp_path):
    camp, _ = _two_machines(tmp_path / "r")
    runner = CliRunner()
    result = runner.invoke(transplant_command, ["--repo", str(camp.root), "--from", "t-h100", "--keys", "DEPTH,MATRIX_LR"])
    assert result.exit_code == 0, result.output
    assert "  DEPTH = 12" in result.output and "  MATRIX_LR = 0.03" in result.output
    assert "committed candidate" in result.output and "mlx-ar run" in result.output
    result = runner.invoke(transplant_command, ["--repo", str(camp.root), "--from", "t-h100", "--keys", "COMPILE_MODE"])
    assert result.exit_code == 1 and "current backend does not know" in result.output
    result = runner.invoke(transplant_command, ["--repo", str(camp.root), "--from", "nope"])
    assert result.exit_code == 1 and "no branch named 'nope'" in result.output
