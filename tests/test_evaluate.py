"""evaluate_bpb exactness and the contract fingerprint."""
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest

from conftest import TINY_PROFILE, prose_docs, write_parquet
from mlx_ar.constants import REAL, Profile
from mlx_ar.data.dataset import Dataset
from mlx_ar.data.errors import DataError
from mlx_ar.data.loader import DocTable, val_batches, validation_walk_source
from mlx_ar.data.shards import TokenShard, shard_files
from mlx_ar.evaluate import (contract_parts, eval_batch_rows, eval_code_hash, evaluate_bpb, fingerprint,
                             validation_walk_digest)

V = 64
BOS = 60


class FakeDataset:
    """Just what evaluate_bpb uses: a profile, a vocabulary with byte lengths, a validation walk."""

    def __init__(self, profile, n_docs=400, seed=0):
        rng = np.random.default_rng(seed)
        docs = [[BOS] + rng.integers(0, V, size=int(rng.integers(5, 40))).tolist() for _ in range(n_docs)]
        tokens = np.array([t for d in docs for t in d], dtype=np.uint16)
        offsets = np.concatenate(([0], np.cumsum([len(d) for d in docs]))).astype(np.int64)
        self.table = DocTable([TokenShard(tokens, offsets)])
        self.profile, self.vocab_size, self.name = profile, V, "fake"
        # Tokens 60..63 are special (0 bytes); a few ordinary tokens are multi-byte.
        self.token_bytes = np.array([1 + (t % 3) for t in range(60)] + [0, 0, 0, 0], dtype=np.int32)
        self.calls = []

    def val_batches(self, batch_size, seq_len, max_rows=None):
        for x, y in val_batches(self.table, batch_size, seq_len, max_rows=max_rows):
            self.calls.append(len(x))
            yield x, y


PROFILE = Profile("fake", time_budget=1, max_seq_len=32, vocab_size=V, eval_tokens=32 * 20)


def walked_targets(ds):
    return np.concatenate([y for _, y in val_batches(ds.table, 1, ds.profile.max_seq_len,
                                                      max_rows=ds.profile.eval_tokens // ds.profile.max_seq_len)])


def uniform_model(inputs, targets):
    """A toy model whose logits are all zero: cross-entropy from an explicit log-softmax."""
    logits = np.zeros(inputs.shape + (V,), dtype=np.float32)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, targets[..., None].astype(np.int64), -1)[..., 0]


def test_uniform_logits_give_ln_v_per_counted_token():
    ds = FakeDataset(PROFILE)
    bpb = evaluate_bpb(uniform_model, ds)
    targets = walked_targets(ds)
    nbytes = ds.token_bytes[targets]
    assert targets.size == PROFILE.eval_tokens
    assert (nbytes == 0).any(), "the walk must contain special-token targets for this test to mean something"
    expected = math.log(V) * int((nbytes > 0).sum()) / (math.log(2) * int(nbytes.sum()))
    assert bpb == pytest.approx(expected, rel=1e-6)


def toy_losses(inputs, targets):
    return ((inputs.astype(np.float64) * 7 + targets * 13) % 29) / 7 + 0.1


def test_exact_and_independent_of_rows_per_call():
    ds_small, ds_big = FakeDataset(PROFILE), FakeDataset(PROFILE)
    one_row = evaluate_bpb(toy_losses, ds_small, max_logits_bytes=1)
    all_rows = evaluate_bpb(toy_losses, ds_big, max_logits_bytes=1 << 40)
    assert one_row == all_rows  # bit for bit
    assert ds_small.calls == [1] * 20 and ds_big.calls == [20]
    targets = walked_targets(ds_small)
    inputs = np.concatenate([x for x, _ in val_batches(ds_small.table, 20, 32, max_rows=20)])
    nats, nbytes = toy_losses(inputs, targets), ds_small.token_bytes[targets]
    assert one_row == math.fsum(nats[nbytes > 0].tolist()) / (math.log(2) * nbytes.sum())


def test_rows_per_call_follow_the_logits_bound_not_the_training_batch():
    assert eval_batch_rows(REAL, 8192) == 8            # 512 MiB / (2048 * 8192 * 4 bytes)
    assert eval_batch_rows(REAL, 8192, max_logits_bytes=1) == 1
    assert eval_batch_rows(REAL, 8192, max_logits_bytes=1 << 50) == REAL.eval_tokens // REAL.max_seq_len
    ds = FakeDataset(PROFILE)
    evaluate_bpb(toy_losses, ds, max_logits_bytes=3 * 32 * V * 4)
    assert ds.calls == [3] * 6 + [2]


def test_zero_byte_targets_are_left_out_entirely():
    ds = FakeDataset(PROFILE)

    def poisoned(inputs, targets):
        out = toy_losses(inputs, targets)
        out[ds.token_bytes[targets] == 0] = np.nan
        return out

    assert evaluate_bpb(poisoned, ds) == evaluate_bpb(toy_losses, FakeDataset(PROFILE))


def test_progress_and_nan():
    seen = []
    evaluate_bpb(toy_losses, FakeDataset(PROFILE), progress=lambda done, total: seen.append((done, total)),
                 max_logits_bytes=10 * 32 * V * 4)
    assert seen == [(320, 640), (640, 640)]
    assert math.isnan(evaluate_bpb(lambda x, y: np.full(y.shape, np.nan), FakeDataset(PROFILE)))


def test_bad_loss_shape_is_rejected():
    with pytest.raises(ValueError, match="per-token losses"):
        evaluate_bpb(lambda x, y: np.zeros(len(y)), FakeDataset(PROFILE))


def test_too_little_validation_data():
    with pytest.raises(DataError, match="only .* of the 20 rows"):
        evaluate_bpb(toy_losses, FakeDataset(PROFILE, n_docs=10))


def test_eval_tokens_must_fill_whole_rows():
    with pytest.raises(DataError, match="not a multiple"):
        evaluate_bpb(toy_losses, FakeDataset(replace(PROFILE, eval_tokens=100)))


def test_on_a_prepared_dataset(tiny_dataset):
    ds = tiny_dataset
    uniform = evaluate_bpb(lambda x, y: np.full(y.shape, math.log(ds.vocab_size)), ds)
    rows = ds.profile.eval_tokens // ds.profile.max_seq_len
    targets = np.concatenate([y for _, y in ds.val_batches(rows, ds.profile.max_seq_len, max_rows=rows)])
    nbytes = ds.token_bytes[targets]
    assert uniform == pytest.approx(math.log(ds.vocab_size) * (nbytes > 0).sum() / (math.log(2) * nbytes.sum()))


# --- contract fingerprint ---------------------------------------------------------------------
def test_contract_shape_and_stability(tiny_dataset):
    fp, parts = tiny_dataset.contract
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert set(parts) == {"profile", "eval_version", "tokenizer", "validation", "eval_code"}
    assert parts["tokenizer"] == tiny_dataset.tokenizer.hash
    again = Dataset(tiny_dataset.dir, "other-name")
    assert again.contract == (fp, parts)
    assert fingerprint(parts) == fp


def test_fingerprint_changes_with_each_ingredient(tiny_dataset):
    _, parts = tiny_dataset.contract
    base = dict(tok=parts["tokenizer"], val=parts["validation"], code=parts["eval_code"])

    def fp(profile=TINY_PROFILE, tok=base["tok"], val=base["val"], code=base["code"], version=parts["eval_version"]):
        return fingerprint(contract_parts(profile, tok, val, code, version))

    variants = [fp()]
    for field in ("name", "time_budget", "max_seq_len", "vocab_size", "eval_tokens"):
        value = getattr(TINY_PROFILE, field)
        variants.append(fp(profile=replace(TINY_PROFILE, **{field: value + "x" if isinstance(value, str) else value + 1})))
    variants += [fp(version=parts["eval_version"] + 1), fp(tok="0" * 64), fp(val="1" * 64), fp(code="2" * 64)]
    assert len(set(variants)) == len(variants)
    assert variants[0] == tiny_dataset.contract[0]
    # Recipe overrides change the model a profile trains, not what val_bpb means.
    assert fp(profile=replace(TINY_PROFILE, recipe_overrides=(("DEPTH", 2),))) == variants[0]


def test_eval_code_hash_covers_this_module_and_the_walk():
    src = validation_walk_source()
    assert "class BestFitPacker" in src and "def val_batches" in src and "BUFFER_DOCS = " in src
    live = eval_code_hash()
    assert eval_code_hash(walk_source=src) == live
    assert eval_code_hash(walk_source=src.replace("bisect_right(lens, space) - 1", "bisect_right(lens, space)")) != live
    import mlx_ar.evaluate as ev

    with open(ev.__file__, "rb") as f:
        code = f.read()
    assert eval_code_hash(evaluate_source=code) == live
    assert eval_code_hash(evaluate_source=code.replace(b"math.log(2)", b"math.log(2.0)")) != live


def test_validation_identity_follows_the_scored_tokens(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset.dir, copy)
    # Find the document that opens the first scored row, and change its second token.
    table = tiny_dataset.split_table("val")
    x, y = next(tiny_dataset.val_batches(1, TINY_PROFILE.max_seq_len))
    row = np.concatenate([x[0], y[0, -1:]])
    seg = row[: (np.flatnonzero(row[1:] == tiny_dataset.bos_id).tolist() + [len(row) - 1])[0] + 1]
    j = next(j for j in range(table.num_docs) if (table.doc(j)[: len(seg)] == seg).all())
    tok_path, _ = shard_files(copy / "tokens", "val", 0)
    arr = np.load(tok_path)
    arr[table.start[j] + 1] = (arr[table.start[j] + 1] + 1) % 380
    np.save(tok_path, arr)
    ds = Dataset(copy, "copy")
    rows = TINY_PROFILE.eval_tokens // TINY_PROFILE.max_seq_len
    _, digest = validation_walk_digest(ds.split_table("val"), TINY_PROFILE.max_seq_len, rows)
    assert digest != tiny_dataset.contract[1]["validation"]
    with pytest.raises(DataError, match="differ from those recorded"):
        ds.contract


def test_same_data_prepared_twice_has_the_same_contract_other_data_does_not(tiny_dataset, corpus_dir, tmp_path):
    from mlx_ar.data.prepare import prepare_dataset
    from mlx_ar.data.sources import local_source

    prepare_dataset(local_source(corpus_dir), tmp_path / "again", TINY_PROFILE, log=lambda m: None)
    assert Dataset(tmp_path / "again").contract == tiny_dataset.contract

    other = tmp_path / "other"
    other.mkdir()
    docs = prose_docs()[::-1]  # same text, other split: another tokenizer and another validation set
    for i in range(3):
        write_parquet(other / f"p{i}.parquet", docs[i::3])
    prepare_dataset(local_source(other), tmp_path / "o", TINY_PROFILE, log=lambda m: None)
    _, parts = Dataset(tmp_path / "o").contract
    _, base = tiny_dataset.contract
    assert parts["tokenizer"] != base["tokenizer"] and parts["validation"] != base["validation"]
    assert parts["eval_code"] == base["eval_code"] and parts["profile"] == base["profile"]
