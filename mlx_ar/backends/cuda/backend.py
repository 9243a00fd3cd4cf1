"""CUDA backend: trains train_torch.py's GPT (the PyTorch twin of train.py's) on an NVIDIA GPU.

`python train.py --backend cuda` drives it through the same harness as the MLX backend. The
recipe comes from train.py's recipe block (the dict the harness passes to `build`); the model,
optimizer and FLOP count come from `train_torch.py` next to train.py. Those two files are what
this backend executes and records.

Choices, and why:
- Device: `cuda:0`, so `CUDA_VISIBLE_DEVICES=3` pins a worker to GPU 3. Without a visible GPU
  it runs on the CPU (device string ends in "(cpu)", MFU unknown), which is how CI runs the
  parity tests and `python train.py --backend cuda --smoke 5`.
- Kernels: train_torch.py calls them by name; `kernels.use` binds each to its fused version
  where it runs on this device (FlashAttention-4, quack's GEMMs, the Triton loss) and to plain
  torch elsewhere. MLX_AR_FUSED_KERNELS=0 keeps plain torch. The run records what ran
  (versions -> kernels).
- Compilation: on a GPU the whole loss (forward and backward) and the optimizer update are
  compiled with torch.compile; on the CPU they run eagerly, because inductor needs a C++
  toolchain and minutes of a small CPU for a run that lasts seconds. Everything compiles inside
  the first step (later steps reuse it, which tests check), so `warmup_steps` is 1. torch's
  caches keep the compiled code on disk, so a later run of the same model code skips most of it.
- CUDA graph: with a compiled model on a GPU, the second step records the whole step (every
  micro-batch's forward and backward, then the optimizer update) as one CUDA graph and each
  later step replays it: one launch instead of hundreds, so the GPU does not wait on Python
  (docs/benchmarks.md: 6.47M against 3.52M tok/s for the default recipe on an H100). Recording
  is part of the warmup, so `warmup_steps` is 2 there.
- Evaluation runs eagerly (SDPA, or FA4's forward where chosen), so it compiles nothing new.

    backend = CudaBackend(train_file)
    backend.build(recipe, vocab_size, seq_len, seed)
    loss = backend.loss_value(backend.step(inputs, targets))
"""
import hashlib
import importlib.util
import itertools
import sys
from pathlib import Path

import numpy as np

from . import hardware, kernels

TORCH_FILE = "train_torch.py"      # the torch model file, next to train.py
COMPILE_MODES = ("model", "none")
# Inductor settings for every compiled graph. One launch configuration per pointwise kernel: timing
# several on a kernel's first call took 6-7 s of every start-up, and steps ran as fast without it.
INDUCTOR_OPTIONS = {"triton.autotune_pointwise": False}
KERNELS_DIR = Path(kernels.__file__).parent
# The modules whose custom ops a compiled model calls (their registered backwards included).
KERNEL_MODULES = ("fa4.py", "quack_mlp.py", "quack_drelu2.py", "softcap_ce.py", "softcap_ce_triton.py")

_module_ids = itertools.count()


def with_inductor_options(compile_options: dict) -> dict:
    """torch.compile arguments with INDUCTOR_OPTIONS added when the compiler is inductor (the default)."""
    if compile_options.get("backend", "inductor") != "inductor":
        return dict(compile_options)
    return {**compile_options, "options": {**INDUCTOR_OPTIONS, **compile_options.get("options", {})}}


def compile_cache_tag(current: str, folder=KERNELS_DIR, modules=KERNEL_MODULES) -> str:
    """torch.compile's cache-key tag: `current` (a user's TORCH_COMPILE_CACHE_KEY_TAG) plus a hash of
    the kernel modules' source.

    torch's caches know a custom op by its name, so a graph cached by an older version of these
    modules would replay that version's saved tensors and backward; the hash retires it.
    """
    digest = hashlib.sha256()
    for name in modules:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    ours = f"mlx_ar-{digest.hexdigest()[:16]}"
    parts = [p for p in current.split("+") if p]
    return current if ours in parts else "+".join(parts + [ours])


def record_cuda_graph(torch, fn):
    """Record fn's GPU work as a CUDA graph (fn runs once, on the CPU side only); returns its replay."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()       # the graph gets its own memory pool: hand back what the first step cached
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except RuntimeError as e:
        raise RuntimeError(f"recording the training step as a CUDA graph failed ({str(e).strip()[:300]}). "
                           f"Something in the step waits on the host (.item(), printing a tensor, a shape that "
                           f"depends on data) or recompiles after step 1; remove it") from e
    return graph.replay


class GraphedStep:
    """One training step recorded once as a CUDA graph and replayed.

    `run(xs, ys, loss_out)` is the step on lists of device token tensors; it leaves its mean loss
    in `loss_out`. Inputs are copied into static device buffers before each replay, and each
    replay's loss is copied out at once, so a step queued behind it cannot overwrite a value the
    caller has not read yet. `record(fn)` records fn and returns the replay function
    (record_cuda_graph on a GPU; tests pass one that replays by calling fn on the CPU).
    """

    def __init__(self, torch, run, record):
        self.torch, self.run, self.record = torch, run, record
        self.replay = None

    def __call__(self, inputs, targets):
        """inputs, targets: (n, B, T) int32 device tensors -> the step's mean loss (a fresh tensor)."""
        torch = self.torch
        if self.replay is None:
            self.inputs, self.targets = torch.empty_like(inputs), torch.empty_like(targets)
            self.loss = torch.zeros((), dtype=torch.float32, device=inputs.device)

            def step():
                xs = [self.inputs[i].long() for i in range(self.inputs.shape[0])]
                ys = [self.targets[i].long() for i in range(self.targets.shape[0])]
                self.run(xs, ys, self.loss)
            self.replay = self.record(step)
        if inputs.shape != self.inputs.shape or targets.shape != self.targets.shape:
            raise ValueError(f"the recorded step takes batches of shape {tuple(self.inputs.shape)}, "
                             f"got {tuple(inputs.shape)}; every step's batch must have the first step's shape")
        self.inputs.copy_(inputs, non_blocking=True)
        self.targets.copy_(targets, non_blocking=True)
        self.replay()
        return self.loss.clone()


class PinnedStaging:
    """Token batches to the GPU through a ring of reused pinned host buffers.

    A copy from pinned memory does not block the host, which the harness needs to keep the next
    step queued. Pinning a fresh buffer per batch (`tensor.pin_memory()`) did block at times: on
    an H100 some processes spent 3-15 ms a step in it, longer than a default-recipe step on the
    GPU (12 ms), so the queue ran dry. A slot is refilled only after its last copy has finished
    (an event recorded behind the copy); with `slots` well above the batches in flight (two per
    step, two steps) that wait is already over.

        staging = PinnedStaging(torch, device)
        x = staging.to_device(tokens)          # int32 device tensor of tokens' shape
    """

    def __init__(self, torch, device, slots: int = 8, new_event=None, pin: bool = True):
        """new_event: makes the event recorded after a copy (torch.cuda.Event); pin: pin the buffers.

        Tests pass a fake event and pin=False to run the ring on the CPU.
        """
        self.torch, self.device, self.pin = torch, device, pin
        self.new_event = new_event or torch.cuda.Event
        self.buffers = [None] * slots
        self.copied = [None] * slots               # event after each slot's last copy
        self.next = 0

    def to_device(self, a: np.ndarray):
        torch = self.torch
        i = self.next
        self.next = (i + 1) % len(self.buffers)
        if self.copied[i] is not None:
            self.copied[i].synchronize()           # the copy that last read this slot is done
        buf = self.buffers[i]
        if buf is None or tuple(buf.shape) != a.shape:
            buf = self.buffers[i] = torch.empty(a.shape, dtype=torch.int32, pin_memory=self.pin)
        np.copyto(buf.numpy(), a, casting="unsafe")   # token ids (uint16 from the loader) fit int32
        out = buf.to(self.device, non_blocking=True)
        self.copied[i] = self.new_event()
        self.copied[i].record()
        return out


def load_torch_file(path):
    """Execute train_torch.py as a fresh module (a new one per call, like recipe.load_train)."""
    path = Path(path).resolve()
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: the cuda backend runs the torch model in {TORCH_FILE} "
                                f"next to train.py (restore it from git)")
    name = f"_mlx_ar_train_torch_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


# --- weights through numpy (parity tests, checkpoints from the MLX backend) ---------------------
def numpy_weights(model) -> dict:
    """{parameter name: float32 numpy array}; names are train.py's parameter-tree paths."""
    return {k: p.detach().float().cpu().numpy() for k, p in model.named_parameters()}


def load_numpy_weights(model, arrays: dict) -> None:
    """Copy arrays (as exported from the MLX model) into the torch model's parameters, in place."""
    import torch

    params = dict(model.named_parameters())
    missing, extra = sorted(set(params) - set(arrays)), sorted(set(arrays) - set(params))
    if missing or extra:
        raise ValueError(f"weights do not match the torch model: missing {missing or 'none'}, unexpected {extra or 'none'}")
    with torch.no_grad():
        for k, p in params.items():
            a = np.asarray(arrays[k])
            if tuple(a.shape) != tuple(p.shape):
                raise ValueError(f"weight {k}: shape {tuple(a.shape)} given, the torch model has {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))



class CudaBackend:
    name = "cuda"

    def __init__(self, train_file, compile_mode: str | None = None, compile_options: dict | None = None,
                 cuda_graph: bool | None = None):
        """compile_mode: "model" or "none" (default: "model" on a GPU, "none" on the CPU);
        compile_options: extra torch.compile arguments (tests pass a cheaper compiler backend);
        cuda_graph: record the step as a CUDA graph (default: on a GPU with a compiled model)."""
        import torch

        self.torch = torch
        self.train_file = Path(train_file).resolve()
        self.torch_file = self.train_file.parent / TORCH_FILE
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda:0" if self.on_gpu else "cpu")
        self.compile_mode = compile_mode or ("model" if self.on_gpu else "none")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        self.compile_options = with_inductor_options(compile_options or {})
        self.cuda_graph = self.on_gpu and self.compile_mode != "none" if cuda_graph is None else cuda_graph
        self.warmup_steps = 1
        self.num_params = 0
        self.flops_per_token = 0.0
        self.kernels = {}              # what build() bound each kernel family to, for the record
        self._staging = PinnedStaging(torch, self.device) if self.on_gpu else None
        self.graphed = None            # GraphedStep once build() decides to record the step

    # --- device ---------------------------------------------------------------------------
    def device_name(self) -> str:
        if self.on_gpu:
            return self.torch.cuda.get_device_name(self.device)
        return f"{hardware.cpu_model_name()} (cpu)"

    def peak_flops(self) -> float | None:
        if self.on_gpu:
            return hardware.nvidia_peak_flops(self.device_name())
        return None  # no honest peak for a CPU

    def configure_memory(self) -> None:
        if self.on_gpu:
            self.torch.cuda.set_device(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    def memory_budget(self) -> int | None:
        return None  # not read yet: DEVICE_BATCH_SIZE = "auto" takes the harness's unmeasured default

    def step_memory(self, seq_len: int) -> tuple[int, int] | None:
        return None

    # --- model ----------------------------------------------------------------------------
    def build(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None:
        torch = self.torch
        torch.manual_seed(seed)
        tt = load_torch_file(self.torch_file)
        cfg = tt.GPTConfig.from_recipe(recipe, vocab_size, seq_len)
        self.kernels = kernels.use(self.device, cfg.head_dim, (cfg.d_model, cfg.mlp_hidden))
        model = tt.build_model(recipe, vocab_size, seq_len, device=self.device)
        optimizer = tt.build_optimizer(model, recipe)
        self.tt, self.model, self.optimizer = tt, model, optimizer
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = float(tt.flops_per_token(model.cfg))
        self._loss = model
        if self.compile_mode == "model":
            if self.on_gpu:     # flex_attention is fast only compiled on a GPU (kernels/fallback.py)
                kernels.prepare_flex(seq_len, cfg.windows, self.device)
            self._loss = torch.compile(model, fullgraph=True, dynamic=False, **self.compile_options)
            torch.compiler.config.cache_key_tag = compile_cache_tag(torch.compiler.config.cache_key_tag)
            optimizer.compile(**self.compile_options)
        self.graphed, self._steps = None, 0
        if self.cuda_graph:
            self.graphed = GraphedStep(torch, self._run_step, lambda fn: record_cuda_graph(torch, fn))
            self.warmup_steps = 2          # step 1 compiles, step 2 records the graph

    def load_weights(self, arrays: dict) -> None:
        """Replace the built model's weights (numpy arrays by parameter name)."""
        load_numpy_weights(self.model, arrays)

    def set_hyper(self, lr_mult: float, muon_momentum: float, weight_decay: float) -> None:
        self.optimizer.set_hyper(lr_mult, muon_momentum, weight_decay)

    def _to_device(self, a: np.ndarray):
        """(n, B, T) tokens -> one int32 (n, B, T) device tensor; on a GPU the copy does not block."""
        if self.on_gpu:
            return self._staging.to_device(a)
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32))

    def _run_step(self, xs, ys, loss_out=None):
        """Forward and backward over the micro-batches, then the update; the mean loss (in loss_out if given)."""
        n = len(xs)
        total = None
        for x, y in zip(xs, ys):
            loss = self._loss(x, y)
            (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
        self.optimizer.step()
        self.optimizer.zero_grad()
        if loss_out is None:
            return total / n
        loss_out.copy_(total / n)
        return loss_out

    def step(self, inputs: np.ndarray, targets: np.ndarray):
        """One optimizer step over the micro-batches; returns a handle on its mean loss (for loss_value)."""
        xs, ys = self._to_device(inputs), self._to_device(targets)
        self._steps += 1
        if self.graphed is not None and self._steps > 1:   # the first step compiles, eagerly launched
            return self._handle(self.graphed(xs, ys))
        # A fresh tensor per micro-batch (not a view at an offset) keeps compiled-graph guards stable.
        xs, ys = [x.long() for x in xs], [y.long() for y in ys]
        return self._handle(self._run_step(xs, ys))

    def _handle(self, loss):
        """On a GPU: the loss copied to pinned host memory behind the step, and an event after the copy.

        Reading a loss through `.item()` would wait for everything queued on the stream, the
        step the harness queues behind this one included; the event lets loss_value wait for this
        step alone, so each step's time is its own. On the CPU the loss tensor itself.
        """
        if not self.on_gpu:
            return loss
        torch = self.torch
        host = torch.empty((), dtype=loss.dtype, pin_memory=True)
        host.copy_(loss, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return host, done

    def loss_value(self, handle) -> float:
        if isinstance(handle, tuple):
            host, done = handle
            done.synchronize()
            return host.item()
        return handle.item()

    def _eval_logits(self, inputs: np.ndarray):
        """train_torch.py's float32 logits (b, T, V) on the device, computed eagerly (nothing new to compile)."""
        x = self._to_device(np.asarray(inputs)[None])[0].long()
        with self.torch.compiler.set_stance("force_eager"):
            return self.model.logits(x).float()

    def eval_logits(self, inputs: np.ndarray) -> np.ndarray:
        """The model's float32 logits (b, T, V) for the leak probe."""
        with self.torch.inference_mode():
            return self._eval_logits(inputs).cpu().numpy()

    def eval_nats(self, inputs: np.ndarray, targets: np.ndarray) -> np.ndarray:
        """Per-token nats (b, T), float32: log-sum-exp minus the target logit of model.logits.

        Evaluation reads only the model's predictions; this cross-entropy is fixed code.
        """
        torch = self.torch
        with torch.inference_mode():
            z = self._eval_logits(inputs)
            y = self._to_device(np.asarray(targets)[None])[0].long()
            out = torch.logsumexp(z, dim=-1) - z.gather(-1, y[..., None])[..., 0]
        return out.cpu().numpy()

    def sync(self) -> None:
        if self.on_gpu:
            self.torch.cuda.synchronize(self.device)

    def peak_memory_mb(self) -> float:
        if self.on_gpu:
            return self.torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        # On the CPU: the process's peak resident memory (KiB on Linux, bytes on macOS).
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss / 2**20 if sys.platform == "darwin" else rss / 2**10

    def executed_files(self) -> list:
        # train.py is executed for its recipe (and the entry point); the model is train_torch.py.
        return [self.train_file, self.torch_file]

    def versions(self) -> dict:
        torch = self.torch
        out = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
        if self.on_gpu:
            out["cuda"] = torch.version.cuda
        out["kernels"] = dict(self.kernels)
        return out

    # --- benchmark hooks ------------------------------------------------------------------
    def time_optimizer(self, repeats: int = 10) -> float:
        """Median seconds of one optimizer update alone (on stand-in gradients).

        Used by `mlx-ar bench` to report the optimizer's share of a step; it updates the
        weights, so call it only on a model built for benchmarking.
        """
        from ..timing import median_seconds

        torch, opt = self.torch, self.optimizer
        for p in self.model.parameters():
            p.grad = (1e-3 * torch.randn(p.shape, device=p.device)).to(p.dtype)

        def update():
            opt.step()
            self.sync()

        seconds = median_seconds(update, repeats)  # the untimed first calls compile and absorb pending work
        opt.zero_grad()
        return seconds
