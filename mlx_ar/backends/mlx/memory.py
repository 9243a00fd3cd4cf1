"""Memory on a Mac (and on the CPU build): the machine's size, Metal's limits, and the budget a
training step must fit.

`metal_memory_limits` sizes MLX's wired limit (memory kept resident, so the GPU never waits for
pages) and its buffer cache from the machine's memory, and `apply_metal_limits(mx, limits)`
sets them; off Metal it does nothing. `training_budget` is what a step's peak may reach: the
wired limit on Metal, the same share of system memory elsewhere. The harness fits the
micro-batch to it (harness/memory.py).

    budget = training_budget(total_memory_bytes(), recommended_working_set(mx))
"""
import os
import subprocess
import sys

from .chips import run_text

GIB = 1 << 30


def total_memory_bytes(run=subprocess.run, platform: str = sys.platform, sysconf=os.sysconf) -> int | None:
    """Physical memory of the machine in bytes, or None where it cannot be read."""
    if platform == "darwin":
        text = (run_text(run, ["sysctl", "-n", "hw.memsize"]) or "").strip()
        return int(text) if text.isdigit() else None
    try:
        return int(sysconf("SC_PAGE_SIZE")) * int(sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


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


def typical_recommended_working_set(total_bytes: int) -> int:
    """Metal's recommended working set of a Mac of `total_bytes` when none can be asked (the docs
    table): about 2/3 of memory up to 16 GB and 3/4 above, as Macs report it."""
    return int(total_bytes * (2 / 3 if total_bytes <= SMALL_MACHINE else 3 / 4))


def training_budget(total_bytes: int | None, recommended_working_set: int | None) -> int | None:
    """Bytes a training step's peak may use: the Metal wired limit for this machine (the OS keeps
    its reserve, Metal's recommended working set caps it); None when the machine's size is unknown."""
    if not total_bytes:
        return None
    return metal_memory_limits(total_bytes, recommended_working_set)["wired_limit"]


def default_max_memory_gb(total_bytes: int | None = None, recommended: int | None = None,
                          platform: str = sys.platform) -> float | None:
    """The `max_memory_gb` veto that follows this machine: its training budget in GB (a run that
    peaks above it swaps on a Mac), None when the machine's size is unknown. On a Mac without a
    `recommended` working set given, Metal is asked through MLX."""
    total = total_bytes if total_bytes is not None else total_memory_bytes()
    if recommended is None and platform == "darwin":
        try:
            import mlx.core as mx

            recommended = recommended_working_set(mx)
        except ImportError:
            pass
    budget = training_budget(total, recommended)
    return None if not budget else round(budget / GIB, 1)
