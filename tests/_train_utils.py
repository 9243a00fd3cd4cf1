"""Shared test helpers: train.py loaded as a fresh module with recipe constants overridden, tiny
configs, model pairs compared loss for loss, kernel labels, dynamo graphs, and runs of the Triton
interpreter."""
import os
import subprocess
import sys
from pathlib import Path

from mlx_ar.harness.trainfile import load_train as _load

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PY = ROOT / "train.py"
# Small enough to run in milliseconds on a CPU, large enough to exercise every code path
# (two layers: one short-window layer, value embeddings on one of them, two heads).
TINY = {"DEPTH": 2, "ASPECT_RATIO": 32, "HEAD_DIM": 32, "VE_GATE_CHANNELS": 8}


def recipe_of(overrides):
    """train.py's recipe block as a dict, with `overrides` applied."""
    from mlx_ar.recipe import apply_recipe, parse_recipe

    return parse_recipe(apply_recipe(TRAIN_PY.read_text(), overrides))


def load_train(overrides=None):
    """A fresh module of train.py with recipe `overrides` applied."""
    return _load(TRAIN_PY, overrides)


def kernel_label(model, family: str, why: str | None = None) -> str:
    """The label a cuda backend on a GPU records for `family`'s kernel in `model`: `why` is why
    the fast kernel was not offered (None: it was). The other families are not offered."""
    from types import SimpleNamespace

    from mlx_ar.backends.cuda_backend import KERNEL_SWITCHES, CudaBackend

    whys = {f"why_{f}": why if f == family else "not offered in this test" for f in KERNEL_SWITCHES}
    return CudaBackend._kernel_labels(SimpleNamespace(on_gpu=True), model, **whys)[family]


def model_pair(tt, vocab_size: int, seq_len: int, **kernel):
    """Two tiny torch GPTs (train_torch module `tt`) from the same seed: the plain one, and one
    built with `kernel` (attention=, mlp=, residual=, loss= or norm_rope=)."""
    import torch

    models = []
    for given in ({}, kernel):
        torch.manual_seed(0)
        models.append(tt.build_model(recipe_of(TINY), vocab_size, seq_len, **given))
    return models


def counting(fn):
    """fn, wrapped to count its calls in `.calls`."""
    def counted(*args, **kwargs):
        counted.calls += 1
        return fn(*args, **kwargs)

    counted.calls = 0
    return counted


def assert_same_loss_and_grads(models, vocab_size: int, seq_len: int):
    """Two torch GPTs give the same loss and gradients on one random batch (bf16 tolerances)."""
    import numpy as np
    import pytest
    import torch

    rng = np.random.default_rng(0)
    x, y = (torch.from_numpy(rng.integers(0, vocab_size, (2, seq_len))) for _ in range(2))
    losses = []
    for m in models:
        loss = m(x, y)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=2e-3)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad.float(), a.grad.float(), atol=2e-2, rtol=5e-2, msg=name)


def dynamo_graph(fn, *args):
    """The FX graph torch.compile's dynamo hands its compiler for fn(*args) (traced whole)."""
    import torch

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True, dynamic=False)(*args)
    return graphs[0]


def run_interpreted(script: str) -> str:
    """Run tests/<script> in a fresh process with TRITON_INTERPRET=1 (Triton reads it when first
    imported, and torch.compile imports it) and return its output; its exit code must be 0."""
    done = subprocess.run([sys.executable, str(ROOT / "tests" / script)], cwd=ROOT,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout
