"""Compile-ahead: helper processes compile a model's custom kernels and its optimizer update while
the training process compiles the model.

On a GPU the first step compiles everything, one piece after another, on one CPU core: the
model's graphs (torch.compile), the custom kernels at their first launch (FA4's and quack's
CuTe DSL kernels, the Triton loss) and the optimizer update (torch.compile again). On a fresh
H100 at the karpathy config those were about 22 s, 17 s and 15 s of a 63 s first step. The
pieces do not depend on each other, so helpers build the same model from the same files and
recipe and each compiles one piece, in parallel with the model's compile here:

- `attention`, `mlp+loss`: the model, with only that job's kernels chosen, runs one eager
  forward and backward on a one-row batch, which compiles those kernels;
- `optimizer`: the compiled optimizer update runs once on zero gradients.

What a helper compiles lands in the on-disk caches (FA4's, quack's, Triton's, inductor's); the
training process finds it there when it reaches that piece: it waits for the kernel helpers
(`wait_kernels`) before its first custom kernel launch, and for every helper (`wait`) before its
first optimizer update. The optimizer helper holds a copy of the parameters and optimizer state
(and a CUDA context) until then; if the first step runs out of GPU memory while it does, the
step waits for it and runs again (`retry_out_of_memory`). A helper that fails or runs out of
time costs only time: the training process compiles that piece itself.

A stamp per job (`key`: a hash of what the job's compiled code depends on) is written after a
first step that got through; a later run with the same stamp starts no helper, since its pieces
come from the caches at once.

    jobs = plan(keys, stamp_dir)        # {job: key} for the jobs without a stamp
    start(jobs, spec, env)              # in build(), after the model and optimizer exist
    wait_kernels()                      # before the first kernel launch
    wait()                              # before the first optimizer update
    mark_done(keys, stamp_dir)          # after the first step

`python -m mlx_ar.backends.compile_ahead JOB SPEC` is a helper; SPEC is a pickled dict with the
train.py path, recipe, vocab size, sequence length and seed.
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
KERNEL_JOBS = {"attention": ("attention",), "mlp+loss": ("mlp", "loss")}
SWITCHES = {"attention": "MLX_AR_ATTENTION", "mlp": "MLX_AR_MLP", "loss": "MLX_AR_LOSS"}
JOBS = (*KERNEL_JOBS, "optimizer")
TIMEOUT = 600.0                    # seconds the training process waits for a helper before going on alone
TAIL = 1500                        # characters of a failed helper's log that are shown

_running = []                      # helpers started by start() and not yet waited for
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
    """The helper's environment: the kernel switches of the families it does not compile set to torch,
    and no helpers of its own."""
    out = {**env, ENV: "0"}
    keep = KERNEL_JOBS.get(job, ())
    for family, switch in SWITCHES.items():
        if family not in keep:
            out[switch] = "torch"
    return out


# --- the training process's side -------------------------------------------------------------
class Helper:
    """One helper process running `argv`, its output in a log file.

    `wait(timeout)` returns None when it exited cleanly, else why not (killing it on a timeout).
    """

    def __init__(self, job: str, argv: list, env=None, log_dir=None, popen=subprocess.Popen):
        self.job = job
        self.log = tempfile.NamedTemporaryFile("w+b", prefix=f"mlx_ar_ahead_{job.replace('+', '_')}_",
                                               suffix=".log", dir=log_dir, delete=False)
        self.report = {}           # the helper's last output line (run_job's dict) once it succeeded
        self.proc = popen(argv, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

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

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._drop_log()

    def _drop_log(self):
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)


def start(jobs, spec: dict, env=os.environ, log_dir=None, popen=subprocess.Popen) -> list:
    """Start a helper per job (`python -m mlx_ar.backends.compile_ahead JOB SPEC`); returns them.

    `spec` is pickled to a file the helpers read; they are waited for by `wait`.
    """
    jobs = list(jobs)
    if not jobs:
        return []
    data = pickle.dumps({**spec, "started": time.time()})   # raises before any file exists
    fd, spec_path = tempfile.mkstemp(prefix="mlx_ar_ahead_", suffix=".pkl", dir=log_dir)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    helpers = []
    for job in jobs:
        argv = [sys.executable, "-m", __name__, job, spec_path]
        helpers.append(Helper(job, argv, env=job_env(job, env), log_dir=log_dir, popen=popen))
    _running.extend(helpers)
    _spec_files.append(spec_path)
    return helpers


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
    return helpers


def wait_kernels() -> None:
    """Wait for the kernel helpers (a kernel's first launch must find its compiled code cached)."""
    if _running:
        wait(KERNEL_JOBS)


def running() -> bool:
    """Is a helper started and not yet waited for?"""
    return bool(_running)


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


@atexit.register
def _stop_all():
    """A training process that ends early (an error, Ctrl-C) takes its helpers with it."""
    while _running:
        _running.pop().stop()
    _remove_spec_files()


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

    spec: train_file, recipe, vocab_size, seq_len, seed, and optionally compile_options (tests
    pass a cheaper compiler). Kernel jobs take the kernel switches from the environment (job_env).
    """
    import torch

    from .cuda_backend import CudaBackend

    if job not in JOBS:
        raise ValueError(f"unknown compile-ahead job {job!r}; choose one of {', '.join(JOBS)}")
    t0 = time.perf_counter()
    mode = "model" if job == "optimizer" else "none"
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
    else:
        gen = torch.Generator().manual_seed(0)
        x, y = (torch.randint(0, spec["vocab_size"], (1, spec["seq_len"]), generator=gen).to(backend.device)
                for _ in range(2))
        loss = model(x, y)
        loss.backward()
        done["loss"] = float(loss.detach())
    backend.sync()
    done["seconds"] = round(time.perf_counter() - t0, 2)
    if "started" in spec:          # wall time since the training process started this helper
        done["ready_seconds"] = round(time.time() - spec["started"], 1)
    return done


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m mlx_ar.backends.compile_ahead JOB SPEC", file=sys.stderr)
        return 2
    job, spec_path = argv
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    print(json.dumps(run_job(job, spec)), flush=True)   # the last line: Helper.report
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # The caches are written; skip the interpreter's teardown (inductor's worker pool, CUDA), which
    # took 10-12 s on an H100 while the training process waited for this helper to exit.
    os._exit(code)
