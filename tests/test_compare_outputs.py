"""What compare and plot say and where they write: the machine a branch was named for, files
that never block a run."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from test_compare_builder import Campaign, git_identity  # noqa: E402

from mlx_ar.compare.branches import list_branches, open_repo, read_branch, recipe_reader  # noqa: E402
from mlx_ar.compare.report import build_report  # noqa: E402
from mlx_ar.ledger.format import machine_name  # noqa: E402

__all__ = ["git_identity"]


def test_machine_column_is_the_branch_machine_not_the_hostname(tmp_path, git_identity):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("dec4-cpu", machine="vm")   # receipts written on a host called "vm"
    b.run("keep", 1.5, description="baseline")
    m = camp.branch("dec4-m4max", machine="m4max")
    m.run("keep", 1.2, description="baseline")
    repo = open_repo(camp.root)
    report = build_report([read_branch(repo, r) for r in list_branches(repo)], recipe_reader(repo))
    machines = {x["name"]: x["machine"] for x in report["branches"]}
    assert machines == {"autoresearch/dec4-cpu": "cpu", "autoresearch/dec4-m4max": "m4max"}


def test_machine_name_rules():
    assert machine_name("autoresearch/dec4-cpu") == "cpu"
    assert machine_name("origin/autoresearch/nov21-mac-mini") == "mac-mini"
    assert machine_name("autoresearch/nov21-h100-w3") == "h100"   # a worker's branch
    assert machine_name("main") is None and machine_name(None) is None
