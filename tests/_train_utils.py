"""Load train.py (optionally with recipe constants overridden) as a fresh module for tests."""
from pathlib import Path

from mlx_ar.harness.trainfile import load_train as _load

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
# Small enough to run in milliseconds on a CPU, large enough to exercise every code path
# (two layers: one short-window layer, value embeddings on one of them, two heads).
TINY = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "VE_GATE_CHANNELS": 8}


def load_train(overrides=None):
    """A fresh module of train.py with recipe `overrides` applied."""
    return _load(TRAIN_PY, overrides)
