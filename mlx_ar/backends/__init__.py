"""Backends: the small interface through which the shared harness drives a device.

A backend owns everything device-specific: building the model and optimizer from the recipe,
the compiled training step, the model's evaluation logits and the fixed cross-entropy of
them, synchronization, memory and the device's peak FLOP/s. No other module names a device or imports mlx/torch for training.

    backend = get_backend("mlx", "train.py")     # or "cuda"; recipe overrides optional
    backend.build(recipe, vocab_size, seq_len, seed)
    handle = backend.step(inputs, targets)        # (n_micro, B, T) int arrays; returns at once
    loss = backend.loss_value(handle)             # waits for the step, float
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:              # importing the registry (the CLI, the ledger) loads no numpy
    import numpy as np

BACKENDS = ("mlx", "cuda")


class Backend(Protocol):
    """Every method and attribute the harness and `mlx-ar bench` use; nothing is probed with getattr."""
    name: str
    num_params: int                # set by build()
    flops_per_token: float         # set by build(): training FLOPs per token
    warmup_steps: int              # first steps the budget excludes (compilation, graph recording)

    def device_name(self) -> str: ...
    def peak_flops(self) -> float | None: ...        # dense bf16 FLOP/s, None if unknown
    def configure_memory(self) -> None: ...          # before build(): memory limits, peak counters reset
    def memory_budget(self) -> int | None: ...       # bytes a step may use on this machine; None if unknown
    def step_memory(self, seq_len: int) -> tuple[int, int] | None: ...  # after build(): measured (held, per-row) bytes
    def build(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None: ...
    def set_hyper(self, lr_mult: float, muon_momentum: float, weight_decay: float) -> None: ...
    def step(self, inputs: np.ndarray, targets: np.ndarray) -> Any: ...
    def loss_value(self, handle: Any) -> float: ...
    # Evaluation sees predictions only: float32 logits (b, T, V) from the model file, and the
    # per-token nats (b, T) the backend's fixed code computes from them (never the training loss).
    def eval_logits(self, inputs: np.ndarray) -> np.ndarray: ...
    def eval_nats(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray: ...
    def sync(self) -> None: ...
    def peak_memory_mb(self) -> float: ...
    def executed_files(self) -> list: ...            # source files this run executes (for the record)
    def versions(self) -> dict: ...                  # may hold "kernels": {family: what runs it}
    def time_optimizer(self, repeats: int = 10) -> float: ...   # median s of one update (bench only)


def get_backend(name: str, train_file, overrides: dict | None = None) -> Backend:
    """Instantiate a backend for the experiment in `train_file`.

    The MLX model lives in train.py itself, so that backend gets a fresh module of it (with
    `overrides` applied to the recipe); the cuda backend reads train_torch.py beside it and
    takes the recipe, overrides applied, in build(), so train.py's MLX imports never run on a
    machine without MLX.
    """
    if name == "mlx":
        _require("mlx.core", "mlx", name)
        from ..recipe import load_train
        from .mlx.backend import MLXBackend
        return MLXBackend(vars(load_train(train_file, overrides)))
    if name == "cuda":
        _require("torch", "cuda", name)
        from .cuda.backend import CudaBackend

        return CudaBackend(train_file)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


class BackendUnavailable(ValueError):
    """The framework a backend runs on is not installed."""


def _require(module: str, extra: str, backend: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise BackendUnavailable(f"the {backend} backend needs {module.split('.')[0]}, which is not installed "
                                 f"({e}); install it with `pip install -e \".[{extra}]\"`") from None
