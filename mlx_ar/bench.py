"""`mlx-ar bench`: throughput figures for the current recipe and for the data loader.

    mlx-ar bench train                       # tok/s, ms/step, optimizer share, peak memory
    mlx-ar bench train --set DEPTH=4 --set OPTIMIZER=adamw --steps 30
    mlx-ar bench memory                      # the micro-batch "auto" picks on 8-128 GB Macs
    mlx-ar bench loader                      # packed tokens/s from the prepared dataset

`bench train` feeds random tokens at the contract's vocabulary and sequence length, so it
needs no prepared data and measures the model and optimizer alone; `--data NAME` feeds the
packed batches of a prepared dataset instead (real token statistics, loader included).
"""
import json
import sys
import threading
import time
from contextlib import contextmanager

import click

from . import constants
from .backends import BACKENDS


@contextmanager
def _user_errors():
    """Bad input (an unknown --set name, a missing dataset, a bad batch geometry) as a one-line error."""
    from .data import DataError

    try:
        yield
    except (DataError, ValueError) as e:   # RecipeError is a ValueError; our ValueErrors explain themselves
        raise click.ClickException(str(e)) from None


@click.group()
def bench_command():
    """Print throughput figures (benchmarks, not tests)."""


@bench_command.command("train")
@click.option("--backend", type=click.Choice(BACKENDS), default="mlx", show_default=True)
@click.option("--train-file", type=click.Path(dir_okay=False), default="train.py", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE", help="override a recipe constant (repeatable)")
@click.option("--profile", type=click.Choice(sorted(constants.PROFILES)), default="real", show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="timed steps after warmup")
@click.option("--warmup", type=int, default=3, show_default=True, help="untimed steps (compilation)")
@click.option("--data", default=None, help="feed this prepared dataset's batches instead of random tokens")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object instead of text")
def bench_train(backend, train_file, overrides, profile, steps, warmup, data, as_json):
    """Time training steps of the current recipe (random tokens unless --data)."""
    from .recipe import parse_overrides

    with _user_errors():
        dataset = None
        if data is not None:
            from .data import open_dataset

            dataset = open_dataset(data)
        with _ctrl_c_stops_at_once():
            figures = run_train_bench(backend, train_file, parse_overrides(overrides),
                                      dataset.profile if dataset else constants.PROFILES[profile],
                                      steps, warmup, echo=None if as_json else click.echo, dataset=dataset,
                                      progress=StepProgress(_live_writer(sys.stderr)))
    if as_json:
        click.echo(json.dumps(figures))


@contextmanager
def _ctrl_c_stops_at_once():
    """Ctrl-C ends the process at once: a bench keeps nothing worth saving, and one step of a large
    recipe on a CPU runs for minutes inside MLX or torch, where Python's handler would wait for it."""
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


def _live_writer(stream):
    """write(line, done) for a progress line: redrawn in place on a terminal, one line per update elsewhere."""
    tty = stream.isatty()

    def write(line, done=False):
        if tty:
            stream.write("\r\033[K" + line + ("\n" if done else ""))
        else:
            stream.write(line + "\n")
        stream.flush()
    write.interval_s = 0.25 if tty else 5.0
    # While one step runs (a first compile, or a CPU step of minutes) the line still moves.
    write.tick_s = 1.0 if tty else 30.0
    return write


class StepProgress:
    """The live line of a bench: which step, ms/step so far, and the time left (ETA).

    Called with each StepInfo of the harness loop; `start(warmup, steps)` first, `stop()` last.
    Compiling steps have no ETA yet, so they show the elapsed time; a line is written at most
    every `write.interval_s` seconds, and once more when the last step is done. With
    `write.tick_s`, a thread calls `tick()` that often, so a step that runs for minutes still
    moves the line: elapsed time counts up, the ETA counts down (MLX and torch release the GIL
    while they compute).
    """

    def __init__(self, write, clock=time.monotonic):
        self.write, self.clock = write, clock
        self.interval = getattr(write, "interval_s", 1.0)
        self.tick_s = getattr(write, "tick_s", None)
        self._lock, self._stopped = threading.Lock(), threading.Event()

    def start(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps, self.t0, self.last, self.times = warmup, steps, self.clock(), None, []
        self.write(f"compiling: warmup step 1 of {warmup} (the first steps are slow) ...")
        self._show(lambda now: f"compiling: warmup step 1 of {warmup} | {now - self.t0:.0f} s elapsed", draw=False)
        if self.tick_s:
            threading.Thread(target=self._ticker, daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()

    def _ticker(self):
        while not self._stopped.wait(self.tick_s):
            self.tick()

    def tick(self) -> None:
        """Redraw the current line as of now (nothing once the bench is done)."""
        with self._lock:
            now = self.clock()
            if not self._stopped.is_set() and now - self._shown >= (self.tick_s or 0):
                self._shown = now
                self.write(self._render(now))

    def _show(self, render, done: bool = False, draw: bool = True) -> None:
        with self._lock:
            self._render, self._shown = render, self.clock()
            if draw:
                self.write(render(self._shown), done)

    def __call__(self, info) -> None:
        if info.counted:
            self.times.append(info.seconds)
        now = self.clock()
        done = len(self.times) >= self.steps
        if not done and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        if not self.times:
            step = info.step
            self._show(lambda t: f"warmup step {step} of {self.warmup} | {t - self.t0:.0f} s elapsed (compiling)")
            return
        per = sorted(self.times)[len(self.times) // 2]
        head = f"step {len(self.times)} of {self.steps} | {per * 1e3:.1f} ms/step | "
        if done:
            self.stop()
            self._show(lambda t: head + "done", done=True)
        else:
            left = (self.steps - len(self.times)) * per
            self._show(lambda t: head + f"ETA {max(0.0, left - (t - now)):.0f} s")


def _profile_overrides(profile, overrides) -> dict:
    """A reduced profile shrinks the recipe as it does for training; explicit --set wins."""
    return {**dict(profile.recipe_overrides), **(overrides or {})}


def _built_backend(backend_name, train_file, overrides: dict, profile, seed: int):
    """(backend built for train_file's recipe with `overrides` at `profile`'s contract, that recipe)."""
    from pathlib import Path

    from .backends import get_backend
    from .recipe import apply_recipe, parse_recipe

    source = Path(train_file).read_text()
    recipe = parse_recipe(apply_recipe(source, overrides) if overrides else source)
    backend = get_backend(backend_name, train_file, overrides)
    backend.configure_memory()
    backend.build(recipe, profile.vocab_size, profile.max_seq_len, seed)
    return backend, recipe


def run_train_bench(backend_name, train_file, overrides, profile, steps, warmup, echo=print, seed=0, dataset=None,
                    progress=None):
    """Time `steps` training steps after `warmup` untimed ones, through the harness's own loop and
    clock (steps queued as in training, schedules applied), then the optimizer alone."""
    import itertools

    import numpy as np

    from .harness.clock import BudgetClock
    from .harness.hardware import mfu_percent
    from .harness.loop import train_loop
    from .harness.main import micro_batches
    from .harness.memory import MIB, fit_micro_batch
    from .harness.schedules import Schedule
    from .harness.summary import kernel_line
    from .recipe import batch_geometry

    overrides = _profile_overrides(profile, overrides)
    backend, recipe = _built_backend(backend_name, train_file, overrides, profile, seed)
    T, V = profile.max_seq_len, profile.vocab_size
    plan = fit_micro_batch(backend, recipe, T)       # "auto" resolved, an explicit batch checked
    rows, n_micro, device_rows = batch_geometry({**recipe, "DEVICE_BATCH_SIZE": plan.device_rows}, T)
    backend.configure_memory()                       # the peak counter starts again at the steps
    if dataset is not None:
        batches = micro_batches(dataset.train_batches(rows, T, seed=seed), n_micro, device_rows)
    else:
        rng = np.random.default_rng(seed)
        random = [rng.integers(0, V, (2, n_micro, device_rows, T), dtype=np.uint16) for _ in range(2)]
        batches = ((*random[i % 2], 0) for i in itertools.count())
    if echo:
        echo(f"bench: {backend.name} on {backend.device_name()} | {backend.num_params / 1e6:.2f}M params | "
             f"{rows * T:,} tokens/step ({n_micro} x {device_rows} x {T}) | vocab {V}")
    times = []
    clock = BudgetClock(1e9, warmup_steps=max(warmup, backend.warmup_steps))
    if progress is not None:
        progress.start(clock.warmup_steps, steps)

    def on_step(info):
        if info.counted:
            times.append(info.seconds)
        if progress is not None:
            progress(info)
    try:
        result = train_loop(backend, batches, clock, Schedule.from_recipe(recipe), rows * T, on_step=on_step,
                            max_steps=clock.warmup_steps + steps)
    finally:
        if progress is not None:
            progress.stop()
    compile_s = result.warmup_seconds
    step_s = float(np.median(times))
    peak_mb = backend.peak_memory_mb()              # before time_optimizer's stand-in gradients
    opt_s = backend.time_optimizer()
    tok_s = rows * T / step_s
    figures = {
        "backend": backend.name, "device": backend.device_name(), "recipe_overrides": overrides,
        "tokens": f"dataset {dataset.name}" if dataset is not None else "random",
        "num_params_M": round(backend.num_params / 1e6, 2), "tokens_per_step": rows * T,
        "warmup_seconds": round(compile_s, 2), "ms_per_step": round(step_s * 1e3, 2),
        "ms_per_step_mean": round(float(np.mean(times)) * 1e3, 2), "tok_per_sec": round(tok_s),
        "optimizer_ms": round(opt_s * 1e3, 2), "optimizer_share_percent": round(100 * opt_s / step_s, 1),
        "mfu_percent": mfu_percent(backend.flops_per_token, tok_s, backend.peak_flops()),
        "peak_memory_mb": round(peak_mb, 1), "device_batch": device_rows, "device_batch_auto": plan.auto,
        # Held between steps and added per row at a step's peak, measured at one row (None: not measured).
        "step_held_mb": None if plan.fixed_bytes is None else round(plan.fixed_bytes / MIB, 1),
        "step_row_mb": None if plan.row_bytes is None else round(plan.row_bytes / MIB, 1),
        "memory_budget_gb": None if plan.budget_bytes is None else round(plan.budget_bytes / 2**30, 2),
        "versions": backend.versions(),
    }
    # The figure of the issue: a step's peak over what is held between steps, per row of a micro-batch.
    figures["peak_mb_per_row"] = (None if plan.fixed_bytes is None
                                  else round((peak_mb - plan.fixed_bytes / MIB) / device_rows, 1))
    if echo:
        mfu = "unknown" if figures["mfu_percent"] is None else f"{figures['mfu_percent']:.1f}%"
        echo(f"warmup {figures['warmup_seconds']} s | {figures['ms_per_step']} ms/step (median of {steps}) | "
             f"{figures['tok_per_sec']:,} tok/s | mfu {mfu}")
        echo(f"optimizer {figures['optimizer_ms']} ms = {figures['optimizer_share_percent']}% of a step | "
             f"peak memory {figures['peak_memory_mb']:,} MB")
        echo(f"memory: {plan.describe()}")
        if figures["peak_mb_per_row"] is not None:
            echo(f"step peak {figures['peak_mb_per_row']:,} MB per {T}-token row above "
                 f"{figures['step_held_mb']:,} MB held ({n_micro} micro-batches of {device_rows})")
        kernels = kernel_line(figures["versions"])
        if kernels:
            echo(kernels)
    return figures


@bench_command.command("memory")
@click.option("--train-file", type=click.Path(dir_okay=False), default="train.py", show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="NAME=VALUE", help="override a recipe constant (repeatable)")
@click.option("--profile", type=click.Choice(sorted(constants.PROFILES)), default="real", show_default=True)
def bench_memory(train_file, overrides, profile):
    """The micro-batch DEVICE_BATCH_SIZE picks on Macs of 8-128 GB, from this machine's measured step
    memory through the harness's own plan (Metal's budget as a Mac of that size reports it)."""
    from .harness.memory import MIB, mac_plans
    from .recipe import batch_geometry, parse_overrides

    with _user_errors():
        prof = constants.PROFILES[profile]
        backend, recipe = _built_backend("mlx", train_file, _profile_overrides(prof, parse_overrides(overrides)),
                                         prof, 0)
        fixed, per_row = backend.step_memory(prof.max_seq_len)
        rows = batch_geometry({**recipe, "DEVICE_BATCH_SIZE": 1}, prof.max_seq_len)[0]
        requested = recipe.get("DEVICE_BATCH_SIZE")
    click.echo(f"step memory on {backend.device_name()}: {fixed / MIB:,.0f} MB held + {per_row / MIB:,.0f} MB per "
               f"{prof.max_seq_len}-token row; {rows} rows per step; DEVICE_BATCH_SIZE = {requested!r}")
    click.echo("| Mac | memory budget | rows per micro-batch x micro-batches | expected step peak |\n|---|---|---|---|")
    for gb, budget, plan, error in mac_plans(rows, requested, fixed, per_row):
        what = (f"{plan.device_rows} x {rows // plan.device_rows}", f"{plan.peak_bytes / 2**30:.2f} GB") if plan \
            else ("does not fit", error)
        click.echo(f"| {gb:g} GB | {budget / 2**30:.1f} GB | {what[0]} | {what[1]} |")


@bench_command.command("loader")
@click.option("--data", default=None, help="prepared dataset (default: the one prepared last)")
@click.option("--batch-size", type=int, default=32, show_default=True, help="rows per batch")
@click.option("--seconds", type=float, default=5.0, show_default=True)
def bench_loader_command(data, batch_size, seconds):
    """Packed tokens/s from the pre-tokenized training shards."""
    from .data import open_dataset
    from .data.bench import bench_loader

    with _user_errors():
        ds = open_dataset(data)
        bench_loader(ds, batch_size, ds.profile.max_seq_len, seconds)
