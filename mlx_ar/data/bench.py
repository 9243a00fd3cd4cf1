"""Loader throughput: how many packed tokens per second the loader can produce.

    from mlx_ar.data import open_dataset
    from mlx_ar.data.bench import bench_loader
    bench_loader(open_dataset(), batch_size=16, seq_len=2048, seconds=5)

Two numbers: `packed` runs the packer on the calling thread (prefetch off: the raw cost of
packing one core can sustain); `prefetched` consumes batches from the background thread the
way training does, which adds the hand-off between threads. A training step that eats ~2M
tokens/s is never starved while both stay far above that.
"""
import time


def _rate(batches, seconds: float, clock) -> tuple[float, int, int]:
    tokens = n = 0
    t0 = clock()
    while True:
        inputs, _targets, epoch = next(batches)
        tokens += inputs.size
        n += 1
        elapsed = clock() - t0
        if elapsed >= seconds:
            return tokens / elapsed, n, epoch


def bench_loader(ds, batch_size: int, seq_len: int, seconds: float = 5.0, seed: int = 0,
                 out=print, clock=time.perf_counter) -> dict:
    """Measure packed tokens/s of `ds.train_batches` with and without prefetch; print and return them."""
    out(f"loader bench: dataset '{ds.name}', batch {batch_size} x {seq_len}, {seconds:g}s per mode")
    sync = ds.train_batches(batch_size, seq_len, seed=seed, prefetch=0)
    packed, n_sync, _ = _rate(sync, seconds, clock)
    out(f"  packed (no prefetch):  {packed / 1e6:8.2f}M tokens/s  ({n_sync} batches)")
    pre = ds.train_batches(batch_size, seq_len, seed=seed, prefetch=2)
    try:
        prefetched, n_pre, epoch = _rate(pre, seconds, clock)
    finally:
        pre.close()  # stops the producer thread
    out(f"  prefetched (consumer): {prefetched / 1e6:8.2f}M tokens/s  ({n_pre} batches, epoch {epoch})")
    return {
        "dataset": ds.name, "batch_size": batch_size, "seq_len": seq_len, "seconds": seconds,
        "packed_tokens_per_sec": packed, "prefetched_tokens_per_sec": prefetched,
        "batches": {"packed": n_sync, "prefetched": n_pre},
    }
