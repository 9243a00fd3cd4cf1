"""The BPE tokenizer: training, round trip, byte lengths, pickle-free storage, load validation."""
import json

import numpy as np
import pytest

from conftest import prose_docs
from mlx_ar.constants import SPECIAL_TOKENS
from mlx_ar.data.errors import DataError
from mlx_ar.data.tokenizer import (META_FILE, RANKS_FILE, TOKEN_BYTES_FILE, Tokenizer, capped_texts,
                                   load_tokenizer, train_tokenizer)

VOCAB = 384


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(prose_docs(), VOCAB)


@pytest.fixture
def saved(tok, tmp_path):
    d = tmp_path / "tokenizer"
    tok.save(d)
    return d


SAMPLES = [
    "Hello, world! 12345 numbers 3.14159",
    "  leading spaces\n\n\ttabs and\r\nCRLF lines  ",
    "unicode: héllo wörld — naïve café, 日本語のテキスト, emoji 🙂👍🏽",
    "a literal <|bos|> in the text is just text",
    "",
]


def test_vocabulary_layout(tok):
    assert tok.vocab_size == VOCAB
    assert len(tok.ranks) == VOCAB - len(SPECIAL_TOKENS)
    assert tok.bos_id == VOCAB - len(SPECIAL_TOKENS)
    assert list(tok.special_tokens) == list(SPECIAL_TOKENS)
    assert list(tok.special_tokens.values()) == list(range(tok.bos_id, VOCAB))
    # The first 256 ranks are the single bytes, so any byte string can be encoded.
    assert sorted(tok.ranks[:256]) == [bytes([b]) for b in range(256)]


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_and_byte_lengths(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.bos_id for i in ids), "ordinary text must never produce special tokens"
    assert int(tok.token_bytes[ids].sum()) == len(text.encode("utf-8"))


def test_token_bytes_are_utf8_lengths_and_zero_for_specials(tok):
    assert tok.token_bytes.dtype == np.int32 and tok.token_bytes.shape == (VOCAB,)
    assert [int(n) for n in tok.token_bytes[: tok.bos_id]] == [len(r) for r in tok.ranks]
    assert (tok.token_bytes[tok.bos_id:] == 0).all()
    assert (tok.token_bytes[: tok.bos_id] > 0).all()


def test_bos_prefix_and_round_trip_check(tok):
    assert tok.encode("hi", prepend_bos=True)[0] == tok.bos_id
    assert tok.round_trip_check(prose_docs(50)) == 50


def test_training_is_deterministic(tok):
    again = train_tokenizer(prose_docs(), VOCAB)
    assert again.ranks == tok.ranks and again.hash == tok.hash


def test_too_little_text_is_a_clear_error():
    with pytest.raises(DataError, match="too small to learn a vocabulary of 384"):
        train_tokenizer(["hello world"] * 3, VOCAB)


def test_vocab_size_out_of_range():
    with pytest.raises(DataError, match="out of range"):
        train_tokenizer(prose_docs(5), 200)


def test_capped_texts_respects_doc_and_total_caps():
    stats = {}
    out = list(capped_texts(["a" * 50, "b" * 50, "c" * 50, "d" * 50], doc_chars=30, total_chars=70, stats=stats))
    assert out == ["a" * 30, "b" * 30, "c" * 10]
    assert stats == {"docs": 3, "chars": 70}


def test_saved_without_pickle_and_reloads_identically(tok, saved):
    lines = (saved / RANKS_FILE).read_text("ascii").splitlines()
    assert len(lines) == len(tok.ranks)
    assert lines[65].split(" ")[1] == "65"
    meta = json.loads((saved / META_FILE).read_text())
    assert meta["vocab_size"] == VOCAB and meta["bos_id"] == tok.bos_id and meta["hash"] == tok.hash
    assert np.load(saved / TOKEN_BYTES_FILE, allow_pickle=False).dtype == np.int32
    back = load_tokenizer(saved, vocab_size=VOCAB)
    assert back.hash == tok.hash
    for text in SAMPLES:
        assert back.encode(text) == tok.encode(text)


def test_hash_changes_with_each_ingredient(tok):
    swapped = list(tok.ranks)
    swapped[300], swapped[301] = swapped[301], swapped[300]
    variants = [
        Tokenizer(swapped),
        Tokenizer(tok.ranks, pattern=tok.pattern + "|x"),
        Tokenizer(tok.ranks, special_tokens=("<|start|>",) + tuple(SPECIAL_TOKENS[1:])),
    ]
    hashes = {tok.hash} | {v.hash for v in variants}
    assert len(hashes) == 4


@pytest.mark.parametrize("missing", [RANKS_FILE, META_FILE, TOKEN_BYTES_FILE])
def test_missing_file_is_named(saved, missing):
    (saved / missing).unlink()
    with pytest.raises(DataError, match=missing.replace(".", r"\.")) as e:
        load_tokenizer(saved)
    assert "prepare.py --force" in str(e.value)


def test_edited_ranks_are_detected(saved):
    p = saved / RANKS_FILE
    lines = p.read_text().splitlines(keepends=True)
    lines[300], lines[301] = lines[301], lines[300]
    p.write_text("".join(lines))
    with pytest.raises(DataError, match="sha256"):
        load_tokenizer(saved)


def test_vocab_mismatch_with_the_profile(saved):
    with pytest.raises(DataError, match="vocab_size 384, the profile needs 8192"):
        load_tokenizer(saved, vocab_size=8192)


def test_mismatched_token_bytes(saved):
    tb = np.load(saved / TOKEN_BYTES_FILE)
    tb[10] += 1
    np.save(saved / TOKEN_BYTES_FILE, tb)
    with pytest.raises(DataError, match="token_bytes.npy does not match"):
        load_tokenizer(saved)


def test_garbage_metadata(saved):
    (saved / META_FILE).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_tokenizer(saved)


def test_other_split_pattern_is_refused(tok, tmp_path):
    Tokenizer(tok.ranks, pattern=r"\S+|\s+").save(tmp_path)
    with pytest.raises(DataError, match="split pattern"):
        load_tokenizer(tmp_path)
