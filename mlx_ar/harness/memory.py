"""Memory housekeeping for training: Python's gc, and fitting a step's micro-batch to the memory budget.

Python's cyclic gc walks every tracked object; during training that is pure overhead with
pauses of tens of ms at random steps, which shows up as timing noise in a 5-minute budget.
After the first step has built everything that lives for the whole run, `GcControl` collects
once, freezes the survivors (moves them out of gc's view) and turns automatic gc off, then
collects explicitly every `collect_every` steps so that a slow leak still gets cleaned.

    gcc = GcControl()
    for step in count(1):
        ...train one step...
        gcc.after_step(step)       # step counts finished steps: 1 after the first
    gcc.restore()

`plan_device_batch` picks the micro-batch from the backend's measured memory (bytes held between
steps, bytes per row at a step's peak) and its budget: the largest that fits for
DEVICE_BATCH_SIZE = "auto", a check for an explicit one. A step that cannot fit raises
DoesNotFit before training starts, instead of swapping for the whole budget.
"""
import gc
from dataclasses import dataclass

# Explicit collections after the freeze: rare enough to cost nothing, often enough for slow leaks.
COLLECT_EVERY = 500


class GcControl:
    def __init__(self, collect_every: int = COLLECT_EVERY, gc_module=gc):
        if int(collect_every) != collect_every or collect_every < 0:
            raise ValueError(f"collect_every must be a non-negative integer (0 = never), got {collect_every!r}")
        self.collect_every = int(collect_every)
        self._gc = gc_module
        self.frozen = False
        self._was_enabled = None
        self.collections = 0  # explicit collections made (freeze included), for tests and logs

    def after_step(self, step: int) -> None:
        """Call after every finished step; `step` is the number of steps finished so far."""
        if not self.frozen:
            if step >= 1:
                self._was_enabled = self._gc.isenabled()
                self._collect()
                self._gc.freeze()
                self._gc.disable()
                self.frozen = True
            return
        if self.collect_every and step % self.collect_every == 0:
            self._collect()

    def restore(self) -> None:
        """Undo the freeze and re-enable gc (if it was on before). Safe to call twice."""
        if not self.frozen:
            return
        self._gc.unfreeze()
        if self._was_enabled:
            self._gc.enable()
        self.frozen = False

    def _collect(self) -> None:
        self._gc.collect()
        self.collections += 1


# --- the micro-batch that fits ---------------------------------------------------------------
MIB = 1 << 20
# Share of the budget a step's measured peak may take: the rest is for what the measurement does
# not see (the data loader's batches, evaluation's buffers, the allocator's rounding).
STEP_SHARE = 0.9
# "auto" where the backend cannot measure (torch on a CPU): the rows per micro-batch of the
# recipe before "auto", which fit 80 GB GPUs.
UNMEASURED_ROWS = 16


class DoesNotFit(ValueError):
    """The training step needs more memory than this machine's budget."""


@dataclass(frozen=True)
class MemoryPlan:
    device_rows: int               # rows per micro-batch
    auto: bool                     # chosen by "auto" rather than set in train.py
    fixed_bytes: int | None        # held between steps (weights, optimizer state, gradient buffer)
    row_bytes: int | None          # added per row at a step's peak
    budget_bytes: int | None       # what the step may use on this machine

    @property
    def peak_bytes(self) -> int | None:
        """The step's expected peak (an upper bound: per-row costs are measured at one row)."""
        if self.fixed_bytes is None or self.row_bytes is None:
            return None
        return self.fixed_bytes + self.device_rows * self.row_bytes

    def describe(self) -> str:
        text = f"{self.device_rows} rows per micro-batch" + (" (auto)" if self.auto else "")
        if self.peak_bytes is not None:
            text += f", step peak about {self.peak_bytes / MIB:,.0f} MB ({self.row_bytes / MIB:,.0f} MB per row)"
        if self.budget_bytes:
            text += f" of a {self.budget_bytes / 2**30:.1f} GB budget"
        return text


def plan_device_batch(rows: int, requested, fixed_bytes: int | None, row_bytes: int | None,
                      budget_bytes: int | None) -> MemoryPlan:
    """The micro-batch for a step of `rows` rows: for requested == "auto" the largest divisor of
    `rows` whose expected peak fits STEP_SHARE of the budget; an explicit number is kept, and
    checked. Raises DoesNotFit when the step cannot fit; without a budget or a measurement, nothing
    is checked and "auto" takes UNMEASURED_ROWS (or the largest divisor below it)."""
    auto = requested == "auto"
    measured = budget_bytes is not None and fixed_bytes is not None and row_bytes is not None
    divisors = [d for d in range(1, rows + 1) if rows % d == 0]
    if not measured:
        device_rows = max(d for d in divisors if d <= UNMEASURED_ROWS) if auto else int(requested)
        return MemoryPlan(device_rows, auto, fixed_bytes, row_bytes, budget_bytes)
    limit = STEP_SHARE * budget_bytes
    fits = [d for d in divisors if fixed_bytes + d * row_bytes <= limit]
    if auto and fits:
        return MemoryPlan(max(fits), True, fixed_bytes, row_bytes, budget_bytes)
    plan = MemoryPlan(1 if auto else int(requested), auto, fixed_bytes, row_bytes, budget_bytes)
    if not auto and plan.peak_bytes <= limit:
        return plan
    need = f"about {plan.peak_bytes / 2**30:.2f} GB ({fixed_bytes / MIB:,.0f} MB held + {plan.device_rows} x " \
           f"{row_bytes / MIB:,.0f} MB per {'row' if plan.device_rows == 1 else 'rows'})"
    room = f"{STEP_SHARE:.0%} of this machine's {budget_bytes / 2**30:.1f} GB budget"
    if fits:
        raise DoesNotFit(f"DEVICE_BATCH_SIZE = {plan.device_rows} needs {need}, over {room}: set DEVICE_BATCH_SIZE "
                         f"to {max(fits)} or less (or \"auto\"); TOTAL_BATCH_SIZE stays the same")
    raise DoesNotFit(f"the training step needs {need} even at one row per micro-batch, over {room}: "
                     f"shrink the model (DEPTH, ASPECT_RATIO, MLP_RATIO) or the vocabulary")


def fit_micro_batch(backend, recipe: dict, seq_len: int) -> MemoryPlan:
    """The MemoryPlan of a built backend for `recipe` (measures one row's step memory when the
    backend knows its budget). Raises DoesNotFit, or ValueError for a bad batch geometry."""
    from ..recipe import batch_geometry

    requested = recipe.get("DEVICE_BATCH_SIZE")
    if requested != "auto":
        batch_geometry(recipe, seq_len)                      # an explicit number must divide the step
    rows = batch_geometry({**recipe, "DEVICE_BATCH_SIZE": 1}, seq_len)[0]
    budget = backend.memory_budget()
    measured = backend.step_memory(seq_len) if budget is not None else None
    fixed, per_row = measured if measured is not None else (None, None)
    return plan_device_batch(rows, requested, fixed, per_row, budget)


# Mac sizes of the docs' table (GB of unified memory).
MACHINE_SIZES_GB = (8, 16, 24, 36, 64, 128)


def mac_plans(rows: int, requested, fixed_bytes: int, row_bytes: int, sizes_gb=MACHINE_SIZES_GB) -> list:
    """[(GB, budget bytes, MemoryPlan or None, error or None)]: what plan_device_batch decides on a Mac
    of each size, with the Metal working set such a Mac reports (`mlx-ar bench memory` prints it)."""
    from ..backends.mlx.memory import GIB, training_budget, typical_recommended_working_set

    out = []
    for gb in sizes_gb:
        total = int(gb * GIB)
        budget = training_budget(total, typical_recommended_working_set(total))
        try:
            out.append((gb, budget, plan_device_batch(rows, requested, fixed_bytes, row_bytes, budget), None))
        except DoesNotFit as e:
            out.append((gb, budget, None, str(e)))
    return out
