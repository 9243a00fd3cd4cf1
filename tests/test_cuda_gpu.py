"""The cuda backend on an NVIDIA GPU: the compiled step, the CUDA-graph step and evaluation.

Skipped without a GPU. This module imports neither MLX nor train.py's model (a GPU machine
installs the `cuda` extra, which excludes `mlx`), so `python -m pytest -m gpu` runs there.
"""
import numpy as np
import pytest
import torch

from _train_utils import TINY, TRAIN_PY, recipe_of
from mlx_ar.backends.cuda import kernels
from mlx_ar.backends.cuda.backend import CudaBackend

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU")]
V, SEQ = 97, 256


def test_gpu_compiled_step_matches_eager_and_learns():
    from mlx_ar.backends.cuda import hardware
    from mlx_ar.backends.cuda.kernels import fa4, quack_mlp, softcap_ce

    b = CudaBackend(TRAIN_PY)
    assert b.compile_mode == "model" and b.device.type == "cuda"
    b.configure_memory()
    b.build(recipe_of(TINY), V, SEQ, seed=0)
    assert b.peak_flops() == hardware.nvidia_peak_flops(b.device_name())
    chosen = b.versions()["kernels"]
    # each fused kernel runs where it can
    fused = fa4.unavailable_reason(b.device, b.model.cfg.head_dim) is None
    assert chosen["attention"].startswith("fa4" if fused else "torch sdpa+flex")
    assert (kernels.attention is fa4.attention) == fused
    fused = quack_mlp.unavailable_reason(b.device, (b.model.cfg.d_model, b.model.cfg.mlp_hidden)) is None
    assert chosen["mlp"].startswith("quack" if fused else "torch")
    fused = softcap_ce.unavailable_reason(b.device) is None
    assert chosen["loss"].startswith("triton" if fused else "torch")
    rng = np.random.default_rng(0)
    x = rng.integers(0, V, (2, 4, SEQ)).astype(np.uint16)
    y = np.roll(x, -1, axis=-1)                                         # learnable: predict the next token
    dev = lambda a: torch.from_numpy(a.astype(np.int64)).cuda()        # noqa: E731
    with torch.no_grad():
        eager_first = sum(float(b.model(dev(x[i]), dev(y[i]))) for i in range(2)) / 2
    b.set_hyper(1.0, 0.85, 0.2)
    first = b.loss_value(b.step(x, y))
    assert abs(first - eager_first) < 0.05                              # compiled kernels vs eager SDPA, plain head
    for _ in range(20):                                                 # steps 2+ replay the recorded graph
        last = b.loss_value(b.step(x, y))
    assert last < first - 0.5
    losses = b.eval_nats(x[0], y[0])
    assert losses.shape == (4, SEQ) and np.isfinite(losses).all()
    assert b.peak_memory_mb() > 0 and b.time_optimizer(repeats=3) > 0


def test_gpu_graphed_steps_match_launched_steps(monkeypatch):
    """Step 1 runs launched either way, step 2 is recorded and replayed, step 3 replayed.

    Three steps only: the embedding gradient is summed with atomics, so longer runs drift apart
    by rounding, and random tokens at full learning rate amplify that.
    """
    monkeypatch.setenv(kernels.ENV, "0")     # FA4's backward sums with atomics too
    rng = np.random.default_rng(0)
    data = [rng.integers(0, V, (2, 4, SEQ)).astype(np.uint16) for _ in range(3)]
    runs = {}
    for flag in ("0", "1"):
        torch._dynamo.reset()
        b = CudaBackend(TRAIN_PY, cuda_graph=flag == "1")
        b.configure_memory()
        b.build(recipe_of(TINY), V, SEQ, seed=0)
        assert (b.graphed is not None) == (flag == "1") and b.warmup_steps == (2 if flag == "1" else 1)
        b.set_hyper(1.0, 0.9, 0.1)
        runs[flag] = [b.loss_value(b.step(x, np.roll(x, -1, -1))) for x in data]
    np.testing.assert_allclose(runs["1"], runs["0"], rtol=1e-4)


def test_gpu_queued_steps_read_their_own_losses(monkeypatch):
    """The harness queues step k+1 before reading step k's loss; the value read is still step k's."""
    monkeypatch.setenv(kernels.ENV, "0")
    rng = np.random.default_rng(1)
    data = [rng.integers(0, V, (2, 4, SEQ)).astype(np.uint16) for _ in range(4)]
    runs = {}
    for queued in (False, True):
        torch._dynamo.reset()
        b = CudaBackend(TRAIN_PY)
        b.configure_memory()
        b.build(recipe_of(TINY), V, SEQ, seed=0)
        b.set_hyper(1.0, 0.9, 0.1)
        if not queued:
            runs[queued] = [b.loss_value(b.step(x, np.roll(x, -1, -1))) for x in data]
            continue
        handles = [b.step(data[0], np.roll(data[0], -1, -1))]
        losses = []
        for x in data[1:]:
            handles.append(b.step(x, np.roll(x, -1, -1)))      # queued before the previous read
            losses.append(b.loss_value(handles[-2]))
        runs[queued] = losses + [b.loss_value(handles[-1])]
    np.testing.assert_allclose(runs[True][:3], runs[False][:3], rtol=1e-4)
