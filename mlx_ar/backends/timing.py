"""Timing a device operation: the median of repeated calls after untimed compile calls."""
import time


def median_seconds(run, repeats: int, warmup: int = 2, now=time.perf_counter) -> float:
    """Median wall time of `run()` over `repeats` calls, after `warmup` untimed ones (compilation).

    `run` must wait for its own device work, or only the dispatch is timed.
    """
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        t0 = now()
        run()
        times.append(now() - t0)
    return sorted(times)[len(times) // 2]
