"""Compile-ahead: helper processes compile a model's custom kernels and its optimizer update while
the training process compiles the model.

On a GPU the first step compiles everything, one piece after another, on one CPU core: the
model's graphs (torch.compile), the custom kernels at their first launch (FA4's and quack's
CuTe DSL kernels, the Triton loss) and the optimizer update (torch.compile again). On a fresh
H100 at the karpathy config those were about 22 s, 17 s and 15 s of a 63 s first step. The
pieces do not depend on each other, so helpers build the same model from the same files and
recipe and each compiles one piece, in parallel with the model's compile here:

- `attention`, `mlp+loss+rope`: the model, with only that job's kernels chosen, runs one eager
  forward and backward on a one-row batch, which compiles those kernels;
- `backward`: the compiled model is traced at the training batch's shape and only its backward
  graph is compiled (compile_backward_only): inductor compiles a model's forward and backward
  one after the other, so here the training process compiles the forward while the helper
  compiles the backward, and the training process's backward compile finds it cached (gate_backward
  waits for the helper before the first backward; its cache key matched in 13 of 15 runs that
  compiled the model on an H100, and a miss only means this process compiles the backward itself);
- `optimizer`: the compiled optimizer update runs once on zero gradients.

What a helper compiles lands in the on-disk caches (FA4's, quack's, Triton's, inductor's); the
training process finds it there when it reaches that piece. Helpers compile with at most
HELPER_COMPILE_THREADS inductor workers each, so the training process's compile keeps cores.
A kernel helper says when its forward kernels are compiled (FORWARD_DONE) and goes on with the
backward's; the training process waits for that line before its first forward kernel launch
(`wait_kernels(forward_only=True)`), and for the kernel helpers to finish before its first
backward kernel launch (`wait_kernels()`). It waits for every helper (`wait`) before its first
optimizer update. The optimizer helper holds a copy of the parameters and optimizer state (and
a CUDA context) until then; if the first step runs out of GPU memory while it does, the step
waits for it and runs again (`retry_out_of_memory`). A helper that fails or runs out of
time costs only time: the training process compiles that piece itself.

Helpers are started early: `stand_by` starts one per job when the backend is created, before
this process imports torch, and each imports torch and torch.compile's modules and sets up the
GPU (nearly all of it imports: 10-12 s on an H100 machine whose Python compiles torch afresh at
each import, about 4 s with its bytecode cached by bytecode.py) while this process does the same
and builds the model; `start` then hands each a job, and lets the ones it does not need exit.

A stamp per job (`key`: a hash of what the job's compiled code depends on) is written after a
first step that got through; a later run with the same stamp starts no helper, since its pieces
come from the caches at once.

    stand_by_if_wanted()                # when the backend is created, before torch is imported
    jobs = plan(keys, stamp_dir)        # {job: key} for the jobs without a stamp
    start(jobs, spec, env)              # in build(), after the model and optimizer exist
    wait_kernels(forward_only=True)     # before the first forward kernel launch
    loss = gate_backward(forward)       # the first forward, then the backward helper
    wait_kernels()                      # before the first backward kernel launch
    wait()                              # before the first optimizer update
    mark_done(keys, stamp_dir)          # after the first step

`python -m mlx_ar.backends.compile_ahead JOB SPEC` is a helper; SPEC is a pickled dict with the
train.py path, recipe, vocab size, sequence length, seed and rows per forward. `... --standby` is
a helper that reads its job, SPEC and environment as one JSON line on its input (none: it exits).
"""
import atexit
import hashlib
import json
import os
import pickle
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ENV = "MLX_AR_COMPILE_AHEAD"      # 0: no helpers (the cuda backend reads it)
# Each kernel job keeps its own kernel families and sets the others' switches to torch.
KERNEL_JOBS = {"attention": ("attention",), "mlp+loss+rope": ("mlp", "loss", "norm_rope")}
# `backward` traces the whole model with every kernel the training process chose.
JOBS = (*KERNEL_JOBS, "backward", "optimizer")
TIMEOUT = 600.0                    # seconds the training process waits for a helper before going on alone
TAIL = 1500                        # characters of a failed helper's log that are shown
FORWARD_DONE = "compile-ahead: forward kernels compiled"   # a kernel helper's line before its backward
POLL = 0.05                        # seconds between looks at the kernel helpers' logs
HELPER_COMPILE_THREADS = 4         # inductor's compile workers per helper (at most)

_running = []                      # helpers started by start() and not yet waited for
_standby = []                      # helpers started by stand_by() and not yet given a job
_released = []                     # standby helpers given no job, on their way out
_spec_files = []                   # their spec files, removed once they are waited for


def key(*parts) -> str:
    """A short hash of `parts` (their reprs)."""
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:24]


def code_fingerprint(module, roots) -> str:
    """A hash of the source of `roots` (functions, classes) and of what they use from `module`:
    its functions and classes (followed in turn) and its constants (by value).

    The optimizer's key takes this instead of train_torch.py's whole text, so an edit elsewhere
    in the file (the model, a comment) does not start a helper for an optimizer that is cached.
    """
    import inspect

    seen, parts, todo = set(), [], list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        try:
            parts.append(inspect.getsource(obj))
        except (OSError, TypeError):
            parts.append(repr(obj))
            continue
        for name in sorted(_names_used(obj)):
            value = getattr(module, name, None)
            if inspect.isfunction(value) or inspect.isclass(value):
                if getattr(value, "__module__", None) == module.__name__:
                    todo.append(value)
            elif value is not None and not (inspect.ismodule(value) or callable(value) or name.startswith("__")):
                parts.append(f"{name}={value!r}")
    return key(*parts)


def _names_used(obj) -> set:
    """Global names read by the code of a function, or of a class's methods (nested code included)."""
    import inspect

    obj = inspect.unwrap(obj)      # a decorated function's own code (torch.no_grad wraps it)
    codes = [obj.__code__] if inspect.isfunction(obj) else [
        f.__code__ for f in (inspect.unwrap(getattr(v, "__func__", v)) for v in vars(obj).values())
        if inspect.isfunction(f)]
    names = set()
    while codes:
        code = codes.pop()
        names.update(code.co_names)
        codes.extend(c for c in code.co_consts if inspect.iscode(c))
    return names


def stamp_dir() -> Path:
    """Where stamps live: beside inductor's cache, so clearing that cache clears them too."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return Path(cache_dir()) / "mlx_ar_compile_ahead"


def plan(keys: dict, folder: Path) -> dict:
    """The jobs of `keys` ({job: key}) that have no stamp in `folder`."""
    return {job: k for job, k in keys.items() if not (Path(folder) / f"{job}-{k}").exists()}


def mark_done(keys: dict, folder: Path) -> None:
    """Stamp `keys`: their pieces are in the caches. A stamp that cannot be written is skipped."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
        for job, k in keys.items():
            (Path(folder) / f"{job}-{k}").touch()
    except OSError:
        pass                       # without the stamp the next run starts helpers again: slower, not wrong


def job_env(job: str, env=os.environ) -> dict:
    """The helper's environment: the kernel switches of the families it does not compile set to torch
    (the backward job keeps them all), and no helpers of its own."""
    from .cuda_backend import KERNEL_SWITCHES

    out = {**env, ENV: "0"}
    keep = tuple(KERNEL_SWITCHES) if job == "backward" else KERNEL_JOBS.get(job, ())
    for family, switch in KERNEL_SWITCHES.items():
        if family not in keep:
            out[switch] = "torch"
    return out


# --- the training process's side -------------------------------------------------------------
class Helper:
    """One helper process running `argv`, its output in a log file.

    `wait(timeout)` returns None when it exited cleanly, else why not (killing it on a timeout).
    """

    def __init__(self, job: str | None, argv: list, env=None, log_dir=None, popen=subprocess.Popen):
        self.job = job             # None: a standby helper, waiting for give()
        name = (job or "standby").replace("+", "_")
        self.log = tempfile.NamedTemporaryFile("w+b", prefix=f"mlx_ar_ahead_{name}_", suffix=".log", dir=log_dir,
                                               delete=False)
        self.report = {}           # the helper's last output line (run_job's dict) once it succeeded
        self.forward_done = False  # FORWARD_DONE seen in its log
        stdin = subprocess.DEVNULL if job else subprocess.PIPE
        self.proc = popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=stdin, env=env)

    def give(self, job: str, spec_path: str, env: dict) -> None:
        """Hand a standby helper its job (it reads one line and runs it)."""
        self.job = job
        line = json.dumps({"job": job, "spec": spec_path, "env": dict(env)}) + "\n"
        try:
            self.proc.stdin.write(line.encode())
            self.proc.stdin.close()
        except OSError:
            pass                   # it has died: wait() reports its exit code and log

    def release(self) -> None:
        """Tell a standby helper there is no job for it: it exits."""
        try:
            self.proc.stdin.close()
        except OSError:
            pass

    def wait(self, timeout: float = TIMEOUT) -> str | None:
        try:
            code = self.proc.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return f"no result after {timeout:.0f} s (stopped it)"
        self.log.seek(0)
        text = self.log.read().decode(errors="replace")
        if code == 0:
            self.report = _last_json(text)
            self._drop_log()
            return None
        self.log.close()           # the file stays for the user to read
        return f"exited with code {code} (its log, {self.log.name}, ends: {text[-TAIL:].strip()})"

    def said(self, line: str) -> bool:
        """Has the helper written `line` so far? (Its log is read by name: the shared handle's
        offset is where the helper writes.)"""
        try:
            return line.encode() in Path(self.log.name).read_bytes()
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if getattr(self.proc, "stdin", None):
            self.release()
        self._drop_log()

    def _drop_log(self):
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def standby_wanted(compile_mode: str | None, env=os.environ, gpus=Path("/proc/driver/nvidia/gpus")) -> bool:
    """Start standby helpers now, before torch is imported? When helpers are not switched off, the
    model is to be compiled, and the NVIDIA driver lists a GPU this process may see. A wrong guess
    costs little: the backend releases them once it knows (release_standby)."""
    from .cuda_backend import COMPILE_ENV   # no torch import: the backend imports torch when created

    if env.get(ENV) == "0" or (compile_mode or env.get(COMPILE_ENV, "").lower()) == "none":
        return False
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1") or _standby or _running:
        return False
    try:
        return any(gpus.iterdir())
    except OSError:
        return False


def stand_by(n: int = len(JOBS), env=os.environ, log_dir=None, popen=subprocess.Popen) -> list:
    """Start `n` standby helpers (`python -m mlx_ar.backends.compile_ahead --standby`): they import
    torch and set up the GPU now, then wait for start() to give them a job."""
    argv = [sys.executable, "-m", __name__, "--standby"]
    helpers = [Helper(None, argv, env={**env, ENV: "0"}, log_dir=log_dir, popen=popen) for _ in range(n)]
    _standby.extend(helpers)
    return helpers


def stand_by_if_wanted(compile_mode: str | None = None) -> None:
    """stand_by() where standby_wanted(compile_mode) says so; call it before importing torch."""
    if standby_wanted(compile_mode):
        stand_by()


def release_standby() -> None:
    """Let the standby helpers that got no job exit."""
    while _standby:
        helper = _standby.pop()
        helper.release()
        _released.append(helper)


def start(jobs, spec: dict, env=os.environ, log_dir=None, popen=subprocess.Popen) -> list:
    """Give each job to a standby helper, or start a helper for it (`python -m
    mlx_ar.backends.compile_ahead JOB SPEC`); returns them. Standby helpers left over are released.

    `spec` is pickled to a file the helpers read; they are waited for by `wait`.
    """
    jobs = list(jobs)
    try:
        if not jobs:
            return []
        data = pickle.dumps({**spec, "started": time.time()})   # raises before any file exists
        fd, spec_path = tempfile.mkstemp(prefix="mlx_ar_ahead_", suffix=".pkl", dir=log_dir)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        helpers = []
        for job in jobs:
            if _standby:
                helper = _standby.pop(0)
                helper.give(job, spec_path, job_env(job, env))
            else:
                argv = [sys.executable, "-m", __name__, job, spec_path]
                helper = Helper(job, argv, env=job_env(job, env), log_dir=log_dir, popen=popen)
            helpers.append(helper)
        _running.extend(helpers)
        _spec_files.append(spec_path)
        return helpers
    finally:
        release_standby()


def wait(jobs=JOBS, timeout: float = TIMEOUT, out=None) -> list:
    """Wait for the running helpers of `jobs`; says on `out` (stderr) when each was ready, or why it failed.

    Called at each custom kernel's launch (`wait_kernels`) and before each optimizer update
    (every job): once nothing is running it returns at once. Returns the helpers waited for.
    """
    helpers = [h for h in _running if h.job in jobs]
    if not helpers:
        return []
    for helper in helpers:
        _running.remove(helper)
    out = out or sys.stderr
    t0 = time.perf_counter()
    ready = []
    for helper in helpers:
        why = helper.wait(t0 + timeout - time.perf_counter())
        if why:
            print(f"compile-ahead {helper.job}: {why}; this process compiles it instead", file=out, flush=True)
        else:
            ready.append(f"{helper.job} {helper.report.get('ready_seconds', '?')} s")
    if ready:
        print(f"compile-ahead: ready after {', '.join(ready)}; waited {time.perf_counter() - t0:.1f} s here",
              file=out, flush=True)
    if not _running:
        _remove_spec_files()
    _reap_released()
    return helpers


def wait_kernels(forward_only: bool = False, timeout: float = TIMEOUT, out=None) -> None:
    """Wait for the kernel helpers: a kernel's first launch must find its compiled code cached.

    forward_only (a forward kernel's launch): wait until each kernel helper has said FORWARD_DONE
    or has exited, and leave the ones still compiling backward kernels running. Otherwise (a
    backward kernel's launch) wait for them to finish.
    """
    if not _running:
        return
    if not forward_only:
        wait(KERNEL_JOBS, timeout, out)
        return
    pending = [h for h in _running if h.job in KERNEL_JOBS and not h.forward_done]
    if not pending:
        return
    t0 = time.perf_counter()
    while True:
        for h in list(pending):
            if h.proc.poll() is not None:
                pending.remove(h)
            elif h.said(FORWARD_DONE):
                h.forward_done = True
                pending.remove(h)
        if not pending or time.perf_counter() - t0 >= timeout:
            break
        time.sleep(POLL)
    out = out or sys.stderr
    _stop(pending)                 # neither done nor exited in time: this process compiles them
    for h in pending:
        print(f"compile-ahead {h.job}: no forward kernels after {timeout:g} s (stopped it); "
              f"this process compiles them instead", file=out, flush=True)
    wait([h.job for h in _running if h.job in KERNEL_JOBS and h.proc.poll() is not None], timeout, out)
    forward = [h.job for h in _running if h.forward_done]
    if forward:
        print(f"compile-ahead: forward kernels of {', '.join(forward)} ready; waited "
              f"{time.perf_counter() - t0:.1f} s here", file=out, flush=True)
    if not _running:
        _remove_spec_files()


def running(job: str | None = None) -> bool:
    """Is a helper (of `job`, if given) started and not yet waited for?"""
    return any(job is None or h.job == job for h in _running)


def cache_hits() -> int:
    """How many graphs this process has loaded from torch.compile's caches so far."""
    from torch._dynamo.utils import counters

    return counters["aot_autograd"]["autograd_cache_hit"] + counters["inductor"]["fxgraph_cache_hit"]


def gate_backward(forward, out=None):
    """Run forward() (the first micro-batch's compiled forward) and return its result; while the
    backward helper runs, first make sure the backward compile that follows finds its work.

    The backward graph is compiled at the first backward call, so this waits for the helper after
    the forward: unless the forward came from the caches, whose entry holds the backward too. Then
    the helper is not needed and is stopped.
    """
    if not running("backward"):
        return forward()
    hits = cache_hits()
    result = forward()
    if cache_hits() > hits:
        _stop([h for h in _running if h.job == "backward"])
        print("compile-ahead: the model came from the caches; backward helper stopped", file=out or sys.stderr,
              flush=True)
    else:
        wait(("backward",), out=out)
    return result


def retry_out_of_memory(run, reset, error=MemoryError):
    """run(); if it raises `error` while a helper is running (a helper holds GPU memory), wait for
    the helpers, reset() and run() again. Returns run()'s result.

    The cuda backend runs its first step through this: the optimizer helper may still hold its
    copy of the parameters while that step's forward and backward allocate their activations.
    """
    try:
        return run()
    except error:
        if not running():
            raise
    wait()
    reset()
    return run()


def _stop(helpers) -> None:
    """Stop running `helpers` before they are done and forget them: this process compiles their pieces."""
    for helper in helpers:
        _running.remove(helper)
        helper.stop()


@atexit.register
def _stop_all():
    """A training process that ends early (an error, Ctrl-C) takes its helpers with it."""
    for group in (_running, _standby, _released):
        while group:
            group.pop().stop()
    _remove_spec_files()


def _reap_released():
    """Forget released standby helpers that have exited (and their logs)."""
    for helper in [h for h in _released if h.proc.poll() is not None]:
        _released.remove(helper)
        helper.stop()


def _remove_spec_files():
    """Remove the spec files of helpers that are all done."""
    while _spec_files:
        Path(_spec_files.pop()).unlink(missing_ok=True)


def _last_json(text: str) -> dict:
    """The dict on the last line of a helper's output ({} when there is none)."""
    lines = text.strip().splitlines()
    try:
        found = json.loads(lines[-1]) if lines else {}
    except ValueError:
        return {}
    return found if isinstance(found, dict) else {}


# --- the helper's side -----------------------------------------------------------------------
def run_job(job: str, spec: dict) -> dict:
    """Compile `job`'s piece for the model that `spec` describes; returns what it did (for its log).

    spec: train_file, recipe, vocab_size, seq_len, seed, rows (per forward; the backward job's
    batch shape), and optionally compile_options (tests pass a cheaper compiler). Kernel jobs take
    the kernel switches from the environment (job_env).
    """
    import torch

    from .cuda_backend import CudaBackend

    if job not in JOBS:
        raise ValueError(f"unknown compile-ahead job {job!r}; choose one of {', '.join(JOBS)}")
    t0 = time.perf_counter()
    mode = "model" if job in ("backward", "optimizer") else "none"
    backend = CudaBackend({"__file__": spec["train_file"]}, compile_mode=mode,
                          compile_options=spec.get("compile_options"))
    backend.helpers_wanted = False  # a helper starts no helpers
    backend.configure_memory()
    backend.build(spec["recipe"], spec["vocab_size"], spec["seq_len"], spec["seed"])
    model = backend.model
    done = {"job": job, "kernels": backend.kernels}
    if job == "optimizer":
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        backend.optimizer.step()
    elif job == "backward":
        done["compiled"] = compile_backward_only(backend._loss, spec["rows"], spec["seq_len"], backend.device)
    else:
        gen = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, spec["vocab_size"], (1, spec["seq_len"]), generator=gen).to(backend.device)
                for _ in range(2))
        loss = model(x, y)
        backend.sync()
        print(FORWARD_DONE, flush=True)
        loss.backward()
        done["loss"] = float(loss.detach())
    backend.sync()
    done["seconds"] = round(time.perf_counter() - t0, 2)
    if "started" in spec:          # wall time since the training process started this helper
        done["ready_seconds"] = round(time.time() - spec["started"], 1)
    return done


class _ForwardSkipped(Exception):
    """Raised by the backward job's stand-in for the compiled forward."""


def compile_backward_only(compiled_loss, rows: int, seq_len: int, device) -> bool:
    """Compile the backward graph of `compiled_loss` (a torch.compile'd model) for (rows, seq_len)
    token batches, and nothing else; True when it was compiled.

    Dynamo and AOTAutograd trace the model as the training process does; inductor's compile of the
    forward is replaced by a stand-in that raises when run, and the backward is compiled at once
    (not at its first call), so nothing runs on the GPU and no activations are allocated. The
    backward lands in inductor's cache, keyed by its graph, where the training process finds it.
    AOTAutograd's own cache stays off here: its entry would hold the stand-in forward.
    """
    import functools

    import torch
    from torch._inductor import compile_fx as cfx

    real_compile_fx, real_inner = cfx.compile_fx, cfx.compile_fx_inner

    def inner(gm, example_inputs, **kwargs):
        if kwargs.get("is_backward"):
            return real_inner(gm, example_inputs, **kwargs)

        def skipped(args):
            raise _ForwardSkipped()
        skipped._boxed_call = True
        return skipped

    cfx.compile_fx = functools.partial(real_compile_fx, inner_compile=inner)
    try:
        with torch._functorch.config.patch(force_non_lazy_backward_lowering=True, enable_autograd_cache=False):
            # Two tensors, as in training: one passed twice would be one graph input, another graph.
            inputs, targets = (torch.zeros((rows, seq_len), dtype=torch.long, device=device) for _ in range(2))
            compiled_loss(inputs, targets)
    except _ForwardSkipped:
        return True
    finally:
        cfx.compile_fx = real_compile_fx
    return False


def standby(stdin=None) -> int:
    """A standby helper: import and set up now, then run the job given on `stdin` (none: exit)."""
    import torch
    import torch._inductor.compile_fx  # noqa: F401  (6-7 s on an H100 machine, about 2 s with cached bytecode)

    import importlib

    importlib.import_module(f"{__package__}.cuda_backend")   # what run_job imports, now

    if torch.cuda.is_available():
        torch.zeros(1, device="cuda")  # the CUDA context (under a second on an H100 machine)
    line = (stdin or sys.stdin).readline()
    if not line.strip():
        return 0                       # released: no job for this helper
    order = json.loads(line)
    os.environ.update(order["env"])
    return run(order["job"], order["spec"])


def run(job: str, spec_path: str) -> int:
    import torch._inductor.config as inductor_config

    # Fewer compile workers than the training process: each worker imports torch, and five
    # processes' pools of one per core kept the CPUs too busy for the training process's compile.
    inductor_config.compile_threads = min(inductor_config.compile_threads, HELPER_COMPILE_THREADS)
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    print(json.dumps(run_job(job, spec)), flush=True)   # the last line: Helper.report
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ["--standby"]:
        return standby()
    if len(argv) != 2:
        print("usage: python -m mlx_ar.backends.compile_ahead JOB SPEC  (or --standby)", file=sys.stderr)
        return 2
    return run(*argv)


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The caches are written; skip the interpreter's teardown (inductor's worker pool, CUDA), which
    # took 10-12 s on an H100 while the training process waited for this helper to exit.
    os._exit(code)
