"""`python train.py`: one experiment, start to summary, on any backend.

train.py calls `main(__file__)` right after its recipe block, before it imports MLX, so the
cuda backend runs on machines without MLX. This module reads the recipe from train.py's source, opens the prepared dataset, builds the chosen backend, trains for the profile's time
budget through `train_loop`, checks that its predictions do not look ahead (the leak probe),
scores them with the fixed `evaluate_bpb` on the validation and the held-out split, prints the
summary block and writes the run record. Every failure (bad data, a NaN loss, an exception,
Ctrl-C) still prints `FAIL: <reason>` and writes a record with status "fail".
"""
import argparse
import collections
import math
import sys
import time
import traceback
from pathlib import Path

from ..backends import BACKENDS
from ..recipe import RecipeError, batch_geometry, read_recipe

# The record the ledger reads when --record is not given.
DEFAULT_RECORD = "run.json"
# Seconds between progress lines when stdout is not a terminal (a log file).
LOG_EVERY_S = 5.0
RATE_WINDOW_S = 2.0                # the progress line's step time is a mean over this much training


def parse_args(argv, recipe, prog: str = "train.py"):
    p = argparse.ArgumentParser(prog=prog, description="Train for the fixed time budget, then print val_bpb.")
    p.add_argument("--backend", choices=BACKENDS, default="mlx", help="device backend (default: mlx)")
    p.add_argument("--data", default=None, help="prepared dataset name (default: the one prepared last)")
    p.add_argument("--seed", type=int, default=None, help=f"seed for weights and data order (default: the recipe's SEED, {recipe.get('SEED')})")
    p.add_argument("--record", default=DEFAULT_RECORD, help=f"where to write the JSON run record (default: {DEFAULT_RECORD})")
    p.add_argument("--smoke", type=float, default=None, metavar="SECONDS",
                   help="shorten the budget for tests and smoke runs; the run is marked as not comparable")
    return p.parse_args(argv)


def micro_batches(batches, n_micro, rows):
    """Reshape the loader's (n_micro * rows, T) batches into (n_micro, rows, T)."""
    for inputs, targets, epoch in batches:
        T = inputs.shape[1]
        yield inputs.reshape(n_micro, rows, T), targets.reshape(n_micro, rows, T), epoch


class _Progress:
    """Prints the live progress line: in place on a terminal, every few seconds in a log.

    Step time, tok/s and MFU are averaged over the last RATE_WINDOW_S of counted steps, so the
    line reads steadily where single step times jitter (host work, a queued step's start).
    """

    def __init__(self, backend, tokens_per_step, peak, stream=sys.stdout):
        from .hardware import mfu_percent
        from .progress import ProgressLine

        self.line, self.mfu_percent = ProgressLine(), mfu_percent
        self.backend, self.tokens_per_step, self.peak = backend, tokens_per_step, peak
        self.stream, self.tty = stream, stream.isatty()
        self.last_print = 0.0
        self.recent, self.recent_sum = collections.deque(), 0.0

    def step_seconds(self, info) -> float:
        """Mean seconds per step over the recent counted steps (this step's own time in warmup)."""
        if not info.counted:
            return info.seconds
        self.recent.append(info.seconds)
        self.recent_sum += info.seconds
        while len(self.recent) > 1 and self.recent_sum - self.recent[0] >= RATE_WINDOW_S:
            self.recent_sum -= self.recent.popleft()
        return self.recent_sum / len(self.recent)

    def __call__(self, info):
        self.line.update(info.loss)
        seconds = self.step_seconds(info)
        now = time.monotonic()
        last = info.remaining_seconds <= 0
        if not self.tty and info.counted and not last and now - self.last_print < LOG_EVERY_S:
            return
        self.last_print = now
        tok_s = self.tokens_per_step / seconds if seconds > 0 else 0.0
        mfu = self.mfu_percent(self.backend.flops_per_token, tok_s, self.peak)
        text = self.line.format(info.step, info.progress, info.loss, info.hyper["lr_mult"], seconds,
                                tok_s, mfu, info.remaining_seconds, info.epoch)
        self.stream.write(("\r" + text) if self.tty else (text + "\n"))
        self.stream.flush()

    def finish(self):
        if self.tty:
            self.stream.write("\n")


def main(train_file, argv=None):
    """Entry point of train.py. Exits with 0 on success, 1 on a failed run, 130 on Ctrl-C."""
    sys.exit(run(train_file, argv))


def run(train_file, argv=None, prog: str = "train.py") -> int:
    from .summary import utc_timestamp

    t0 = time.perf_counter()
    started_at = utc_timestamp()
    train_file = Path(train_file).resolve()
    recipe = read_recipe(train_file)
    args = parse_args(sys.argv[1:] if argv is None else argv, recipe, prog)
    seed = args.seed if args.seed is not None else int(recipe.get("SEED", 0))
    fields = {"status": "fail", "reason": None, "backend": args.backend, "device": None, "profile": None,
              "smoke": args.smoke is not None, "time_budget": None, "seed": seed, "dataset": args.data,
              "recipe": recipe, "contract": None, "contract_parts": None, "metrics": {},
              "executed_files": {}, "versions": {}, "started_at": started_at}
    try:
        values = _train_and_evaluate(train_file, recipe, args, seed, fields, t0)
        fields["status"] = "ok"
        code = 0
    except KeyboardInterrupt:
        fields["reason"] = "interrupted"
        code = 130
    except Exception as e:  # every failure still leaves a record behind
        from ..data import DataError
        from ..evaluate import LeakDetected
        from .summary import FastFail

        # Our own errors explain themselves; anything else gets its traceback for debugging.
        own = (FastFail, DataError, LeakDetected)
        if not isinstance(e, (*own, RecipeError, ValueError)):
            traceback.print_exc()
        fields["reason"] = str(e) if isinstance(e, own) else f"{type(e).__name__}: {e}"
        code = 1
    from .summary import build_record, fail_line, format_summary, utc_timestamp, write_record

    if code:
        print("\n" + fail_line(fields["reason"]), flush=True)
    fields["finished_at"] = utc_timestamp()
    fields["metrics"].setdefault("total_seconds", round(time.perf_counter() - t0, 1))

    write_record(args.record, build_record(**fields))
    if code == 0:
        print(format_summary(values), flush=True)
    return code


def _train_and_evaluate(train_file, recipe, args, seed, fields, t0):
    from ..backends import get_backend
    from ..data import open_dataset
    from ..evaluate import check_causal, contract_fingerprint, evaluate_bpb
    from .clock import BudgetClock
    from .hardware import mfu_percent
    from .loop import train_loop
    from .memory import GcControl, fit_micro_batch
    from .schedules import Schedule
    from .summary import FastFail, budget_label, file_hashes, kernel_line, overrides_text

    ds = open_dataset(args.data)
    profile = ds.profile
    budget = float(args.smoke) if args.smoke is not None else float(profile.time_budget)
    if budget <= 0:
        raise ValueError(f"--smoke must be a positive number of seconds, got {args.smoke}")
    # A reduced profile (demo) shrinks the recipe too; the run says so and records the result.
    overrides = dict(profile.recipe_overrides)
    if overrides:
        recipe = {**recipe, **overrides}
        fields["recipe"] = recipe
        print(f"{profile.name} profile: recipe overrides {overrides}", flush=True)
        fields["recipe_overrides"] = overrides
    schedule = Schedule.from_recipe(recipe)
    contract, contract_parts = contract_fingerprint(ds)
    fields.update(dataset=ds.name, profile=profile.name, time_budget=budget, contract=contract,
                  contract_parts=contract_parts)

    backend = get_backend(args.backend, train_file, overrides)
    fields["device"] = backend.device_name()
    fields["versions"] = backend.versions()
    backend.configure_memory()
    seq_len = profile.max_seq_len
    backend.build(recipe, ds.vocab_size, seq_len, seed)
    plan = fit_micro_batch(backend, recipe, seq_len)   # DoesNotFit ends the run here, before any step
    rows, n_micro, device_rows = batch_geometry({**recipe, "DEVICE_BATCH_SIZE": plan.device_rows}, seq_len)
    tokens_per_step = rows * seq_len
    fields["metrics"]["device_batch"] = device_rows
    print(f"memory: {plan.describe()}", flush=True)
    fields["versions"] = backend.versions()      # again: build adds the kernels it chose
    kernels = kernel_line(fields["versions"])
    if kernels:
        print(kernels, flush=True)
    fields["executed_files"] = file_hashes(backend.executed_files(), root=train_file.parent)
    peak = backend.peak_flops()
    budget_text = budget_label(budget, args.smoke is not None)
    print(f"backend {backend.name} on {fields['device']} | dataset {ds.name} ({profile.name}) | "
          f"budget {budget_text}", flush=True)
    print(f"params {backend.num_params / 1e6:.2f}M | {backend.flops_per_token / 1e6:.1f} MFLOP/token | "
          f"{tokens_per_step:,} tokens/step = {n_micro} x {device_rows} rows x {seq_len} | seed {seed}", flush=True)

    batches = micro_batches(ds.train_batches(rows, seq_len, seed=seed), n_micro, device_rows)
    clock = BudgetClock(budget, warmup_steps=backend.warmup_steps)
    progress = _Progress(backend, tokens_per_step, peak)
    gc_control = GcControl()
    startup = time.perf_counter() - t0
    try:
        result = train_loop(backend, batches, clock, schedule, tokens_per_step, on_step=progress,
                            gc_control=gc_control)
    finally:
        progress.finish()
        gc_control.restore()
    tok_per_sec = result.counted_tokens / result.training_seconds if result.training_seconds > 0 else 0.0
    metrics = fields["metrics"]
    metrics.update(training_seconds=round(result.training_seconds, 1), num_steps=result.steps,
                   total_tokens_M=round(result.tokens / 1e6, 1), num_params_M=round(backend.num_params / 1e6, 1),
                   depth=recipe.get("DEPTH"), tok_per_sec=round(tok_per_sec),
                   mfu_percent=_round(mfu_percent(backend.flops_per_token, tok_per_sec, peak), 2),
                   startup_seconds=round(startup + result.warmup_seconds, 1))

    print(f"evaluating {profile.eval_tokens:,} validation tokens ...", flush=True)
    t = time.perf_counter()
    check_causal(backend.eval_logits, ds)          # LeakDetected ("leak: ...") ends the run unscored
    t_probe = time.perf_counter()
    val_bpb = evaluate_bpb(backend.eval_nats, ds)
    print(f"leak probe passed in {t_probe - t:.1f} s; validation scored in {time.perf_counter() - t_probe:.1f} s",
          flush=True)
    if not math.isfinite(val_bpb):
        raise FastFail(f"non-finite val_bpb ({val_bpb})")
    metrics["heldout_bpb"] = _heldout_bpb(backend, ds, evaluate_bpb)
    backend.sync()
    metrics.update(val_bpb=round(val_bpb, 6), peak_vram_mb=round(backend.peak_memory_mb(), 1),
                   total_seconds=round(time.perf_counter() - t0, 1))
    return {**metrics, "backend": backend.name, "device": fields["device"], "profile": profile.name,
            "budget": budget_text, "seed": seed, "contract": contract, "record": str(args.record),
            **({"overrides": overrides_text(overrides)} if overrides else {})}


def _heldout_bpb(backend, ds, evaluate_bpb):
    """The held-out split's bpb (rounded), or None, said once, for a dataset prepared without one."""
    if ds.heldout_missing:
        print(f"no held-out score: {ds.heldout_missing}", flush=True)
        return None
    t = time.perf_counter()
    bpb = evaluate_bpb(backend.eval_nats, ds, split="heldout")
    print(f"held-out bpb {bpb:.6f} in {time.perf_counter() - t:.1f} s (reported, never used to keep a change)", flush=True)
    return round(bpb, 6) if math.isfinite(bpb) else None


def _round(x, n):
    return None if x is None else round(x, n)
