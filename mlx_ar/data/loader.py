"""The packed loader: BOS-aligned best-fit packing of pre-tokenized documents, with prefetch.

    table = DocTable(shards)                          # shards from shards.load_shard
    for inputs, targets, epoch in train_batches(table, B, T, seed=0, prefetch=2): ...
    for inputs, targets in val_batches(table, B, T, max_rows=N): ...   # the fixed validation walk

Packing (each row holds T+1 tokens; inputs = row[:-1], targets = row[1:]):
  * a buffer holds BUFFER_DOCS documents, kept sorted by length;
  * a row is filled left to right: take the longest buffered document that fits the space left,
    refill the buffer from the document stream, repeat;
  * only when no buffered document fits is the shortest one cropped to fill the row exactly
    (its tail is dropped). Every document starts with BOS, so every row starts with BOS, and
    there is never padding.
Rows are produced one at a time, so the sequence of rows does not depend on the batch size.

Training streams every document once per epoch in an order shuffled by (seed, epoch), forever;
`epoch` (from 1) is the pass the last packed document belongs to. The buffer drains at the end
of an epoch before the next one enters, so within an epoch every document is used exactly once
(whole, or cropped at the end of a row). Validation streams the validation
documents in file order, once, with no randomness: the same rows on every machine and backend.
Batches are int32 numpy arrays; each backend converts them on its side.
"""
import queue
import threading
from bisect import bisect_right
from itertools import count

import numpy as np

from .errors import DataError

BUFFER_DOCS = 1000          # documents the best-fit packer chooses from
STREAM_CHUNK = 8192         # documents gathered from the shuffled order at a time


class DocTable:
    """Every document of one split as (shard, start, length), over memory-mapped token shards."""

    def __init__(self, shards):
        # Plain ndarray views: slicing an np.memmap runs Python code on every slice.
        self.tokens = [np.asarray(s.tokens).view(np.ndarray) for s in shards]
        self.shard = np.concatenate([np.full(s.num_docs, i, dtype=np.int64) for i, s in enumerate(shards)])
        self.start = np.concatenate([s.offsets[:-1] for s in shards]).astype(np.int64)
        self.length = np.concatenate([np.diff(s.offsets) for s in shards]).astype(np.int64)

    @property
    def num_docs(self) -> int:
        return len(self.length)

    @property
    def num_tokens(self) -> int:
        return int(self.length.sum())

    def doc(self, j: int) -> np.ndarray:
        s, st, n = int(self.shard[j]), int(self.start[j]), int(self.length[j])
        return self.tokens[s][st:st + n]


# --- document streams -------------------------------------------------------------------------
def _emit(table: DocTable, idx: np.ndarray, epoch: int):
    for i in range(0, len(idx), STREAM_CHUNK):
        part = idx[i:i + STREAM_CHUNK]
        # Gather a chunk with numpy, then iterate plain Python ints (fast in the packer).
        yield from zip(table.shard[part].tolist(), table.start[part].tolist(), table.length[part].tolist(),
                       [epoch] * len(part))


def train_doc_stream(table: DocTable, seed: int):
    """(shard, start, length, epoch) forever; each epoch is a fresh permutation seeded by (seed, epoch)."""
    if table.num_docs == 0:
        raise DataError("the training split has no documents")
    for epoch in count(1):
        perm = np.random.default_rng([seed, epoch]).permutation(table.num_docs)
        yield from _emit(table, perm, epoch)


def val_doc_stream(table: DocTable):
    """(shard, start, length, 1) for every validation document in file order, once."""
    yield from _emit(table, np.arange(table.num_docs), 1)


# --- best-fit packing -------------------------------------------------------------------------
class BestFitPacker:
    """Fills rows from a document stream; `epoch` is the epoch of the last document placed.

    The buffer never mixes epochs: documents of the next epoch enter only once the current
    epoch's have all been placed, so each epoch uses every document exactly once.
    """

    def __init__(self, docs, tokens: list[np.ndarray], buffer_docs: int = BUFFER_DOCS):
        self.docs = iter(docs)
        self.tokens = tokens
        self.buffer_docs = buffer_docs
        self.lens: list[int] = []                 # sorted ascending
        self.items: list[tuple[int, int]] = []    # (shard, start), aligned with lens
        self.buffer_epoch = 0                     # epoch of the documents in the buffer
        self.epoch = 0
        self._pending = None                      # next document, held back until the buffer drains
        self._refill()

    def _take(self) -> bool:
        """Move one document from the stream into the buffer; False if the stream is dry or the epoch ends."""
        if self._pending is None:
            try:
                self._pending = next(self.docs)
            except StopIteration:
                return False
        shard, start, length, epoch = self._pending
        if epoch != self.buffer_epoch:
            if self.lens:
                return False
            self.buffer_epoch = epoch
        self._pending = None
        i = bisect_right(self.lens, length)
        self.lens.insert(i, length)
        self.items.insert(i, (shard, start))
        return True

    def _refill(self) -> None:
        while len(self.lens) < self.buffer_docs and self._take():
            pass

    def fill(self, out: np.ndarray) -> int:
        """Fill the rows of `out` (n, cap) in order; return how many were completed.

        Fewer than n only when the stream ran dry; the unfinished row is then discarded.
        """
        n_rows, cap = out.shape
        lens, items, tokens, take = self.lens, self.items, self.tokens, self._take
        for r in range(n_rows):
            row = out[r]
            pos = 0
            while pos < cap:
                if not lens:
                    self._refill()         # the epoch has drained: start the next one
                    if not lens:
                        return r
                space = cap - pos
                i = bisect_right(lens, space) - 1
                if i >= 0:
                    n = lens.pop(i)        # the longest document that fits whole
                else:
                    lens.pop(0)            # nothing fits: crop the shortest to the space left
                    i, n = 0, space
                shard, start = items.pop(i)
                row[pos:pos + n] = tokens[shard][start:start + n]
                pos += n
                self.epoch = self.buffer_epoch
                take()
        return n_rows


# --- batches ----------------------------------------------------------------------------------
def _split_rows(rows: np.ndarray):
    return np.ascontiguousarray(rows[:, :-1]), np.ascontiguousarray(rows[:, 1:])


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")


def train_batches(table: DocTable, batch_size: int, seq_len: int, seed: int = 0, prefetch: int = 2,
                  buffer_docs: int = BUFFER_DOCS):
    """Infinite (inputs, targets, epoch) batches of shape (batch_size, seq_len), int32."""
    _check_shape(batch_size, seq_len)

    def produce():
        packer = BestFitPacker(train_doc_stream(table, seed), table.tokens, buffer_docs)
        while True:
            rows = np.empty((batch_size, seq_len + 1), dtype=np.int32)
            packer.fill(rows)
            yield (*_split_rows(rows), packer.epoch)

    return prefetched(produce, prefetch) if prefetch > 0 else produce()


def val_batches(table: DocTable, batch_size: int, seq_len: int, max_rows: int | None = None):
    """The validation walk: (inputs, targets) batches, rows in a fixed order; the last may be short.

    Stops after `max_rows` rows, or when the validation documents run out.
    """
    _check_shape(batch_size, seq_len)
    packer = BestFitPacker(val_doc_stream(table), table.tokens, BUFFER_DOCS)
    left = float("inf") if max_rows is None else max_rows
    while left > 0:
        rows = np.empty((int(min(batch_size, left)), seq_len + 1), dtype=np.int32)
        got = packer.fill(rows)
        if got:
            yield _split_rows(rows[:got])
        if got < len(rows):
            return
        left -= got


# --- prefetch ---------------------------------------------------------------------------------
class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


_END = object()


def prefetched(make_iter, depth: int = 2):
    """Run `make_iter()` in a daemon thread, `depth` items ahead; same items, same order.

    An exception in the producer is re-raised in the consumer. Closing (or dropping) the
    returned generator stops the thread.
    """
    q: queue.Queue = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work():
        try:
            for item in make_iter():
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer, which re-raises it
            put(_Failure(e))

    thread = threading.Thread(target=work, name="mlx_ar-loader", daemon=True)
    thread.start()

    def consume():
        try:
            while True:
                item = q.get()
                if item is _END:
                    return
                if isinstance(item, _Failure):
                    raise item.exc
                yield item
        finally:
            stop.set()

    return consume()
