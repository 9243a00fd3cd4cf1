"""evaluate_bpb exactness, cross-entropy from logits, the leak probe, held-out scoring, the contract fingerprint."""
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PROFILE, prose_docs, write_parquet
from mlx_ar.constants import REAL, Profile
from mlx_ar.data.dataset import Dataset
from mlx_ar.data.errors import DataError
from mlx_ar.data.loader import DocTable, val_batches
from mlx_ar.data.shards import TokenShard, shard_files
from mlx_ar.data.walk import heldout_rows, walk_digest
from mlx_ar.evaluate import (LeakDetected, check_causal, contract_fingerprint, contract_parts, cross_entropy,
                             eval_batch_rows, evaluate_bpb, fingerprint, leak_probe, nats_from_logits, probe_points)

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
    assert eval_batch_rows(REAL, 8192) == 2            # 128 MiB / (2048 * 8192 * 4 bytes)
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
    with pytest.raises(ValueError, match="per-token nats"):
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


# --- cross-entropy from logits ------------------------------------------------------------------
def reference_nats(logits, targets):
    """float64 log-softmax cross-entropy, the slow obvious way."""
    z = np.asarray(logits, dtype=np.float64)
    lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
    return lse - np.take_along_axis(z, targets[..., None].astype(np.int64), -1)[..., 0]


@pytest.mark.parametrize("chunk", [1, 7, 4096])
def test_float32_chunked_cross_entropy_equals_a_float64_reference(chunk):
    rng = np.random.default_rng(1)
    # Soft-capped-range logits, with a few rows pushed to the cap where a naive exp would overflow.
    logits = (15 * np.tanh(rng.normal(0, 3, size=(3, 17, 500)) / 15)).astype(np.float32)
    logits[1, 4] += 80.0
    targets = rng.integers(0, 500, size=(3, 17)).astype(np.int32)
    got = cross_entropy(logits, targets, chunk_positions=chunk)
    assert got.dtype == np.float32 and got.shape == (3, 17)
    np.testing.assert_allclose(got, reference_nats(logits, targets), rtol=2e-6, atol=2e-5)


def test_scoring_from_logits_in_row_chunks_is_exact():
    rng = np.random.default_rng(2)
    table = rng.normal(0, 2, size=(V, V)).astype(np.float32)     # a bigram "model": logits of the input token
    logits_fn = lambda x: table[x]
    one = evaluate_bpb(nats_from_logits(logits_fn, chunk_rows=1), FakeDataset(PROFILE))
    many = evaluate_bpb(nats_from_logits(logits_fn, chunk_rows=5), FakeDataset(PROFILE), max_logits_bytes=1 << 30)
    assert one == many
    ds = FakeDataset(PROFILE)
    inputs = np.concatenate([x for x, _ in val_batches(ds.table, 20, 32, max_rows=20)])
    targets = walked_targets(ds)
    nats, nbytes = reference_nats(table[inputs], targets), ds.token_bytes[targets]
    assert one == pytest.approx(nats[nbytes > 0].sum() / (math.log(2) * nbytes.sum()), rel=1e-6)


# --- leak probe -------------------------------------------------------------------------------
def causal_logits(x):
    """Logits at t from tokens 0..t only: a decayed running sum of token features."""
    feats = np.sin(np.arange(V)[None, :] * (x[..., None] + 1.0) / 7.0)
    out = np.zeros(x.shape + (V,), dtype=np.float32)
    acc = np.zeros((x.shape[0], V))
    for t in range(x.shape[1]):
        acc = 0.9 * acc + feats[:, t]
        out[:, t] = acc
    return out


def peeking_logits(x):
    """Causal, except that position t also sees token t+1 (its target)."""
    out = causal_logits(x)
    out[:, :-1] += 3.0 * np.eye(V, dtype=np.float32)[x[:, 1:]]
    return out


def short_row_leak(x):
    """Causal on full rows; on shorter rows every position sees the row's last token (a mask sliced wrong)."""
    out = causal_logits(x)
    if x.shape[1] < PROFILE.max_seq_len:
        out += np.eye(V, dtype=np.float32)[x[:, -1]][:, None, :]
    return out


def test_probe_points_cover_the_middle_the_end_and_a_short_row():
    assert probe_points(2048) == [(2048, 0), (2048, 512), (2048, 1023), (2048, 1024), (2048, 2046), (256, 254)]
    assert probe_points(2) == [(2, 0)]


def test_leak_probe_passes_a_causal_model_and_catches_look_ahead():
    row = next(val_batches(FakeDataset(PROFILE).table, 1, 32))[0][0]
    assert leak_probe(causal_logits, row, V) is None
    reason = leak_probe(peeking_logits, row, V)
    assert reason.startswith("leak: ") and "positions 0..0 of a 32-token row" in reason
    reason = leak_probe(short_row_leak, row, V)
    assert reason.startswith("leak: ") and "of a 4-token row" in reason


def test_leak_probe_tells_kernel_noise_from_look_ahead():
    rng = np.random.default_rng(5)

    def noisy(fn, sd):
        """fn with independent noise on every row of every call, as nondeterministic kernels give."""
        return lambda x: fn(x) + rng.normal(0, sd, size=x.shape + (V,)).astype(np.float32)

    row = next(val_batches(FakeDataset(PROFILE).table, 1, 32))[0][0]
    assert leak_probe(noisy(causal_logits, 0.05), row, V) is None
    assert leak_probe(noisy(peeking_logits, 0.01), row, V).startswith("leak: ")


def test_check_causal_raises_on_the_first_validation_row():
    check_causal(causal_logits, FakeDataset(PROFILE))
    with pytest.raises(LeakDetected, match="^leak: "):
        check_causal(peeking_logits, FakeDataset(PROFILE))


# --- held-out split ---------------------------------------------------------------------------
def test_heldout_is_scored_on_its_own_disjoint_walk(tiny_dataset):
    ds = tiny_dataset
    n = heldout_rows(ds.profile)
    seen = []

    def nats(x, y):
        seen.append(x.copy())
        return np.full(y.shape, math.log(ds.vocab_size))

    bpb = evaluate_bpb(nats, ds, split="heldout")
    inputs = np.concatenate(seen)
    assert inputs.shape == (n, ds.profile.max_seq_len) and bpb > 0
    held = {tuple(r) for r in inputs}
    val = {tuple(x) for b, _ in ds.val_batches(64, ds.profile.max_seq_len) for x in b}
    assert not held & val, "held-out rows must not be validation rows"
    assert ds.num_tokens("val") + ds.num_tokens("heldout") > ds.num_tokens("val")


def test_a_dataset_without_heldout_says_so_and_still_scores_validation(tiny_dataset, tmp_path):
    import json

    copy = tmp_path / "old"
    shutil.copytree(tiny_dataset.dir, copy)
    m = json.loads((copy / "manifest.json").read_text())
    del m["heldout_walk"], m["splits"]["heldout"]
    (copy / "manifest.json").write_text(json.dumps(m))
    old = Dataset(copy, "old")
    assert "prepared without a held-out split" in old.heldout_missing and "--force" in old.heldout_missing
    with pytest.raises(DataError, match="without a held-out split"):
        evaluate_bpb(lambda x, y: np.ones(y.shape), old, split="heldout")
    _, parts = contract_fingerprint(old)
    assert parts["heldout"] is None and parts["validation"] == contract_fingerprint(tiny_dataset)[1]["validation"]


# --- contract fingerprint ---------------------------------------------------------------------
def test_contract_shape_and_stability(tiny_dataset):
    fp, parts = contract_fingerprint(tiny_dataset)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert set(parts) == {"eval_version", "profile", "heldout_share", "tokenizer", "validation", "heldout"}
    assert parts["tokenizer"] == tiny_dataset.tokenizer.hash
    assert parts["heldout"] == tiny_dataset.manifest["heldout_walk"]["sha256"]
    assert contract_fingerprint(Dataset(tiny_dataset.dir, "other-name")) == (fp, parts)
    assert fingerprint(parts) == fp


def test_fingerprint_changes_with_each_ingredient(tiny_dataset):
    _, parts = contract_fingerprint(tiny_dataset)
    base = dict(tok=parts["tokenizer"], val=parts["validation"], held=parts["heldout"])

    def fp(profile=TINY_PROFILE, tok=base["tok"], val=base["val"], held=base["held"], version=parts["eval_version"],
           share=parts["heldout_share"]):
        return fingerprint(contract_parts(profile, tok, val, held, version, share))

    variants = [fp()]
    for field in ("name", "time_budget", "max_seq_len", "vocab_size", "eval_tokens"):
        value = getattr(TINY_PROFILE, field)
        variants.append(fp(profile=replace(TINY_PROFILE, **{field: value + "x" if isinstance(value, str) else value + 1})))
    variants += [fp(version=parts["eval_version"] + 1), fp(share=parts["heldout_share"] + 1), fp(tok="0" * 64),
                 fp(val="1" * 64), fp(held="2" * 64), fp(held=None)]
    assert len(set(variants)) == len(variants)
    assert variants[0] == contract_fingerprint(tiny_dataset)[0]
    # Recipe overrides change the model a profile trains, not what val_bpb means.
    assert fp(profile=replace(TINY_PROFILE, recipe_overrides=(("DEPTH", 2),))) == variants[0]


def test_a_comment_in_the_fixed_code_does_not_change_the_fingerprint(tiny_dataset, tmp_path):
    import importlib.util

    import mlx_ar.evaluate as ev

    source = Path(ev.__file__).read_text().replace(
        "def contract_fingerprint(ds)", "# A reworded comment, as a docstring fix would be.\ndef contract_fingerprint(ds)")
    path = tmp_path / "evaluate_commented.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("mlx_ar.evaluate_commented", path)
    commented = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(commented)
    assert commented.contract_fingerprint(tiny_dataset) == ev.contract_fingerprint(tiny_dataset)


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
    _, digest = walk_digest(ds.split_table("val"), TINY_PROFILE.max_seq_len, rows)
    assert digest != contract_fingerprint(tiny_dataset)[1]["validation"]
    with pytest.raises(DataError, match="validation tokens .* differ from those recorded"):
        contract_fingerprint(ds)


def test_heldout_identity_is_checked_too(tiny_dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dataset.dir, copy)
    tok_path, _ = shard_files(copy / "tokens", "heldout", 0)
    arr = np.load(tok_path)
    arr[1] = (arr[1] + 1) % 380
    np.save(tok_path, arr)
    with pytest.raises(DataError, match="held-out tokens .* differ from those recorded"):
        contract_fingerprint(Dataset(copy, "copy"))


def test_same_data_prepared_twice_has_the_same_contract_other_data_does_not(tiny_dataset, corpus_dir, tmp_path):
    from mlx_ar.data.prepare import prepare_dataset
    from mlx_ar.data.sources import local_source

    prepare_dataset(local_source(corpus_dir), tmp_path / "again", TINY_PROFILE, log=lambda m: None)
    assert contract_fingerprint(Dataset(tmp_path / "again")) == contract_fingerprint(tiny_dataset)

    other = tmp_path / "other"
    other.mkdir()
    docs = prose_docs()[::-1]  # same text, other split: another tokenizer and another validation set
    for i in range(3):
        write_parquet(other / f"p{i}.parquet", docs[i::3])
    prepare_dataset(local_source(other), tmp_path / "o", TINY_PROFILE, log=lambda m: None)
    _, parts = contract_fingerprint(Dataset(tmp_path / "o"))
    _, base = contract_fingerprint(tiny_dataset)
    assert parts["tokenizer"] != base["tokenizer"] and parts["validation"] != base["validation"]
    assert parts["heldout"] != base["heldout"] and parts["profile"] == base["profile"]
