"""The training budget clock: only training-step time counts against TIME_BUDGET.

Start-up, data loading before the first step and evaluation are never inside a step, so they
are not counted. The first `warmup_steps` steps are timed too, but excluded from the budget,
because they include graph compilation (`mx.compile`, `torch.compile`) whose cost depends on
the machine and the cache, not on the recipe.

    clock = BudgetClock(budget_s=300)
    while not clock.done:
        clock.step_started()
        loss = step(...); sync()            # the step must be finished on the device here
        dt = clock.step_finished()
        lrm = schedule.lr_multiplier(clock.progress)

The caller must synchronize with the device before `step_finished()`: lazy frameworks would
otherwise time only the graph construction.
"""
import time


class BudgetClock:
    """Counts seconds spent in training steps, excluding the first `warmup_steps` steps."""

    def __init__(self, budget_s: float, warmup_steps: int = 1, now=time.perf_counter):
        if not budget_s > 0:
            raise ValueError(f"budget_s must be a positive number of seconds, got {budget_s!r}")
        if int(warmup_steps) != warmup_steps or warmup_steps < 0:
            raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
        self.budget_s = float(budget_s)
        self.warmup_steps = int(warmup_steps)
        self._now = now
        self._started_at = None
        self.steps = 0                  # every finished step, warmup included
        self.counted_steps = 0          # finished steps whose time counts against the budget
        self.training_seconds = 0.0     # time of the counted steps
        self.excluded_seconds = 0.0     # time of the warmup (compile) steps

    def step_started(self) -> None:
        if self._started_at is not None:
            raise RuntimeError("BudgetClock.step_started() called twice without step_finished()")
        self._started_at = self._now()

    def step_finished(self) -> float:
        """End the current step; return its duration in seconds (warmup steps included)."""
        if self._started_at is None:
            raise RuntimeError("BudgetClock.step_finished() called without step_started()")
        seconds = self._now() - self._started_at
        self._started_at = None
        self.steps += 1
        if self.steps <= self.warmup_steps:
            self.excluded_seconds += seconds
        else:
            self.counted_steps += 1
            self.training_seconds += seconds
        return seconds

    @property
    def progress(self) -> float:
        """Fraction of the budget used, in [0, 1]; drives every schedule."""
        return min(1.0, max(0.0, self.training_seconds / self.budget_s))

    @property
    def done(self) -> bool:
        return self.training_seconds >= self.budget_s

    @property
    def remaining_seconds(self) -> float:
        return max(0.0, self.budget_s - self.training_seconds)

    @property
    def in_warmup(self) -> bool:
        """True while the next step to finish is still an excluded (compile) step."""
        return self.steps < self.warmup_steps

