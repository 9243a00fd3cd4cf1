"""MFU: model FLOPs utilization, the achieved model FLOP/s over the device's peak dense bf16 FLOP/s.

A backend reports its device's peak from its own table (backends/mlx/chips.py for Apple,
backends/cuda/hardware.py for NVIDIA); a device not in them has an unknown peak (None), and MFU
is then reported as `unknown`, never as a made-up 0.

    mfu = mfu_percent(flops_per_token, tok_per_sec, backend.peak_flops())   # None when the peak is None
"""
import math


def mfu_percent(flops_per_token: float, tok_per_sec: float, peak: float | None) -> float | None:
    """Achieved model FLOP/s as a percentage of `peak`; None when the peak is unknown."""
    if peak is None or not peak > 0 or not math.isfinite(peak):
        return None
    return 100.0 * flops_per_token * tok_per_sec / peak
