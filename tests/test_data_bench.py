"""The loader benchmark reports packed tokens/s with and without the prefetch thread."""
import threading

from mlx_ar.data.bench import bench_loader


class TickClock:
    """A fake clock: every reading advances 1/8 s (exact in binary), so the bench loop is short and exact."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        self.t += 0.125
        return self.t


def test_bench_loader_reports_both_modes(tiny_dataset):
    lines = []
    threads_before = threading.active_count()
    out = bench_loader(tiny_dataset, 4, 64, seconds=1.0, out=lines.append, clock=TickClock())
    # Every batch costs one clock reading of 1/8 s: 8 batches of 4 x 64 tokens per mode.
    assert out["batches"] == {"packed": 8, "prefetched": 8}
    assert out["packed_tokens_per_sec"] == out["prefetched_tokens_per_sec"] == 8 * 256 / 1.0
    assert any("packed (no prefetch)" in line for line in lines)
    assert any("prefetched (consumer)" in line for line in lines)
    for t in threading.enumerate():
        if t.name == "mlx_ar-loader":
            t.join(timeout=2)
    assert threading.active_count() <= threads_before, "the prefetch thread stops after the bench"
