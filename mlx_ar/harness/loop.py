"""The training loop every backend runs through.

It owns the order of events in a step and nothing device-specific: schedules are applied
before each step, the next batch is fetched while the device works, the loss is read once per
step, and fast-fail, gc control and progress reporting follow.

After the warmup (compile) steps the loop keeps one step queued behind the running one: step
k+1 is handed to the backend before step k's loss is read, so the device never idles while the
host builds the next step. Reading a loss is the synchronization point; a step's time is the
wall time between consecutive reads, which is the device time of that step once the queue is
full. The next step is queued only while the budget is not expected to run out before it
starts, so the run stops where a one-step-at-a-time loop would (within a step); a step that
was queued is always finished and counted, never dropped. Fast-fail fires when the bad loss is
read, with at most one more step already queued.

    result = train_loop(backend, batches, clock, schedule, tokens_per_step, on_step=print_progress)
"""
from dataclasses import dataclass
from typing import Callable, Iterator

from .summary import check_loss


@dataclass
class StepInfo:
    step: int                      # steps finished, warmup included
    loss: float
    seconds: float                 # this step's wall time
    hyper: dict                    # lr_mult, muon_momentum, weight_decay used for this step
    progress: float                # fraction of the budget used after this step
    remaining_seconds: float
    epoch: int
    counted: bool                  # False for the compile/warmup steps excluded from the budget


@dataclass
class LoopResult:
    steps: int
    counted_steps: int
    training_seconds: float
    warmup_seconds: float
    tokens: int                    # tokens consumed by all steps
    counted_tokens: int            # tokens of the steps inside the budget (tok/s is computed on these)
    last_loss: float | None
    epoch: int


def train_loop(backend, batches: Iterator, clock, schedule, tokens_per_step: int, *,
               on_step: Callable[[StepInfo], None] | None = None, gc_control=None,
               queue_ahead: bool = True, max_steps: int | None = None) -> LoopResult:
    """Run steps until the clock's budget is spent. Raises summary.FastFail on a bad loss.

    queue_ahead=False runs one step at a time (each step's loss read before the next starts).
    max_steps: stop after this many steps, warmup included (`mlx-ar bench` times a fixed count).
    """
    limit = float("inf") if max_steps is None else max_steps
    source = iter(batches)

    def dispatch(step_index, progress):
        inputs, targets, epoch = next(source)
        hyper = schedule.hyper(step_index, progress)
        backend.set_hyper(**hyper)
        return backend.step(inputs, targets), hyper, epoch

    queued = None                   # the step waiting behind the running one: (handle, hyper, epoch)
    loss, epoch, step_seconds = None, 0, 0.0
    while queued is not None or (not clock.done and clock.steps < limit):
        if queued is None:
            clock.step_started()
            running = dispatch(clock.steps, clock.progress)
        else:
            running, queued = queued, None
        # Queue the next step unless this one compiles (its time must stay apart) or the budget
        # is expected to be spent when this one ends.
        expected = clock.training_seconds + step_seconds
        if queue_ahead and not clock.in_warmup and expected < clock.budget_s and clock.steps + 1 < limit:
            queued = dispatch(clock.steps + 1, min(1.0, expected / clock.budget_s))
        handle, hyper, epoch = running
        loss = backend.loss_value(handle)
        seconds = clock.step_finished()
        counted = clock.steps > clock.warmup_steps
        step_seconds = seconds if counted else 0.0
        if queued is not None:
            clock.step_started()    # the queued step runs on the device from here
        check_loss(loss, clock.steps)
        if gc_control is not None:
            gc_control.after_step(clock.steps)
        if on_step is not None:
            on_step(StepInfo(clock.steps, loss, seconds, hyper, clock.progress, clock.remaining_seconds,
                             epoch, counted))
    return LoopResult(
        steps=clock.steps, counted_steps=clock.counted_steps, training_seconds=clock.training_seconds,
        warmup_seconds=clock.excluded_seconds, tokens=clock.steps * tokens_per_step,
        counted_tokens=clock.counted_steps * tokens_per_step, last_loss=loss, epoch=epoch,
    )
