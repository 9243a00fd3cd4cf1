"""The tokenize progress line of each split counts that split only."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_tokenize_train_line_counts_the_train_split_alone(tmp_path):
    env = dict(os.environ, MLX_AR_CACHE=str(tmp_path / "cache"))
    p = subprocess.run([sys.executable, "prepare.py", "--source", "demo"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300, check=True)
    out = p.stdout + p.stderr
    manifest = json.loads((tmp_path / "cache/datasets/demo/manifest.json").read_text())
    for split in ("train", "val"):
        last = [line for line in out.splitlines() if line.startswith(f"tokenize {split} ")][-1]
        shown = re.search(rf"\| ([\d.]+)([kM]?) {split} tokens", last)
        value = float(shown.group(1)) * {"": 1, "k": 1e3, "M": 1e6}[shown.group(2)]
        # The val line is drawn before the held-out documents are cut from it.
        want = manifest["splits"][split]["tokens"] + (manifest["splits"].get("heldout", {}).get("tokens", 0)
                                                      if split == "val" else 0)
        assert abs(value - want) / want < 0.01, (last, want)
