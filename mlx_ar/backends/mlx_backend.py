"""MLX backend: trains train.py's GPT on Apple Silicon (Metal), NVIDIA (MLX's CUDA build) or CPU.

The model, optimizer and FLOP count come from train.py's globals (`build_model`,
`build_optimizer`, `flops_per_token`); this module compiles the whole optimizer step,
gradient accumulation included, with the model, optimizer and RNG state as its captured
state, so one call is one graph and the host never waits per micro-batch.
"""
import platform
import sys
from pathlib import Path

import numpy as np

from ..harness import hardware, memory


class MLXBackend:
    name = "mlx"

    def __init__(self, train_globals: dict):
        import mlx.core as mx

        self.mx = mx
        self.g = train_globals
        self.num_params = 0
        self.flops_per_token = 0.0
        self._chip = None

    # --- device ---------------------------------------------------------------------------
    def _apple_chip(self):
        if self._chip is None:
            self._chip = hardware.detect_apple_chip()
        return self._chip

    def device_name(self) -> str:
        mx = self.mx
        if mx.metal.is_available():
            name, cores = self._apple_chip()
            return hardware.apple_device_name(name or "Apple GPU", cores)
        info = mx.device_info()
        kind = "cuda" if mx.cuda.is_available() else "cpu"
        return f"{info.get('device_name') or platform.processor() or platform.machine()} ({kind})"

    def peak_flops(self) -> float | None:
        mx = self.mx
        if mx.metal.is_available():
            name, cores = self._apple_chip()
            return hardware.peak_flops(name or "", cores)
        if mx.cuda.is_available():
            return hardware.peak_flops(mx.device_info().get("device_name", ""))
        return None  # no honest peak for a CPU

    def configure_memory(self) -> None:
        mx = self.mx
        if mx.metal.is_available():
            total = hardware.total_memory_bytes()
            if total:  # unknown machine size: leave MLX's own defaults
                memory.apply_metal_limits(mx, memory.metal_memory_limits(total, memory.recommended_working_set(mx)))

    # --- model ----------------------------------------------------------------------------
    def build(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None:
        import mlx.nn as nn
        from mlx.utils import tree_flatten, tree_map

        mx = self.mx
        mx.random.seed(seed)
        model = self.g["build_model"](vocab_size, seq_len)
        optimizer = self.g["build_optimizer"](model)
        self.model, self.optimizer = model, optimizer
        self.state = [model.state, optimizer.state, mx.random.state]
        mx.eval(self.state)
        self.num_params = sum(v.size for _, v in tree_flatten(model.parameters()))
        self.flops_per_token = float(self.g["flops_per_token"](model.cfg))

        loss_and_grad = nn.value_and_grad(model, lambda m, x, y: m.token_losses(x, y).mean())

        def step(inputs, targets):
            n = inputs.shape[0]
            loss, grads = loss_and_grad(model, inputs[0], targets[0])
            for i in range(1, n):
                li, gi = loss_and_grad(model, inputs[i], targets[i])
                loss = loss + li
                grads = tree_map(mx.add, grads, gi)
            if n > 1:
                grads = tree_map(lambda g: g / n, grads)
                loss = loss / n
            optimizer.update(model, grads)
            return loss

        self._step = mx.compile(step, inputs=self.state, outputs=self.state)
        # Evaluation reads only the model's predictions; the cross-entropy is this fixed code's.
        self._logits = mx.compile(lambda x: model.logits(x).astype(mx.float32), inputs=[model.state])

        def nats(x, y):
            z = model.logits(x).astype(mx.float32)
            return mx.logsumexp(z, axis=-1) - mx.take_along_axis(z, y[..., None], axis=-1)[..., 0]

        self._nats = mx.compile(nats, inputs=[model.state])

    def set_hyper(self, lr_mult: float, muon_momentum: float, weight_decay: float) -> None:
        self.optimizer.set_hyper(lr_mult, muon_momentum, weight_decay)

    def _to_device(self, a: np.ndarray):
        # uint16 tokens cross to the device at half the bytes and widen there.
        return self.mx.array(a).astype(self.mx.int32)

    def step(self, inputs: np.ndarray, targets: np.ndarray):
        loss = self._step(self._to_device(inputs), self._to_device(targets))
        self.mx.async_eval(self.state, loss)
        return loss

    def loss_value(self, handle) -> float:
        return handle.item()

    def eval_logits(self, inputs: np.ndarray) -> np.ndarray:
        """The model's float32 logits (b, T, V) for the leak probe."""
        return np.asarray(self._logits(self._to_device(inputs)))

    def eval_nats(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per-token nats (b, T), float32: log-sum-exp minus the target logit of model.logits."""
        return np.asarray(self._nats(self._to_device(inputs), self._to_device(targets)))

    def sync(self) -> None:
        self.mx.eval(self.state)
        self.mx.synchronize()

    def peak_memory_mb(self) -> float:
        return self.mx.get_peak_memory() / 2**20

    def executed_files(self) -> list:
        return [Path(self.g["__file__"]).resolve()]

    def versions(self) -> dict:
        return {"python": sys.version.split()[0], "mlx": self.mx.__version__, "numpy": np.__version__}

    # --- benchmark hooks ------------------------------------------------------------------
    def time_optimizer(self, repeats: int = 10) -> float:
        """Median seconds of one compiled optimizer update alone (on stand-in gradients).

        Used by `mlx-ar bench` to report the optimizer's share of a step; it updates the
        weights, so call it only on a model built for benchmarking.
        """
        from mlx.utils import tree_map

        from ..harness.clock import median_seconds

        mx, model, opt = self.mx, self.model, self.optimizer
        grads = tree_map(lambda p: (1e-3 * mx.random.normal(p.shape)).astype(p.dtype), model.trainable_parameters())
        mx.eval(grads)
        state = [model.state, opt.state]

        def update(g):
            opt.update(model, g)
            return opt.state["step"]

        update = mx.compile(update, inputs=state, outputs=state)
        return median_seconds(lambda: mx.eval(update(grads), state), repeats)
