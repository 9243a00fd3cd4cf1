"""The fixed data contract: sources, tokenizer, pre-tokenized shards, the packed loader.

    from mlx_ar.data import open_dataset, DataError
    ds = open_dataset()                      # the dataset `python prepare.py` made last
    batches = ds.train_batches(batch_size=16, seq_len=2048, seed=42)

Modules: sources (climbmix / local / demo text), download (resumable shard fetch),
tokenizer (rustbpe + tiktoken, no pickle), shards (uint16 token files), loader (best-fit
packing + prefetch), walk (the scored validation and held-out walks and their digests),
dataset (open_dataset), prepare (the pipeline and `mlx-ar prepare`),
bench (loader throughput). Importing this package loads neither numpy nor pyarrow.
"""
from .errors import DataError, DownloadError


def open_dataset(name=None):
    """See mlx_ar.data.dataset.open_dataset (imported lazily so the CLI stays light)."""
    from .dataset import open_dataset as _open

    return _open(name)


def __getattr__(attr):
    if attr == "Dataset":
        from .dataset import Dataset

        return Dataset
    raise AttributeError(f"module 'mlx_ar.data' has no attribute {attr!r}")


__all__ = ["DataError", "DownloadError", "open_dataset", "Dataset"]
