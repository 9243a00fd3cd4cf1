"""CUDA backend: trains train_torch.py's GPT (the PyTorch twin of train.py's) on an NVIDIA GPU.

`python train.py --backend cuda` drives it through the same harness as the MLX backend. The
recipe comes from train.py's recipe block (the dict the harness passes to `build`); the model,
optimizer and FLOP count come from `train_torch.py` next to train.py. Those two files are what
this backend executes and records.

Choices, and why:
- Device: `cuda:0`, so `CUDA_VISIBLE_DEVICES=3` pins a worker to GPU 3. Without a visible GPU
  it runs on the CPU (device string ends in "(cpu)", MFU unknown), which is how CI runs the
  parity tests and `python train.py --backend cuda --smoke 5`.
- Compilation: on a GPU the model's forward+backward (with flex_attention block masks) and the
  optimizer update are compiled with torch.compile; on the CPU they run eagerly, because
  inductor needs a C++ toolchain and minutes of a small CPU for a run that lasts seconds.
  `MLX_AR_TORCH_COMPILE` overrides the choice: `model` (the whole loss, best fusion),
  `blocks` (each transformer block and the loss head alone; measured at depth 8 with torch's
  attention and MLP: 2.5% slower steps, a first step about 2 s shorter), `none` (eager; SDPA
  with boolean masks).
- Budget: compilation happens inside the first step (the forward, backward and optimizer graphs
  are all built there; later steps reuse them, which tests check), so `warmup_steps` is 1.
- CUDA graph: with a compiled model on a GPU, the second step records the whole step (every
  micro-batch's forward and backward, then the optimizer update) as one CUDA graph and each
  later step replays it: one launch instead of hundreds, so the GPU does not wait on Python.
  On an H100 a default-recipe step (synced) took 12-13 ms replayed against 20-33 ms launched.
  Recording is part of the warmup, so `warmup_steps` is 2 there. `MLX_AR_CUDA_GRAPH=0` turns
  it off.
- Attention: FlashAttention-4 (the optional `flash-attn-4` package, see fa4.py) for every layer
  where it runs (Hopper or newer, package installed); otherwise SDPA for full-context layers and
  flex_attention for short windows. `MLX_AR_ATTENTION` overrides the choice: `auto`, `fa4`
  (required: a clear error where it cannot run), `torch` (SDPA + flex_attention), and
  train_torch.py may decline the kernel (FAST_ATTENTION = False). The run records which
  kernels it used (versions -> attention).
- MLP: quack's GEMMs with relu² in their epilogue (the optional `quack-kernels` package, which
  comes with flash-attn-4; see quack_mlp.py) where they run, and quack's GEMM that adds the
  residual as it stores for both sublayers' output projections; otherwise torch's matmuls with
  the activation and the residual adds fused by torch.compile. `MLX_AR_MLP` overrides it
  (`auto`, `quack`, `torch`), and train_torch.py may decline it (FAST_MLP = False).
  `MLX_AR_QUACK_TUNE=1` lets quack's autotuner pick the MLP's tiles (no faster at the karpathy
  config, ~60 s more on a machine's first run of a shape; the residual-adding GEMM then keeps
  quack's default tiles). Recorded as versions -> mlp.
- Loss: the soft-capped cross-entropy and its logit gradient in one Triton pass over the logits
  (softcap_ce.py) where Triton runs (Ampere or newer; Triton comes with torch's CUDA wheels);
  otherwise two compiled passes. `MLX_AR_LOSS` overrides it (`auto`, `triton`, `torch`), and
  train_torch.py may decline it (FAST_LOSS = False). Recorded as versions -> loss.
- q/k norm and RoPE: one Triton kernel each way (norm_rope.py) where Triton runs; otherwise
  torch.compile's fusion. `MLX_AR_NORM_ROPE` overrides it (`auto`, `triton`, `torch`), and
  train_torch.py may decline it (FAST_NORM_ROPE = False). Recorded as versions -> norm_rope.
- Evaluation runs eagerly (SDPA, or FA4's forward where chosen), so it compiles nothing new.
- Start-up: torch.compile's graphs and the custom kernels are cached on disk, so a later run of
  the same model code skips their compiles (at the karpathy config on an H100: a 7-10 s first
  step against 56-79 s on a fresh machine). Where they are not cached yet, helper processes,
  started before this process imports torch, compile the kernels, the model's backward graph and
  the optimizer update while this process compiles the model's forward (compile_ahead.py; a
  20-22 s first step against 65 s on one fresh machine); `MLX_AR_COMPILE_AHEAD=0` turns them
  off. Inductor runs with INDUCTOR_OPTIONS, and the cache-key tag carries a hash of the kernel
  modules (compile_cache_tag). Where Python would compile torch's sources afresh in every
  process (PYTHONDONTWRITEBYTECODE), their bytecode is cached first (bytecode.py: imports of
  about 4 s instead of 10-12 s on an H100 machine), and the first run compiles the packages of
  IMPORTED_PACKAGES whole, on every core, before any process imports them.
- The FAST_* flags: a kernel computes the train_torch.py code it replaces as shipped, so an
  edit of that code while its flag is on is refused before the model is built (surface.py's
  bypass_reason; the ledger refuses it before a run).

    backend = CudaBackend(train_globals)
    backend.build(recipe, vocab_size, seq_len, seed)
    loss = backend.loss_value(backend.step(inputs, targets))
"""
import functools
import hashlib
import importlib.util
import itertools
import os
import pickle
import platform
import sys
from pathlib import Path

import numpy as np

from ..harness import hardware
from . import bytecode, compile_ahead
from .surface import BypassedEdit, bypass_reason

TORCH_FILE = "train_torch.py"      # the torch model file, next to train.py
COMPILE_ENV = "MLX_AR_TORCH_COMPILE"
COMPILE_MODES = ("model", "blocks", "none")
ATTENTION_ENV = "MLX_AR_ATTENTION"
FA4_CACHE_ENV = "FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED"
MLP_ENV = "MLX_AR_MLP"
QUACK_TUNE_ENV = "MLX_AR_QUACK_TUNE"
QUACK_TUNING_CACHE_ENV = "QUACK_CACHE_AUTOTUNING"
GRAPH_ENV = "MLX_AR_CUDA_GRAPH"
LOSS_ENV = "MLX_AR_LOSS"
NORM_ROPE_ENV = "MLX_AR_NORM_ROPE"
# Each kernel family's switch (compile-ahead helpers set the ones they do not compile to torch).
KERNEL_SWITCHES = {"attention": ATTENTION_ENV, "mlp": MLP_ENV, "loss": LOSS_ENV, "norm_rope": NORM_ROPE_ENV}
# Inductor settings for every compiled graph. One launch configuration per pointwise kernel: timing
# several on a kernel's first call took 6-7 s of every start-up (the choice was not reloaded when the
# compiled model came from the cache), and steps ran as fast without it (H100, depth 8: 276.6-277.3
# against 277.3-277.8 ms).
INDUCTOR_OPTIONS = {"triton.autotune_pointwise": False}
# The modules whose custom ops a compiled model calls (their registered backwards included).
KERNEL_MODULES = ("fa4.py", "quack_mlp.py", "quack_drelu2.py", "softcap_ce.py", "softcap_ce_triton.py",
                  "norm_rope.py", "norm_rope_triton.py")

_module_ids = itertools.count()


def env_switch(name: str, allowed, hint: str, env=os.environ, lower: bool = False) -> str:
    """The environment switch `name`, stripped ("" when unset); ValueError "name='value': hint" unless allowed."""
    value = env.get(name, "").strip()
    value = value.lower() if lower else value
    if value and value not in allowed:
        raise ValueError(f"{name}={value!r}: {hint}")
    return value


def default_compile_mode(on_gpu: bool, env=os.environ) -> str:
    """`model` on a GPU, `none` on the CPU, unless MLX_AR_TORCH_COMPILE says otherwise."""
    mode = env_switch(COMPILE_ENV, COMPILE_MODES, f"choose one of {', '.join(COMPILE_MODES)}", env, lower=True)
    return mode or ("model" if on_gpu else "none")


def graph_wanted(on_gpu: bool, compile_mode: str, env=os.environ) -> bool:
    """Record the step as a CUDA graph? On a GPU with a compiled model, unless MLX_AR_CUDA_GRAPH=0."""
    flag = env_switch(GRAPH_ENV, ("0", "1"), "use 1 (record the step as a CUDA graph) or 0 (do not)", env)
    return on_gpu and compile_mode != "none" and flag != "0"


def compile_ahead_wanted(on_gpu: bool, compile_mode: str, env=os.environ) -> bool:
    """Compile kernels and the optimizer in helper processes (compile_ahead.py)? On a GPU with a
    compiled model, unless MLX_AR_COMPILE_AHEAD=0."""
    flag = env_switch(compile_ahead.ENV, ("0", "1"),
                      "use 1 (compile kernels and the optimizer in helper processes) or 0 (do not)", env)
    return on_gpu and compile_mode != "none" and flag != "0"


def with_inductor_options(compile_options: dict) -> dict:
    """torch.compile arguments with INDUCTOR_OPTIONS added when the compiler is inductor (the default)."""
    if compile_options.get("backend", "inductor") != "inductor":
        return dict(compile_options)
    return {**compile_options, "options": {**INDUCTOR_OPTIONS, **compile_options.get("options", {})}}


def compile_cache_tag(current: str, folder=Path(__file__).parent, modules=KERNEL_MODULES) -> str:
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
                           f"depends on data) or recompiles after step 1; remove it, or run with "
                           f"{GRAPH_ENV}=0") from e
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


def quack_tuning_wanted(env=os.environ) -> bool:
    """Let quack's autotuner pick the fused MLP's tiles? Only with MLX_AR_QUACK_TUNE=1 (see quack_mlp.mlp)."""
    return env_switch(QUACK_TUNE_ENV, ("0", "1"), "use 1 (autotune the fused MLP's GEMMs) or 0 (default tiles)",
                      env) == "1"


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


def choose_kernel(env_name: str, fast: str, what: str, reason, env=os.environ) -> tuple[str, str]:
    """(fast | "torch", why) from the environment switch `env_name` (auto, `fast` or torch).

    reason(): why the fast kernel `what` cannot run here (None: it can); asked only when it matters.
    """
    choices = ("auto", fast, "torch")
    choice = env_switch(env_name, choices, f"choose one of {', '.join(choices)}", env, lower=True) or "auto"
    if choice == "torch":
        return "torch", f"{env_name}=torch"
    why = reason()
    if why is None:
        return fast, "available"
    if choice == fast:
        raise ValueError(f"{env_name}={fast}, but {what} cannot run here: {why}")
    return "torch", why


def choose_attention(device, head_dim: int, env=os.environ, probe=None) -> tuple[str, str]:
    """("fa4" | "torch", why) for a model with heads of `head_dim` channels on `device`.

    `probe(device, head_dim)` says why FA4 cannot run (None: it can); default fa4.unavailable_reason.
    """
    if probe is None:
        from .fa4 import unavailable_reason as probe
    return choose_kernel(ATTENTION_ENV, "fa4", "FlashAttention-4", lambda: probe(device, head_dim), env)


def choose_mlp(device, dims, env=os.environ, probe=None) -> tuple[str, str]:
    """("quack" | "torch", why) for an MLP of matrices sized `dims` (d_model, hidden) on `device`.

    `probe(device, dims)` says why quack's fused GEMMs cannot run; default quack_mlp.unavailable_reason.
    """
    if probe is None:
        from .quack_mlp import unavailable_reason as probe
    return choose_kernel(MLP_ENV, "quack", "quack's fused relu² MLP", lambda: probe(device, dims), env)


def choose_loss(device, env=os.environ, probe=None) -> tuple[str, str]:
    """("triton" | "torch", why) for the fused soft-capped cross-entropy on `device`.

    `probe(device)` says why the Triton kernel cannot run; default softcap_ce.unavailable_reason.
    """
    if probe is None:
        from .softcap_ce import unavailable_reason as probe
    return choose_kernel(LOSS_ENV, "triton", "the Triton cross-entropy", lambda: probe(device), env)


def choose_norm_rope(device, head_dim: int, env=os.environ, probe=None) -> tuple[str, str]:
    """("triton" | "torch", why) for the fused q/k RMS norm + RoPE on `device`.

    `probe(device, head_dim)` says why the Triton kernels cannot run; default norm_rope.unavailable_reason.
    """
    if probe is None:
        from .norm_rope import unavailable_reason as probe
    return choose_kernel(NORM_ROPE_ENV, "triton", "the Triton q/k norm + RoPE", lambda: probe(device, head_dim), env)


def micro_batch_shape(recipe: dict, seq_len: int):
    """(rows, seq_len) of the token batches each forward gets, as the harness splits a step
    (batch_geometry); None when the recipe's batch sizes are not valid (the harness says why)."""
    from ..harness.main import batch_geometry

    try:
        return batch_geometry(recipe, seq_len)[2], seq_len
    except ValueError:
        return None


def load_torch_file(path):
    """Execute train_torch.py as a fresh module (a new one per call, like trainfile.load_train)."""
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


def cpu_model_name(cpuinfo="/proc/cpuinfo") -> str:
    """'AMD EPYC 7B13' from /proc/cpuinfo on Linux, else what `platform` knows."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and value.strip():
                    return " ".join(value.split())
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


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


# What a run imports, compiled whole where Python would compile it in every process (bytecode.py).
IMPORTED_PACKAGES = ("torch", "triton", "sympy", "mpmath", "networkx", "jinja2", "numpy",
                     "flash_attn", "quack", "cutlass", "einops")


def before_torch_import(compile_mode: str | None = None) -> None:
    """What must happen before this process first imports torch: bytecode caching (bytecode.py),
    then the standby helpers, whose imports and GPU set-up overlap ours (compile_ahead.py)."""
    bytecode.cache_bytecode("torch", precompile=IMPORTED_PACKAGES)
    compile_ahead.stand_by_if_wanted(compile_mode)


class CudaBackend:
    name = "cuda"

    def __init__(self, train_globals: dict, compile_mode: str | None = None, compile_options: dict | None = None):
        """compile_mode: one of COMPILE_MODES (default: from the device and MLX_AR_TORCH_COMPILE);
        compile_options: extra torch.compile arguments (tests pass a cheaper compiler backend)."""
        before_torch_import(compile_mode)
        import torch

        self.torch = torch
        self.g = train_globals
        self.train_file = Path(train_globals["__file__"]).resolve()
        self.torch_file = self.train_file.parent / TORCH_FILE
        self.on_gpu = torch.cuda.is_available()
        self.device = torch.device("cuda:0" if self.on_gpu else "cpu")
        self.compile_mode = compile_mode or default_compile_mode(self.on_gpu)
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {', '.join(COMPILE_MODES)}, got {self.compile_mode!r}")
        self.user_compile_options = dict(compile_options or {})   # what compile-ahead helpers are given
        self.compile_options = with_inductor_options(compile_options or {})
        self.warmup_steps = 1
        self.num_params = 0
        self.flops_per_token = 0.0
        self.kernels = {}              # the kernels build() chose (attention, MLP, loss, norm_rope), for the record
        self._staging = PinnedStaging(torch, self.device) if self.on_gpu else None
        self.graphed = None            # GraphedStep once build() decides to record the step
        self.helpers_wanted = compile_ahead_wanted(self.on_gpu, self.compile_mode)   # helpers in build()
        if not self.helpers_wanted:
            compile_ahead.release_standby()

    # --- device ---------------------------------------------------------------------------
    def device_name(self) -> str:
        if self.on_gpu:
            return self.torch.cuda.get_device_name(self.device)
        return f"{cpu_model_name()} (cpu)"

    def peak_flops(self) -> float | None:
        if self.on_gpu:
            return hardware.nvidia_peak_flops(self.device_name())
        return None  # no honest peak for a CPU

    def configure_memory(self) -> None:
        if self.on_gpu:
            self.torch.cuda.set_device(self.device)
            self.torch.cuda.reset_peak_memory_stats(self.device)

    # --- model ----------------------------------------------------------------------------
    def build(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None:
        reason = bypass_reason(self.torch_file.read_text()) if self.torch_file.exists() else None
        if reason:
            raise BypassedEdit(reason)
        torch = self.torch
        torch.manual_seed(seed)
        tt = load_torch_file(self.torch_file)
        flex = self.on_gpu and self.compile_mode != "none"
        cfg = tt.GPTConfig.from_recipe(recipe, vocab_size, seq_len)
        attention, why_attention = self._attention_kernel(cfg.head_dim)
        mlp, residual, why_mlp = self._mlp_kernels((cfg.d_model, cfg.mlp_hidden))
        loss, why_loss = self._loss_kernel()
        norm_rope, why_norm_rope = self._norm_rope_kernel(cfg.head_dim)
        model = tt.build_model(recipe, vocab_size, seq_len, device=self.device, flex=flex, attention=attention,
                               mlp=mlp, loss=loss, norm_rope=norm_rope, residual=residual)
        self.kernels = self._kernel_labels(model, why_attention, why_mlp, why_loss, why_norm_rope)
        optimizer = tt.build_optimizer(model, recipe)
        self.tt, self.model, self.optimizer = tt, model, optimizer
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = float(tt.flops_per_token(model.cfg))
        self._loss = model
        options = {"fullgraph": True, "dynamic": False, **self.compile_options}
        if self.compile_mode == "model":
            self._loss = torch.compile(model, **options)
        elif self.compile_mode == "blocks":
            # Blocks of the same kind (window, value embedding or not) share compiled code.
            for block in model.blocks:
                block.compile(**options)
            model.head_loss = torch.compile(model.head_loss, **options)
        if self.compile_mode != "none":
            torch.compiler.config.cache_key_tag = compile_cache_tag(torch.compiler.config.cache_key_tag)
            optimizer.compile(**self.compile_options)
        self.graphed, self._steps = None, 0
        self._ahead_keys = {}
        self._batch_shape = micro_batch_shape(recipe, seq_len)
        if self.helpers_wanted:
            self._start_helpers(recipe, vocab_size, seq_len, seed)
        if graph_wanted(self.on_gpu, self.compile_mode):
            self.graphed = GraphedStep(torch, self._run_step, lambda fn: record_cuda_graph(torch, fn))
            self.warmup_steps = 2          # step 1 compiles, step 2 records the graph

    def compile_ahead_keys(self) -> dict:
        """{job: key} for the built model: what each compile-ahead job's compiled code depends on.

        Kernel jobs: the kernels chosen (their labels: versions, quack's tiles), the model's config
        and the kernel modules (in the cache tag). The backward (a compiled whole model only): all
        of train_torch.py, the model's config, the kernels and the batch shape. The optimizer: its
        code in train_torch.py (code_fingerprint), the parameters' shapes and the optimizer's
        constants. A key that misses a change only costs time: this process then compiles what it
        finds missing from the caches.
        """
        torch = self.torch
        common = (torch.__version__, self.device_name(), torch.compiler.config.cache_key_tag)
        keys = {}
        for job, families in compile_ahead.KERNEL_JOBS.items():
            used = [self.kernels[f] for f in families if not self.kernels.get(f, "torch").startswith("torch")]
            if used:
                keys[job] = compile_ahead.key(job, common, used, repr(self.model.cfg))
        if self.compile_mode == "model" and self._batch_shape:
            source = hashlib.sha256(self.torch_file.read_bytes()).hexdigest()
            keys["backward"] = compile_ahead.key("backward", common, source, repr(self.model.cfg),
                                                 sorted(self.kernels.items()), self._batch_shape,
                                                 repr(self.user_compile_options))
        shapes = [(n, tuple(p.shape), str(p.dtype)) for n, p in self.model.named_parameters()]
        code = compile_ahead.code_fingerprint(self.tt, [type(self.optimizer)])
        keys["optimizer"] = compile_ahead.key("optimizer", common, code, shapes,
                                              repr(getattr(self.optimizer, "cfg", None)),
                                              repr(self.user_compile_options))
        return keys

    def _start_helpers(self, recipe: dict, vocab_size: int, seq_len: int, seed: int) -> None:
        """Start a compile-ahead helper for each job whose pieces are not known to be cached."""
        self._ahead_keys = self.compile_ahead_keys()
        jobs = compile_ahead.plan(self._ahead_keys, compile_ahead.stamp_dir())
        spec = {"train_file": str(self.train_file), "recipe": recipe, "vocab_size": vocab_size,
                "seq_len": seq_len, "seed": seed, "compile_options": self.user_compile_options,
                "rows": self._batch_shape[0] if self._batch_shape else None}
        try:
            if not compile_ahead.start(jobs, spec):      # all stamped: the standby helpers are let go
                return
        except (pickle.PicklingError, TypeError, AttributeError) as e:   # e.g. a compiler given as a function
            print(f"compile-ahead: no helpers ({type(e).__name__}: {e}); compiling here", file=sys.stderr, flush=True)
            return
        print(f"compile-ahead: {', '.join(jobs)} compiling in helper processes", file=sys.stderr, flush=True)

    def _attention_kernel(self, head_dim: int):
        """(FA4's attention function, None) where it is chosen, else (None, why not).

        train_torch.py may still decline the function (FAST_ATTENTION = False).
        """
        kind, why = choose_attention(self.device, head_dim)
        if kind == "torch":
            return None, why
        # Compiled FA4 kernels are kept on disk, so later runs skip their ~5 s compile each.
        os.environ.setdefault(FA4_CACHE_ENV, "1")
        from . import fa4

        return fa4.attention, None

    def _mlp_kernels(self, dims):
        """(quack's fused relu² MLP, quack's residual-adding matmul, None) where quack is chosen,
        else (None, None, why not)."""
        tuned = quack_tuning_wanted()      # checked everywhere, so a bad value never passes silently
        kind, why = choose_mlp(self.device, dims)
        if kind == "torch":
            return None, None, why
        # quack caches compiled kernels by default; this keeps its autotuner's choices too.
        os.environ.setdefault(QUACK_TUNING_CACHE_ENV, "1")
        from . import quack_mlp

        tiles = quack_mlp.pinned_tiles(self.torch.cuda.get_device_capability(self.device), tuned)
        return (functools.partial(quack_mlp.mlp, tuned=tuned, tiles=tiles),
                functools.partial(quack_mlp.residual_linear, tiles=tiles), None)

    def _loss_kernel(self):
        """(the fused Triton cross-entropy, None) where it is chosen, else (None, why not)."""
        kind, why = choose_loss(self.device)
        if kind == "torch":
            return None, why
        from . import softcap_ce

        return softcap_ce.cross_entropy, None

    def _norm_rope_kernel(self, head_dim: int):
        """(the fused Triton q/k norm + RoPE, None) where it is chosen, else (None, why not)."""
        kind, why = choose_norm_rope(self.device, head_dim)
        if kind == "torch":
            return None, why
        from . import norm_rope

        return norm_rope.norm_rope, None

    def _kernel_labels(self, model, why_attention: str | None, why_mlp: str | None, why_loss: str | None,
                       why_norm_rope: str | None) -> dict:
        """What the built model runs attention, the MLP, the training loss and q/k's norm and RoPE
        with, for the record.

        why_*: why the fast kernel was not offered (None: it was, and train_torch.py declined it).
        """
        def fallback(on_cpu: str, on_gpu: str, fast: str, why: str | None, flag: str) -> str:
            if not self.on_gpu:
                return on_cpu
            return f"{on_gpu} ({fast} not used: {why or f'{flag} = False in train_torch.py'})"

        labels = {}
        if model.masks.kernel is not None:
            from . import fa4

            labels["attention"] = f"fa4 {fa4.version()}"
        else:
            labels["attention"] = fallback("torch sdpa", "torch sdpa+flex", "fa4", why_attention, "FAST_ATTENTION")
        kernel = model.blocks[0].mlp.kernel
        if kernel is not None:
            from . import quack_mlp

            keywords = getattr(kernel, "keywords", {})
            tiles = quack_mlp.tiles_label(keywords.get("tiles", ()), keywords.get("tuned", False))
            epilogues = "relu² and the residual adds" if model.blocks[0].attn.c_proj.kernel is not None else "relu²"
            labels["mlp"] = f"quack {quack_mlp.version()} ({epilogues} in the GEMM epilogues, {tiles})"
        else:
            labels["mlp"] = fallback("torch", "torch", "quack", why_mlp, "FAST_MLP")
        if model.loss_kernel is not None:
            from . import softcap_ce

            labels["loss"] = f"triton {softcap_ce.version()} (soft-capped cross-entropy and its gradient in one pass)"
        else:
            labels["loss"] = fallback("torch", "torch", "triton", why_loss, "FAST_LOSS")
        if model.blocks[0].attn.norm_rope is not None:
            from . import norm_rope

            labels["norm_rope"] = f"triton {norm_rope.version()} (q/k RMS norm and RoPE in one pass each way)"
        else:
            labels["norm_rope"] = fallback("torch", "torch", "triton", why_norm_rope, "FAST_NORM_ROPE")
        return labels

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
            # The first backward compiles: the backward helper's graph must be in the cache by then.
            loss = compile_ahead.gate_backward(lambda: self._loss(x, y))
            (loss / n).backward()
            total = loss.detach() if total is None else total + loss.detach()
        compile_ahead.wait()               # the first update finds the helper's compiled code cached
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
        if self._steps > 1:
            return self._handle(self._run_step(xs, ys))
        loss = compile_ahead.retry_out_of_memory(lambda: self._run_step(xs, ys), self._reset_first_step,
                                                 self.torch.OutOfMemoryError)
        if self._ahead_keys:
            compile_ahead.mark_done(self._ahead_keys, compile_ahead.stamp_dir())
        return self._handle(loss)

    def _reset_first_step(self):
        """Before running a first step again: no gradients, and the memory of the failed try handed back."""
        self.optimizer.zero_grad()
        if self.on_gpu:
            self.torch.cuda.empty_cache()

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
        out.update(self.kernels)
        return out

    # --- benchmark hooks ------------------------------------------------------------------
    def time_optimizer(self, repeats: int = 10) -> float:
        """Median seconds of one optimizer update alone (on stand-in gradients).

        Used by `mlx-ar bench` to report the optimizer's share of a step; it updates the
        weights, so call it only on a model built for benchmarking.
        """
        from ..harness.clock import median_seconds

        torch, opt = self.torch, self.optimizer
        for p in self.model.parameters():
            p.grad = (1e-3 * torch.randn(p.shape, device=p.device)).to(p.dtype)

        def update():
            opt.step()
            self.sync()

        seconds = median_seconds(update, repeats)  # the untimed first calls compile and absorb pending work
        opt.zero_grad()
        return seconds
