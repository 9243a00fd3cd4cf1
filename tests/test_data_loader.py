"""The packed loader: best-fit packing invariants, determinism, epochs, prefetch, the validation walk."""
import numpy as np
import pytest

from mlx_ar.data.errors import DataError
from mlx_ar.data.loader import BestFitPacker, DocTable, prefetched, train_batches, val_batches
from mlx_ar.data.shards import TokenShard, load_shard, shard_files

BOS = 999


def make_docs(n: int, seed: int = 0, lo: int = 3, hi: int = 90) -> list[list[int]]:
    """Doc j = [BOS, id_hi, id_lo, random...]: tokens 1-2 name the document so rows can be traced."""
    rng = np.random.default_rng(seed)
    docs = []
    for j in range(n):
        length = int(rng.integers(lo, hi))
        body = rng.integers(1, 900, size=max(0, length - 3)).tolist()
        docs.append([BOS, 1 + j // 500, 1 + j % 500] + body)
    return docs


def table_of(docs, n_shards: int = 2) -> DocTable:
    shards = []
    per = -(-len(docs) // n_shards)
    for s in range(n_shards):
        part = docs[s * per:(s + 1) * per]
        tokens = np.array([t for d in part for t in d], dtype=np.uint16)
        offsets = np.concatenate(([0], np.cumsum([len(d) for d in part]))).astype(np.int64)
        shards.append(TokenShard(tokens, offsets))
    return DocTable(shards)


def doc_id(seg) -> int:
    return (int(seg[1]) - 1) * 500 + int(seg[2]) - 1


def segments(row):
    starts = np.flatnonzero(np.asarray(row) == BOS).tolist() + [len(row)]
    return [row[a:b] for a, b in zip(starts, starts[1:])]


def check_rows(rows, docs):
    """Every row starts with BOS and consists of whole documents, except a cropped last one.

    Returns the document ids in the order they were placed (-1: a crop too short to identify).
    """
    used = []
    for row in rows:
        assert row[0] == BOS
        segs = segments(row)
        for k, seg in enumerate(segs):
            if len(seg) < 3:  # a crop so short that it cannot name its document
                assert k == len(segs) - 1
                used.append(-1)
                continue
            doc = docs[doc_id(seg)]
            if k < len(segs) - 1:
                assert list(seg) == doc, "only the last piece of a row may be cropped"
            else:
                assert list(seg) == doc[: len(seg)]
            used.append(doc_id(seg))
    return used


def no_repeats(used) -> bool:
    ids = [u for u in used if u >= 0]
    return len(ids) == len(set(ids))


def full_rows(inputs, targets):
    return np.concatenate([inputs, targets[:, -1:]], axis=1)


def test_best_fit_order_on_a_hand_example():
    # lengths 6, 5, 4, 3, capacity 10: row 1 = 6 + 4; row 2 = 5 + 3 + a crop of 2 from the only one left.
    docs = [[BOS] + [j + 1] * (n - 1) for j, n in enumerate((6, 5, 4, 3, 7))]
    table = table_of(docs, 1)
    stream = ((0, int(table.start[j]), int(table.length[j]), 1) for j in range(4))
    packer = BestFitPacker(stream, table.tokens, buffer_docs=8)
    out = np.zeros((3, 10), dtype=np.int32)
    assert packer.fill(out) == 1  # the stream runs dry during row 2, which is discarded
    assert out[0].tolist() == docs[0] + docs[2]
    stream = ((0, int(table.start[j]), int(table.length[j]), 1) for j in (1, 3, 4, 0))
    packer = BestFitPacker(stream, table.tokens, buffer_docs=8)
    out = np.zeros((2, 10), dtype=np.int32)
    assert packer.fill(out) == 2
    # Row 1: 7 fits, then 3; row 2: 6, then nothing of {5} fits the 4 left, so 5 is cropped to 4.
    assert out[0].tolist() == docs[4] + docs[3]
    assert out[1].tolist() == docs[0] + docs[1][:4]


def test_rows_are_bos_aligned_whole_documents_with_no_padding():
    docs = make_docs(600)
    table = table_of(docs)
    it = train_batches(table, 4, 127, seed=3, prefetch=0)
    rows = []
    for _ in range(10):
        inputs, targets, epoch = next(it)
        assert inputs.dtype == np.int32 and inputs.shape == (4, 127) and targets.shape == (4, 127)
        assert inputs.flags.c_contiguous and targets.flags.c_contiguous
        assert (targets[:, :-1] == inputs[:, 1:]).all()
        assert epoch == 1
        rows.extend(full_rows(inputs, targets))
    used = check_rows(rows, docs)
    assert no_repeats(used), "within an epoch no document is used twice"
    # Packing is tight: most rows hold several whole documents.
    assert len(used) > 2 * len(rows)


def test_long_documents_are_cropped_not_split():
    docs = make_docs(50, lo=150, hi=300)  # every document is longer than a row
    rows = [r for x, y, _ in (next(it) for it in [train_batches(table_of(docs), 8, 63, prefetch=0)] * 4)
            for r in full_rows(x, y)]
    used = check_rows(rows, docs)
    assert all(len(segments(r)) == 1 for r in rows)
    assert no_repeats(used)


def test_deterministic_for_a_seed_and_different_across_seeds():
    table = table_of(make_docs(300))

    def take(seed, prefetch, n=6):
        it = train_batches(table, 3, 50, seed=seed, prefetch=prefetch)
        return [np.concatenate([x, y], axis=1) for x, y, _ in (next(it) for _ in range(n))]

    a, b = take(7, 0), take(7, 2)
    assert all((p == q).all() for p, q in zip(a, b)), "prefetch must not change the batches"
    c = take(8, 0)
    assert not all((p == q).all() for p, q in zip(a, c))


def test_rows_do_not_depend_on_batch_size():
    table = table_of(make_docs(300))
    one = np.concatenate([full_rows(x, y) for x, y, _ in (next(it) for it in [train_batches(table, 1, 40, prefetch=0)] * 12)])
    four = np.concatenate([full_rows(x, y) for x, y, _ in (next(it) for it in [train_batches(table, 4, 40, prefetch=0)] * 3)])
    assert (one == four).all()


def test_epoch_rolls_over_and_each_epoch_uses_every_document_once():
    docs = make_docs(40)
    n = len(docs)
    n_tokens = sum(map(len, docs))
    it = train_batches(table_of(docs), 2, 31, seed=1, prefetch=0)
    epochs, rows = [], []
    while len(rows) * 32 < 4 * n_tokens:
        x, y, e = next(it)
        epochs.append(e)
        rows.extend(full_rows(x, y))
    assert epochs[0] == 1 and epochs == sorted(epochs) and epochs[-1] >= 3
    used = check_rows(rows, docs)
    orders = []
    for k in range(3):
        block = used[k * n:(k + 1) * n]
        assert no_repeats(block) and len(block) == n, f"epoch {k + 1} must place each document once"
        orders.append(block)
    assert orders[0] != orders[1] != orders[2], "every epoch reshuffles"


def test_prefetch_stops_and_reraises():
    def boom():
        yield 1
        raise RuntimeError("producer failed")

    it = prefetched(boom, 2)
    assert next(it) == 1
    with pytest.raises(RuntimeError, match="producer failed"):
        next(it)
    assert list(prefetched(lambda: iter(range(5)), 1)) == [0, 1, 2, 3, 4]


def test_empty_training_split_is_an_error():
    table = DocTable([TokenShard(np.zeros(0, np.uint16), np.zeros(1, np.int64))])
    with pytest.raises(DataError, match="no documents"):
        next(train_batches(table, 1, 8, prefetch=0))


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        train_batches(table_of(make_docs(10)), 0, 8)


def test_validation_walk_is_fixed_finite_and_batch_size_free():
    docs = make_docs(200, seed=5, hi=40)  # all shorter than a row, so little is cropped
    table = table_of(docs)

    def walk(b, max_rows=None):
        return np.concatenate([full_rows(x, y) for x, y in val_batches(table, b, 45, max_rows=max_rows)])

    rows = walk(1)
    assert (walk(7) == rows).all() and (walk(64) == rows).all()
    used = check_rows(rows, docs)
    assert no_repeats(used)
    assert sum(map(len, docs)) >= rows.size > 0.9 * sum(map(len, docs))
    short = list(val_batches(table, 4, 45, max_rows=10))
    assert [len(x) for x, _ in short] == [4, 4, 2]
    assert (np.concatenate([full_rows(x, y) for x, y in short]) == rows[:10]).all()


def test_prepared_dataset_batches(tiny_dataset):
    ds = tiny_dataset
    table = ds.split_table("train")
    docs = [table.doc(j).tolist() for j in range(table.num_docs)]
    x, y, epoch = next(ds.train_batches(4, 256, seed=0))
    assert epoch == 1 and (x[:, 0] == ds.bos_id).all()
    for row in full_rows(x, y):
        starts = np.flatnonzero(row == ds.bos_id).tolist() + [len(row)]
        for a, b in zip(starts, starts[1:]):
            seg = row[a:b].tolist()
            # Each piece is a real training document, or a prefix of one (a crop).
            assert any(d[: len(seg)] == seg for d in docs)


def test_shard_files_are_validated(tiny_dataset, tmp_path):
    tokens_dir = tiny_dataset.dir / "tokens"
    tok_path, docs_path = shard_files(tokens_dir, "train", 0)
    offsets = np.load(docs_path)
    bad = tmp_path / "tokens"
    bad.mkdir()
    (bad / tok_path.name).write_bytes(tok_path.read_bytes())
    np.save(bad / docs_path.name, offsets + 1)
    with pytest.raises(DataError, match="BOS-prefixed"):
        load_shard(bad, "train", 0, tiny_dataset.bos_id)
    with pytest.raises(DataError, match="missing train token file"):
        load_shard(bad, "train", 1, tiny_dataset.bos_id)
    with pytest.raises(DataError, match="does not match the manifest"):
        load_shard(tokens_dir, "train", 0, tiny_dataset.bos_id, expect_docs=len(offsets))
