"""Load train.py (optionally with recipe constants overridden) as a fresh module for tests."""
import importlib.util
import itertools
from pathlib import Path

from mlx_ar.recipe import apply_recipe

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
# Small enough to run in milliseconds on a CPU, large enough to exercise every code path
# (two layers: one short-window layer, value embeddings on one of them, two heads).
TINY = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "VE_GATE_CHANNELS": 8}
_counter = itertools.count()


def write_train(directory, overrides=None) -> Path:
    """A copy of train.py with recipe constants replaced, written into `directory`."""
    path = Path(directory) / "train.py"
    path.write_text(apply_recipe(TRAIN_PY.read_text(), overrides or {}))
    return path


def load_train(directory=None, overrides=None):
    """Import train.py (or a rewritten copy in `directory`) under a unique module name."""
    path = TRAIN_PY if directory is None else write_train(directory, overrides)
    spec = importlib.util.spec_from_file_location(f"train_under_test_{next(_counter)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
