"""The training loop every backend runs through.

It owns the order of events in a step and nothing device-specific: schedules are applied
before the step, the next batch is fetched while the device works, the loss is read once per
step (that read is the step's synchronization point, so the clock times real device work),
and fast-fail, gc control and progress reporting follow.

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
               on_step: Callable[[StepInfo], None] | None = None, gc_control=None) -> LoopResult:
    """Run steps until the clock's budget is spent. Raises summary.FastFail on a bad loss."""
    inputs, targets, epoch = next(batches)
    loss = None
    while not clock.done:
        hyper = schedule.hyper(clock.steps, clock.progress)
        backend.set_hyper(**hyper)
        clock.step_started()
        handle = backend.step(inputs, targets)
        step_epoch = epoch
        inputs, targets, epoch = next(batches)      # overlaps with the device's work
        loss = backend.loss_value(handle)
        seconds = clock.step_finished()
        check_loss(loss, clock.steps)
        if gc_control is not None:
            gc_control.after_step(clock.steps)
        if on_step is not None:
            on_step(StepInfo(clock.steps, loss, seconds, hyper, clock.progress, clock.remaining_seconds,
                             step_epoch, clock.steps > clock.warmup_steps))
    return LoopResult(
        steps=clock.steps, counted_steps=clock.counted_steps, training_seconds=clock.training_seconds,
        warmup_seconds=clock.excluded_seconds, tokens=clock.steps * tokens_per_step,
        counted_tokens=clock.counted_steps * tokens_per_step, last_loss=loss, epoch=epoch,
    )
