"""Memory housekeeping for training on unified memory: Python's gc, and Metal's limits.

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

On a Mac, `metal_memory_limits` sizes MLX's wired limit (memory kept resident, so the GPU
never waits for pages) and its buffer cache from the machine's memory, and
`apply_metal_limits(mx, limits)` sets them; off Metal it does nothing.
"""
import gc

GIB = 1 << 30
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


# --- Metal limits ----------------------------------------------------------------------------
# macOS, the window server and a browser need about 3 GB to stay responsive; on large machines
# leave them a quarter, since people keep more open there.
OS_RESERVE_MIN = 3 * GIB
OS_RESERVE_FRACTION = 0.25
# Up to 16 GB the live training arrays fill most of the budget, so freed buffers kept for
# reuse must stay small or they push the machine into swap; above that, a larger cache avoids
# re-allocating the same activation buffers every step.
SMALL_MACHINE = 16 * GIB
CACHE_FRACTION_SMALL = 0.25
CACHE_FRACTION_LARGE = 0.5
CACHE_MIN = 256 * (1 << 20)


def metal_memory_limits(total_bytes: int, recommended_working_set: int | None) -> dict:
    """Wired and cache limits in bytes for a machine with `total_bytes` of unified memory.

    `recommended_working_set` is Metal's max_recommended_working_set_size (mx.device_info());
    a wired limit above it is an error in MLX, so the budget never exceeds it.
    Returns {"wired_limit", "cache_limit", "os_reserve"}.
    """
    if not total_bytes or total_bytes <= 0:
        raise ValueError(f"total_bytes must be the machine's memory in bytes, got {total_bytes!r}")
    os_reserve = max(OS_RESERVE_MIN, int(total_bytes * OS_RESERVE_FRACTION))
    budget = max(0, int(total_bytes) - os_reserve)
    if recommended_working_set:
        budget = min(budget, int(recommended_working_set))
    frac = CACHE_FRACTION_SMALL if total_bytes <= SMALL_MACHINE else CACHE_FRACTION_LARGE
    cache = min(budget, max(CACHE_MIN, int(budget * frac)))
    return {"wired_limit": budget, "cache_limit": cache, "os_reserve": os_reserve}


def recommended_working_set(mx) -> int | None:
    """Metal's recommended working-set size in bytes, or None off Metal."""
    if not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    value = info.get("max_recommended_working_set_size")
    return int(value) if value else None


def apply_metal_limits(mx, limits: dict) -> bool:
    """Set MLX's wired and cache limits when running on Metal; return whether anything was set."""
    if not mx.metal.is_available():
        return False
    # Newer MLX has these at top level; older releases only under mx.metal.
    set_wired = getattr(mx, "set_wired_limit", None) or mx.metal.set_wired_limit
    set_cache = getattr(mx, "set_cache_limit", None) or mx.metal.set_cache_limit
    set_wired(int(limits["wired_limit"]))
    set_cache(int(limits["cache_limit"]))
    return True
