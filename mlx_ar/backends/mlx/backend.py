"""MLX backend: trains train.py's GPT on Apple Silicon (Metal), NVIDIA (MLX's CUDA build) or CPU.

The model, optimizer and FLOP count come from train.py's globals (`build_model`,
`build_optimizer`, `flops_per_token`). A step's memory is one micro-batch's: with one
micro-batch per step, gradient and optimizer update are one compiled graph; with several, each
micro-batch is its own compiled graph that adds its gradients into a float32 buffer, queued
with async_eval (the host never waits), and one compiled update applies the mean. Every graph
captures the model, optimizer, RNG and buffer state (`mx.compile(fn, inputs=state, outputs=state)`).
"""
import platform
import sys
from pathlib import Path

import numpy as np

from . import chips, memory
from ..cuda.hardware import nvidia_peak_flops


def _last_layers_first(grads, items: bool = False) -> list:
    """The leaves of a parameter tree in reverse order: the last layers' first.

    MLX evaluates a graph's outputs in the order given, depth first; gradients asked for in the
    order the backward produces them are finished (and the activations they need freed) layer by
    layer. In the model's own order (first layer first) a 2048-token row peaked 44 MiB higher.
    """
    from mlx.utils import tree_flatten

    flat = tree_flatten(grads)[::-1]
    return flat if items else [v for _, v in flat]


class MLXBackend:
    name = "mlx"

    def __init__(self, train_globals: dict):
        import mlx.core as mx

        self.mx = mx
        self.g = train_globals
        self.warmup_steps = 1          # the first step compiles
        self.num_params = 0
        self.flops_per_token = 0.0
        self._chip = None

    # --- device ---------------------------------------------------------------------------
    def _apple_chip(self):
        if self._chip is None:
            self._chip = chips.detect_apple_chip()
        return self._chip

    def device_name(self) -> str:
        mx = self.mx
        if mx.metal.is_available():
            name, cores = self._apple_chip()
            return chips.apple_device_name(name or "Apple GPU", cores)
        info = mx.device_info()
        kind = "cuda" if mx.cuda.is_available() else "cpu"
        return f"{info.get('device_name') or platform.processor() or platform.machine()} ({kind})"

    def peak_flops(self) -> float | None:
        mx = self.mx
        if mx.metal.is_available():
            name, cores = self._apple_chip()
            return chips.apple_peak_flops(name or "", cores)
        if mx.cuda.is_available():
            return nvidia_peak_flops(mx.device_info().get("device_name", ""))
        return None  # no honest peak for a CPU

    def configure_memory(self) -> None:
        mx = self.mx
        if mx.metal.is_available():
            total = memory.total_memory_bytes()
            if total:  # unknown machine size: leave MLX's own defaults
                memory.apply_metal_limits(mx, memory.metal_memory_limits(total, memory.recommended_working_set(mx)))
        mx.reset_peak_memory()

    def memory_budget(self) -> int | None:
        """Bytes a training step may use here: Metal's wired limit on a Mac, the same share of system memory elsewhere."""
        mx = self.mx
        if mx.cuda.is_available():
            return None  # MLX's CUDA build: no budget is read for NVIDIA memory yet
        return memory.training_budget(memory.total_memory_bytes(), memory.recommended_working_set(mx))

    # --- model ----------------------------------------------------------------------------
    def build(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None:
        import mlx.nn as nn
        from mlx.utils import tree_flatten

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
        self._loss_and_grad = loss_and_grad

        def step(inputs, targets):
            loss, grads = loss_and_grad(model, inputs, targets)
            optimizer.update(model, grads)
            return mx.depends(loss, _last_layers_first(grads))

        self._step = mx.compile(step, inputs=self.state, outputs=self.state)
        self._accumulate = None                    # built by the first step of several micro-batches
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

    def _build_accumulation(self) -> None:
        """The per-micro-batch gradient graph and the update graph, around a float32 gradient buffer."""
        from mlx.utils import tree_flatten, tree_unflatten

        mx, model, optimizer, loss_and_grad = self.mx, self.model, self.optimizer, self._loss_and_grad
        # Flat {path: array} so the compiled functions update it in place (compile writes back leaves).
        acc = {k: mx.zeros(v.shape, mx.float32) for k, v in _last_layers_first(model.trainable_parameters(), True)}
        acc["_loss"] = mx.array(0.0, mx.float32)
        self._acc = acc
        state = [*self.state, acc]
        mx.eval(acc)

        def accumulate(inputs, targets):
            loss, grads = loss_and_grad(model, inputs, targets)
            for k, g in tree_flatten(grads):
                acc[k] = acc[k] + g.astype(mx.float32)
            acc["_loss"] = acc["_loss"] + loss
            return acc["_loss"]

        def update(scale):
            grads = tree_unflatten([(k, v * scale) for k, v in acc.items() if k != "_loss"])
            loss = acc["_loss"] * scale
            optimizer.update(model, grads)
            for k, v in acc.items():
                acc[k] = mx.zeros_like(v)
            return loss

        self._accumulate = mx.compile(accumulate, inputs=state, outputs=state)
        self._update = mx.compile(update, inputs=state, outputs=state)

    def step(self, inputs: np.ndarray, targets: np.ndarray):
        mx = self.mx
        x, y = self._to_device(inputs), self._to_device(targets)
        n = x.shape[0]
        if n == 1:
            loss = self._step(x[0], y[0])
        else:
            if self._accumulate is None:
                self._build_accumulation()
            for i in range(n):
                self._accumulate(x[i], y[i])
                # Evaluated one micro-batch at a time: a graph of all of them would hold all their activations.
                mx.async_eval(self._acc)
            loss = self._update(mx.array(1.0 / n, mx.float32))
            mx.async_eval(self._acc)
        mx.async_eval(loss, self.state)   # the loss first: it depends on the gradients in _last_layers_first order
        return loss

    def step_memory(self, seq_len: int) -> tuple[int, int]:
        """(bytes held between steps, bytes one row of `seq_len` tokens adds at a step's peak), measured.

        Runs one gradient (no update: the weights and optimizer state do not change) on a random
        row. The row's figure includes what a micro-batch allocates whatever its size (its
        gradients, the loss head's slices), so fixed + rows * per_row overstates larger batches.
        """
        mx = self.mx
        # outputs too: value_and_grad leaves its traced weights in the model, which the compiled
        # function must write back as real arrays.
        state = [self.model.state]
        grad = mx.compile(lambda x, y: self._loss_and_grad(self.model, x, y), inputs=state, outputs=state)
        x = mx.random.randint(0, self.model.cfg.vocab_size, (2, 1, seq_len), key=mx.random.key(0))
        mx.eval(x)
        base = fixed = mx.get_active_memory()
        if self._accumulate is None:     # the float32 gradient buffer of a step of several micro-batches
            fixed += 4 * sum(v.size for v in _last_layers_first(self.model.trainable_parameters()))
        mx.reset_peak_memory()
        loss, grads = grad(x[0], x[1])
        mx.eval(loss, _last_layers_first(grads))   # in the order the step evaluates them
        return int(fixed), int(mx.get_peak_memory() - base)

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

        from ..timing import median_seconds

        mx, model, opt = self.mx, self.model, self.optimizer
        grads = tree_map(lambda p: (1e-3 * mx.random.normal(p.shape)).astype(p.dtype), model.trainable_parameters())
        mx.eval(grads)
        state = [model.state, opt.state]

        def update(g):
            opt.update(model, g)
            return opt.state["step"]

        update = mx.compile(update, inputs=state, outputs=state)
        return median_seconds(lambda: mx.eval(update(grads), state), repeats)   # the untimed first calls compile
