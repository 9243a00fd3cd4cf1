"""Shared test helpers: train.py loaded as a fresh module with recipe constants overridden, tiny
configs, kernels bound by name and checked against their fallbacks in the model, dynamo graphs,
and runs of the Triton interpreter."""
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from mlx_ar.recipe import load_train as _load

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


@contextmanager
def bound(**fns):
    """Bind kernel names (attention=, relu2_mlp=, residual_linear=, softcap_cross_entropy=) of
    mlx_ar.backends.cuda.kernels to `fns` for the duration; the previous bindings come back after."""
    from mlx_ar.backends.cuda import kernels

    old = {name: getattr(kernels, name) for name in fns}
    try:
        for name, fn in fns.items():
            setattr(kernels, name, fn)
        yield kernels
    finally:
        for name, fn in old.items():
            setattr(kernels, name, fn)


def counting(fn):
    """fn, wrapped to count its calls in `.calls`."""
    def counted(*args, **kwargs):
        counted.calls += 1
        return fn(*args, **kwargs)

    counted.calls = 0
    return counted


def assert_kernel_matches_fallback(tt, vocab_size: int, seq_len: int, **fns):
    """A tiny torch GPT (train_torch module `tt`) gives the same loss and gradients on one random
    batch with kernel names bound to `fns` as with the plain-torch fallbacks (bf16 tolerances).
    Returns how often each bound function was called."""
    import numpy as np
    import pytest
    import torch

    from mlx_ar.backends.cuda.kernels import fallback

    torch.manual_seed(0)
    model = tt.build_model(recipe_of(TINY), vocab_size, seq_len)
    with torch.no_grad():   # the output projections start at zero: without weights no sublayer input gets a gradient
        for block in model.blocks:
            block.mlp.c_proj.weight.normal_(0, 0.05)
            block.attn.c_proj.weight.normal_(0, 0.05)
    rng = np.random.default_rng(0)
    x, y = (torch.from_numpy(rng.integers(0, vocab_size, (2, seq_len))) for _ in range(2))
    counted = {name: counting(fn) for name, fn in fns.items()}
    results = []
    for binding in ({name: getattr(fallback, name) for name in fns}, counted):
        with bound(**binding):
            model.zero_grad(set_to_none=True)
            loss = model(x, y)
            loss.backward()
        results.append((loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters()}))
    (plain, plain_grads), (fused, fused_grads) = results
    assert fused == pytest.approx(plain, abs=2e-3)
    for name, g in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], g, atol=2e-2, rtol=5e-2, msg=name)
    return {name: fn.calls for name, fn in counted.items()}


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
