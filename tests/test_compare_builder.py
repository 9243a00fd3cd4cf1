"""Builds real git repositories holding experiment branches with synthetic ledgers.

Used by the other tests/test_compare_*.py files (imported by path); the tests here check the
builder itself, so a broken builder fails loudly instead of making other tests vacuous.

    camp = Campaign(tmp_path / "repo")
    b = camp.branch("mar5-m4max", machine="m4max", device="Apple M4 Max", backend="mlx")
    b.run("keep", 1.10, description="baseline")
    b.run("keep", 1.08, change={"MATRIX_LR": 0.03})
    b.run("crash", change={"DEPTH": 99})
"""
import json
import os
from pathlib import Path

import pytest

from mlx_ar.ledger.format import RECEIPTS_DIR, RESULTS_FILE, format_row, header_line
from mlx_ar.recipe import apply_recipe, parse_recipe

CONTRACT_REAL = "3f2a9c0d1e4b5a67"
CONTRACT_DEMO = "9b1c22aa00ff1234"
PARTS_REAL = {"profile": "real", "time_budget": 300, "eval": {"tokens": 1572864, "version": 1}, "vocab_size": 8192}
PARTS_DEMO = {"profile": "demo", "time_budget": 60, "eval": {"tokens": 65536, "version": 1}, "vocab_size": 2048}

BASE_TRAIN_PY = '''"""A tiny stand-in for train.py: a recipe block and some code."""
DEPTH = 8                 # transformer layers
MATRIX_LR = 0.04          # Muon learning rate
EMBED_LR = 0.6
WARMDOWN_RATIO = 0.5
ADAM_BETAS = (0.8, 0.95)
WINDOW_PATTERN = "SSSL"


def main():
    print("training", DEPTH, MATRIX_LR)


if __name__ == "__main__":
    main()
'''

IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Author", "GIT_AUTHOR_EMAIL": "author@example.com",
    "GIT_COMMITTER_NAME": "Test Committer", "GIT_COMMITTER_EMAIL": "committer@example.com",
    "GIT_CONFIG_NOSYSTEM": "1",
}


@pytest.fixture(autouse=True)
def git_identity(tmp_path_factory, monkeypatch):
    """CI has no git identity and may have a global config; give git a clean one."""
    cfg = tmp_path_factory.getbasetemp() / "gitconfig"
    cfg.touch()
    for k, v in IDENTITY.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(cfg))


def set_identity_env():
    """For module-scoped fixtures, which cannot use monkeypatch: returns the previous values."""
    old = {k: os.environ.get(k) for k in IDENTITY}
    os.environ.update(IDENTITY)
    return old


def restore_env(old):
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class Campaign:
    """A repository with `main` (the common baseline) and autoresearch/<name> branches."""

    def __init__(self, root: Path, train_py: str = BASE_TRAIN_PY):
        import git

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.repo = git.Repo.init(root)
        self.repo.git.checkout("-b", "main")
        (root / "train.py").write_text(train_py)
        (root / "README.md").write_text("synthetic campaign\n")
        self.repo.git.add("train.py", "README.md")
        self.repo.git.commit("-m", "baseline train.py")

    def branch(self, name, machine=None, device=None, backend="mlx", contract=CONTRACT_REAL,
               parts=PARTS_REAL, start="main"):
        self.repo.git.checkout("-b", f"autoresearch/{name}", start)
        self.repo.git.checkout("main")
        return BranchBuilder(self, f"autoresearch/{name}", machine, device, backend, contract, parts)


class BranchBuilder:
    """Appends attempts the way the ledger does: experiment commit, ratchet, ledger commit."""

    def __init__(self, camp, branch, machine, device, backend, contract, parts):
        self.camp, self.branch = camp, branch
        self.machine, self.device, self.backend = machine, device, backend
        self.contract, self.parts = contract, parts
        self.seq = 0

    def _checkout(self):
        self.camp.repo.git.checkout(self.branch)

    def run(self, status, val_bpb=None, change=None, add_code="", description="", params=11.5,
            steps=2500, tok_per_sec=500_000, seed=42, smoke=False, contract=None, parts=None, commit=None,
            seeds=None):
        """One attempt. `change` rewrites recipe constants, `add_code` appends source lines;
        `seeds` = [val_bpb, ...] records several seed runs whose mean is the attempt's val_bpb."""
        repo, root = self.camp.repo, self.camp.root
        self._checkout()
        parent = repo.head.commit.hexsha
        train = root / "train.py"
        if commit is None and (change or add_code):
            src = train.read_text()
            if change:
                src = apply_recipe(src, change)
            train.write_text(src + add_code)
            repo.git.add("train.py")
            repo.git.commit("-m", description or f"try {change or add_code.strip()}")
            commit = repo.head.commit.hexsha
            recipe = parse_recipe(train.read_text())
            if status != "keep":
                repo.git.reset("--hard", parent)  # the ratchet: back to the last kept commit
        else:
            commit = commit or parent
            recipe = parse_recipe(repo.git.show(f"{commit}:train.py"))
            parent = repo.commit(commit).parents[0].hexsha if repo.commit(commit).parents else None
        self.seq += 1
        scored = status not in ("crash", "refused")
        if seeds:
            val_bpb = sum(seeds) / len(seeds)
        metrics = {
            "val_bpb": val_bpb if scored else None,
            "peak_vram_mb": 10_500.0 if scored else None,
            "tok_per_sec": tok_per_sec if scored else None,
            "num_steps": steps if scored else None,
            "num_params_M": params if scored else None,
        }
        receipt = {
            "schema": 1, "seq": self.seq, "status": status,
            "reason": "synthetic", "description": description or status,
            "commit": commit, "parent": parent, "branch": self.branch, "diff": "",
            "recipe": recipe, "backend": self.backend, "device": self.device, "machine": self.machine,
            "seed": seed, "contract": contract or self.contract, "smoke": smoke,
            "metrics": metrics, "executed_files": {}, "started_at": "2026-03-05T00:00:00Z",
            "finished_at": "2026-03-05T00:05:00Z",
            "runs": [
                {"seed": seed + i, "status": "ok" if scored else "fail", "reason": None,
                 "metrics": dict(metrics, val_bpb=v if scored else None)}
                for i, v in enumerate(seeds or [val_bpb])
            ],
        }
        if (parts or self.parts) is not None:
            receipt["contract_parts"] = parts or self.parts
        name = f"{self.seq:05d}-{commit[:7]}.json"
        (root / RECEIPTS_DIR).mkdir(exist_ok=True)
        (root / RECEIPTS_DIR / name).write_text(json.dumps(receipt, indent=1))
        results = root / RESULTS_FILE
        if not results.exists():
            results.write_text(header_line())
        row = {"commit": commit[:7], "val_bpb": f"{val_bpb:.6f}" if scored and val_bpb else "0.000000",
               "memory_gb": "10.3" if scored else "0.0", "status": status,
               "description": description or status, "tok_per_sec": tok_per_sec if scored else "",
               "num_steps": steps if scored else "", "backend": self.backend, "device": self.device,
               "seed": seed, "contract": contract or self.contract, "receipt": f"{RECEIPTS_DIR}/{name}",
               "n_runs": len(seeds or [val_bpb]) if scored else 0, "worker": ""}
        with results.open("a") as f:
            f.write(format_row(row))
        repo.git.add(RESULTS_FILE, f"{RECEIPTS_DIR}/{name}")
        repo.git.commit("-m", f"ledger: {status} {commit[:7]}")
        repo.git.checkout("main")
        return commit

    def write_file(self, path, text, message="ledger: extra file"):
        self._checkout()
        (self.camp.root / path).parent.mkdir(parents=True, exist_ok=True)
        (self.camp.root / path).write_text(text)
        self.camp.repo.git.add(path)
        self.camp.repo.git.commit("-m", message)
        self.camp.repo.git.checkout("main")

    def noise(self, floor, samples=(1.1, 1.104, 1.097)):
        self.write_file("noise.json", json.dumps({"floor": floor, "samples": list(samples)}), "ledger: noise floor")


def build_standard(root: Path):
    """The campaign most tests read: two real-contract machines, a demo-contract branch,
    a crash-only branch and an empty one."""
    camp = Campaign(root)
    m4 = camp.branch("mar5-m4max", machine="m4max", device="Apple M4 Max (40-core GPU)", backend="mlx")
    m4.run("keep", 1.100, description="baseline", steps=900, tok_per_sec=150_000)
    m4.run("keep", 1.080, change={"MATRIX_LR": 0.03}, steps=900, tok_per_sec=151_000)
    m4.run("discard", 1.090, change={"DEPTH": 12}, params=17.0, steps=600, tok_per_sec=100_000)
    m4.run("crash", change={"EMBED_LR": 60.0})
    m4.run("keep", 1.070, change={"WARMDOWN_RATIO": 0.7}, steps=910, tok_per_sec=152_000)
    m4.noise(0.004)

    h100 = camp.branch("mar5-h100", machine="h100", device="NVIDIA H100 80GB HBM3", backend="cuda")
    h100.run("keep", 1.000, description="baseline", steps=5000, tok_per_sec=900_000)
    h100.run("keep", 0.980, change={"MATRIX_LR": 0.035}, steps=5000, tok_per_sec=900_000)
    h100.run("keep", 0.960, change={"DEPTH": 12}, add_code='COMPILE_MODE = "max-autotune"\n',
             params=17.0, steps=4200, tok_per_sec=880_000)
    h100.run("discard", 1.500, change={"EMBED_LR": 0.9}, steps=5000, tok_per_sec=900_000)

    demo = camp.branch("mar5-mini-demo", machine="mini", device="Apple M2 (8-core GPU)", backend="mlx",
                       contract=CONTRACT_DEMO, parts=PARTS_DEMO)
    demo.run("keep", 1.600, description="baseline", params=2.0, steps=300, tok_per_sec=40_000)
    demo.run("keep", 1.550, change={"MATRIX_LR": 0.03}, params=2.0, steps=300, tok_per_sec=40_000)

    mini = camp.branch("mar5-mini", machine="mini", device="Apple M2 (8-core GPU)", backend="mlx")
    mini.run("crash", description="baseline OOM")
    mini.run("crash", change={"DEPTH": 4})

    camp.branch("mar5-empty")
    return camp


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """The standard campaign, built once per test module that imports this fixture."""
    old = set_identity_env()
    try:
        yield build_standard(tmp_path_factory.mktemp("std") / "repo")
    finally:
        restore_env(old)


# --- the builder's own checks ----------------------------------------------------------------


def test_builder_writes_ledger_commits_and_ratchets(tmp_path):
    camp = Campaign(tmp_path / "r")
    b = camp.branch("t-x", machine="x", device="X", backend="mlx")
    base = b.run("keep", 1.1, description="baseline")
    kept = b.run("keep", 1.0, change={"DEPTH": 9})
    lost = b.run("discard", 1.2, change={"DEPTH": 10})
    repo = camp.repo
    log = [c.message.strip() for c in repo.iter_commits("autoresearch/t-x")]
    assert log[0].startswith("ledger: discard") and log[1].startswith("ledger: keep")
    # The discarded experiment commit is not on the branch; the kept one is.
    shas = {c.hexsha for c in repo.iter_commits("autoresearch/t-x")}
    assert kept in shas and base in shas and lost not in shas
    tip = repo.commit("autoresearch/t-x").tree
    assert sorted(b.name for b in (tip / "receipts").blobs)[0].startswith("00001-")
    assert "DEPTH = 9" in (tip / "train.py").data_stream.read().decode()
    assert repo.active_branch.name == "main"
