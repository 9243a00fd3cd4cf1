"""prepare: sources, the pipeline, the command line, and a clear error for each kind of bad input."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_PROFILE, prose_docs, write_parquet
from mlx_ar import paths
from mlx_ar.data import DataError, open_dataset
from mlx_ar.data.dataset import Dataset
from mlx_ar.data.prepare import prepare_command, prepare_dataset
from mlx_ar.data.sources import (DEMO_VAL_PERCENT, chunk_paragraphs, climbmix_shard_name, climbmix_source,
                                 demo_split, demo_units, local_source)

REPO = Path(__file__).resolve().parents[1]


def quiet(msg):
    pass


def build(src, out, profile=TINY_PROFILE, **kw):
    return prepare_dataset(src, out, profile, threads=2, log=kw.pop("log", quiet), **kw)


@pytest.fixture
def mixed_dir(tmp_path):
    """A local directory with one file of each kind; the last (sorted) is the validation parquet."""
    d = tmp_path / "mixed"
    d.mkdir()
    docs = prose_docs()
    write_parquet(d / "a.parquet", docs[:200] + ["", None, "   \n "])
    with open(d / "b.jsonl", "w") as f:
        for doc in docs[200:300]:
            f.write(json.dumps({"text": doc, "id": 1}) + "\n")
        f.write("\n")
    (d / "c.txt").write_text("\n\n\n".join(docs[300:400]))
    (d / "notes.md").write_text("ignored: not a data file")
    write_parquet(d / "z_val.parquet", docs[400:])
    return d


# --- the pipeline -----------------------------------------------------------------------------
def test_local_directory_end_to_end(mixed_dir, tmp_path):
    src = local_source(mixed_dir)
    assert [f.name for f in src.train] == ["a.parquet", "b.jsonl", "c.txt"]
    assert [f.name for f in src.val] == ["z_val.parquet"]
    logs = []
    m = build(src, tmp_path / "ds", log=logs.append)
    assert m["profile"]["name"] == TINY_PROFILE.name and m["source"]["source"] == "local"
    files = m["splits"]["train"]["files"]
    assert [f["source"] for f in files] == ["a.parquet", "b.jsonl", "c.txt"]
    assert files[0]["docs"] == 200 and files[0]["empty_skipped"] == 3
    assert files[1]["docs"] == 100
    assert any("skipped 3 empty train document" in line for line in logs)
    assert any("tokens/s" in line and "MB/s" in line for line in logs), "prepare reports its throughput"
    assert not (tmp_path / "ds" / "staging").exists()

    ds = Dataset(tmp_path / "ds")
    assert ds.vocab_size == 384 and ds.profile == TINY_PROFILE
    # The first training document comes back exactly through the token files.
    first = ds.split_table("train").doc(0)
    assert first[0] == ds.bos_id and ds.tokenizer.decode(first[1:]) == prose_docs()[0]
    jsonl_first = ds.split_table("train").doc(200)
    assert ds.tokenizer.decode(jsonl_first[1:]) == prose_docs()[200]
    assert ds.num_tokens("val") == int(ds.split_table("val").num_tokens)


def test_rerun_keeps_forces_or_refuses(corpus_dir, tmp_path):
    out = tmp_path / "ds"
    build(local_source(corpus_dir), out)
    stamp = (out / "manifest.json").stat().st_mtime_ns
    logs = []
    build(local_source(corpus_dir), out, log=logs.append)
    assert (out / "manifest.json").stat().st_mtime_ns == stamp and "already prepared" in logs[0]
    with pytest.raises(DataError, match="other settings.*--force"):
        build(local_source(corpus_dir, val_files=["part_0.parquet"]), out)
    build(local_source(corpus_dir, val_files=["part_0.parquet"]), out, force=True)
    assert Dataset(out).manifest["source"]["val"][0][0] == "part_0.parquet"


def test_climbmix_from_a_loopback_mirror(tmp_path, shard_server):
    from mlx_ar.data.download import DownloadSettings, download_shards

    docs = prose_docs()
    files = {}
    for k, i in enumerate((0, 1, 6542)):
        p = write_parquet(tmp_path / climbmix_shard_name(i), docs[k::3])
        files[p.name] = p.read_bytes()
    server = shard_server(files, faults={climbmix_shard_name(1): ["500"]})
    raw = tmp_path / "ds" / "raw"
    download_shards([0, 1, 6542], raw, server.url, DownloadSettings(backoff=0, timeout=5), log=quiet)
    m = build(climbmix_source(raw, 2), tmp_path / "ds")
    assert [f["source"] for f in m["splits"]["train"]["files"]] == ["shard_00000.parquet", "shard_00001.parquet"]
    assert m["splits"]["val"]["files"][0]["source"] == "shard_06542.parquet"
    (raw / "shard_06542.parquet").unlink()
    with pytest.raises(DataError, match="missing validation shard"):
        climbmix_source(raw, 2)


# --- bad input --------------------------------------------------------------------------------
def test_no_data_yet_names_the_command(data_cache):
    with pytest.raises(DataError, match=r"python prepare.py.*--source demo"):
        open_dataset()
    with pytest.raises(DataError, match=r"dataset 'nope' is not prepared.*python prepare.py"):
        open_dataset("nope")


def test_interrupted_prepare_reads_as_not_prepared(data_cache):
    (paths.dataset_dir("half") / "staging").mkdir(parents=True)
    with pytest.raises(DataError, match="prepare was interrupted"):
        open_dataset("half")


def test_parquet_without_text_column_names_the_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_parquet(d / "a.parquet", prose_docs(20))
    write_parquet(d / "b.parquet", ["x"] * 5, column="content")
    with pytest.raises(DataError, match=r"b\.parquet has no `text` column \(columns: content\)"):
        build(local_source(d), tmp_path / "ds")


def test_corrupt_parquet_names_the_file(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    p = write_parquet(d / "a.parquet", prose_docs(300))
    p.write_bytes(p.read_bytes()[:-200])
    write_parquet(d / "b.parquet", prose_docs(50))
    with pytest.raises(DataError, match=r"a\.parquet: corrupt or truncated parquet"):
        build(local_source(d), tmp_path / "ds")
    assert not (tmp_path / "ds" / "manifest.json").exists()
    assert not (tmp_path / "ds" / "staging").exists(), "a failed prepare cleans up after itself"


def test_missing_validation_split(tmp_path, corpus_dir):
    with pytest.raises(DataError, match=r"validation file nope\.parquet not found.*part_0\.parquet"):
        local_source(corpus_dir, val_files=["nope.parquet"])
    lone = tmp_path / "lone"
    lone.mkdir()
    write_parquet(lone / "only.parquet", prose_docs(10))
    with pytest.raises(DataError, match="training split would be empty"):
        local_source(lone)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no .parquet"):
        local_source(empty)
    # A validation file whose documents are all blank.
    write_parquet(lone / "z.parquet", ["", "  ", None])
    with pytest.raises(DataError, match=r"z\.parquet \(val split\) has no non-empty documents"):
        build(local_source(lone), tmp_path / "ds")


def test_validation_split_too_small_for_the_eval_walk(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_parquet(d / "a.parquet", prose_docs())
    write_parquet(d / "b.parquet", prose_docs(3))
    with pytest.raises(DataError, match=r"packs into only \d+ rows of 65 tokens, but evaluation needs 16.*--val-file"):
        build(local_source(d), tmp_path / "ds")


def test_non_utf8_text_is_replaced_and_named(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    write_parquet(d / "a.parquet", prose_docs(300))
    (d / "b.txt").write_bytes("caf\u00e9 ok\n\n".encode() + b"bad \xff\xfe bytes here\n\n" + "more text".encode())
    write_parquet(d / "z.parquet", prose_docs()[300:])
    logs = []
    build(local_source(d), tmp_path / "ds", log=logs.append)
    warnings = [m for m in logs if "b.txt is not valid UTF-8 (first bad byte at offset 14)" in m and "U+FFFD" in m]
    assert len(warnings) == 1, "the file is read twice (BPE training, tokenizing) but warned about once"
    ds = Dataset(tmp_path / "ds")
    table = ds.split_table("train")
    text = ds.tokenizer.decode(table.doc(table.num_docs - 1)[1:])
    assert text == "caf\u00e9 ok\n\nbad \ufffd\ufffd bytes here\n\nmore text"


def test_bad_jsonl_line_is_named(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "fine"}\n{"txt": "wrong key"}\n')
    write_parquet(d / "b.parquet", prose_docs(10))
    with pytest.raises(DataError, match=r"a\.jsonl:2: expected an object with a string field `text`"):
        build(local_source(d), tmp_path / "ds")
    (d / "a.jsonl").write_text('{"text": "fine"}\n{broken\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: invalid JSON"):
        build(local_source(d), tmp_path / "ds")


def copy_of(ds, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(ds.dir, dst)
    return dst


def test_missing_or_mismatched_tokenizer(tiny_dataset, tmp_path):
    d = copy_of(tiny_dataset, tmp_path)
    (d / "tokenizer" / "ranks.txt").unlink()
    with pytest.raises(DataError, match=r"tokenizer file missing: .*ranks\.txt") as e:
        Dataset(d, "tiny")
    assert f"python prepare.py --source local {tiny_dataset.manifest['source']['dir']} --val-file part_3.parquet " \
           "--name tiny --force" in str(e.value)
    # A valid tokenizer, but not the one the shards were made with.
    from mlx_ar.data.tokenizer import train_tokenizer

    train_tokenizer(prose_docs()[::-1][:300], 384).save(d / "tokenizer")
    with pytest.raises(DataError, match="not the one the token shards were made with"):
        Dataset(d)


def test_missing_token_file(tiny_dataset, tmp_path):
    d = copy_of(tiny_dataset, tmp_path)
    (d / "tokens" / "train_00001.tokens.npy").unlink()
    ds = Dataset(d)  # opening is cheap; the shards are checked when a split is first used
    with pytest.raises(DataError, match=r"missing train token file .*train_00001\.tokens\.npy"):
        next(ds.train_batches(2, 32))


def test_changed_contract_constants_are_refused(tiny_dataset, tmp_path):
    d = copy_of(tiny_dataset, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    m["profile"] = {"name": "real", "time_budget": 300, "max_seq_len": 1024, "vocab_size": 384, "eval_tokens": 1024}
    (d / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="different 'real' contract numbers"):
        Dataset(d)


def test_unreadable_or_foreign_manifest_is_named(tiny_dataset, tmp_path):
    d = copy_of(tiny_dataset, tmp_path)
    m = json.loads((d / "manifest.json").read_text())
    (d / "manifest.json").write_text(json.dumps({**m, "schema": 99}))
    with pytest.raises(DataError, match=r"manifest\.json: unknown manifest schema 99; re-run prepare with --force"):
        Dataset(d)
    (d / "manifest.json").write_text("{")
    with pytest.raises(DataError, match=r"manifest\.json is not valid JSON"):
        Dataset(d)


# --- sources ----------------------------------------------------------------------------------
def test_chunk_paragraphs():
    text = "a" * 30 + "\n\n" + "b" * 30 + "\n \n" + "c" * 100 + "\n\n\n\n" + "d" * 5
    assert chunk_paragraphs(text, 70) == ["a" * 30 + "\n\n" + "b" * 30, "c" * 100, "d" * 5]
    assert chunk_paragraphs("\n\n  \n", 10) == []


def test_demo_corpus_is_read_not_imported():
    before = set(sys.modules)
    units = demo_units()
    assert not {"antigravity", "this", "turtle", "tkinter"} & (set(sys.modules) - before)
    assert len(units) > 300 and units[0][0].startswith("topic:")
    val = sum(demo_split(k) == "val" for k, _ in units)
    assert abs(val / len(units) - DEMO_VAL_PERCENT / 100) < 0.06
    # The split is pinned by a hash of each unit's key, the same on every machine.
    assert [demo_split(k) for k in ("module:re/__init__.py", "module:os.py", "topic:assert")] == ["val", "train", "train"]


# --- the command line -------------------------------------------------------------------------
def test_cli_demo_end_to_end(data_cache):
    from mlx_ar.evaluate import contract_fingerprint

    res = CliRunner().invoke(prepare_command, ["--source", "demo"])
    assert res.exit_code == 0, res.output
    assert "python train.py" in res.output
    assert paths.current_dataset() == "demo"
    ds = open_dataset()
    assert ds.name == "demo" and ds.profile.name == "demo" and ds.vocab_size == ds.profile.vocab_size
    assert ds.manifest["throughput"]["tokens_per_sec"] > 0
    fp, parts = contract_fingerprint(ds)
    # The demo validation source is big enough for a held-out split, pinned like validation.
    assert ds.heldout_missing is None and parts["heldout"] == ds.manifest["heldout_walk"]["sha256"]
    assert "held-out:" in res.output and "none" not in res.output.split("held-out:")[1].splitlines()[0]
    x, y, epoch = next(ds.train_batches(4, ds.profile.max_seq_len))
    assert x.shape == (4, 256) and (x[:, 0] == ds.bos_id).all() and epoch == 1
    again = CliRunner().invoke(prepare_command, ["--source", "demo"])
    assert again.exit_code == 0 and "already prepared" in again.output


@pytest.mark.parametrize("args, message", [
    (["--source", "local"], "--source local needs a directory"),
    (["--source", "demo", "some/dir"], "only applies to --source local"),
    (["--source", "demo", "--num-shards", "3"], "--num-shards only applies to --source climbmix"),
    (["--val-file", "x.parquet"], "--val-file only applies to --source local"),
    (["--source", "demo", "--name", "../up"], "invalid dataset name"),
])
def test_cli_usage_errors(data_cache, args, message):
    res = CliRunner().invoke(prepare_command, args)
    assert res.exit_code == 2 and message in res.output


def test_cli_local_errors_are_one_line(data_cache, tmp_path):
    res = CliRunner().invoke(prepare_command, [str(tmp_path / "nowhere")])
    assert res.exit_code == 1 and "Error: --source local:" in res.output and "is not a directory" in res.output
    assert "Traceback" not in res.output


def test_cli_local_directory_implies_local_source(data_cache, tmp_path):
    d = tmp_path / "mycorpus"
    d.mkdir()
    write_parquet(d / "a.parquet", ["tiny"])
    write_parquet(d / "b.parquet", ["text"])
    res = CliRunner().invoke(prepare_command, [str(d)])
    # The real profile needs far more text: the tokenizer cannot reach its vocabulary.
    assert res.exit_code == 1 and "too small to learn a vocabulary of 8192" in res.output
    assert not (paths.dataset_dir("local-mycorpus") / "manifest.json").exists()


def test_root_prepare_py_is_the_same_command(data_cache):
    res = subprocess.run([sys.executable, "prepare.py", "--source", "local"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "--source local needs a directory" in res.stderr
    assert "Usage: prepare.py" in res.stderr


def test_prepare_command_module_stays_light():
    code = ("import sys, mlx_ar.data.prepare, mlx_ar.data; "
            "print(sorted(m for m in ('numpy', 'pyarrow', 'tiktoken', 'rustbpe', 'mlx') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "[]", res.stderr


def test_cli_climbmix_reports_a_failed_download(data_cache, tmp_path, shard_server):
    p = write_parquet(tmp_path / climbmix_shard_name(0), prose_docs(20))
    server = shard_server({p.name: p.read_bytes()})  # the validation shard is missing on this mirror
    res = CliRunner().invoke(prepare_command, ["--num-shards", "1", "--base-url", server.url, "--workers", "2"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "shard_06542.parquet" in res.output and "HTTP 404" in res.output
    raw = paths.dataset_dir("climbmix") / "raw"
    assert sorted(f.name for f in raw.iterdir()) == [climbmix_shard_name(0)], "the good shard is kept for resuming"


def test_a_validation_split_too_small_for_both_walks_keeps_validation_whole(corpus_dir, tmp_path):
    from dataclasses import replace

    from mlx_ar.data.walk import heldout_rows
    from mlx_ar.evaluate import contract_fingerprint

    # 226 validation documents, each longer than a row: 200 rows for validation fit, 33 more do not.
    profile = replace(TINY_PROFILE, eval_tokens=64 * 200)
    m = prepare_dataset(local_source(corpus_dir), tmp_path / "small", profile, log=lambda msg: None)
    assert "heldout" not in m["splits"] and "cannot fill both" in m["heldout_walk"]["missing"]
    ds = Dataset(tmp_path / "small")
    assert ds.heldout_missing.startswith("dataset 'small' has no held-out split") and heldout_rows(profile) == 33
    assert contract_fingerprint(ds)[1]["heldout"] is None
    with pytest.raises(DataError, match="no held-out split"):
        ds.split_table("heldout")
    # With room for both, the held-out documents leave the validation split.
    full = prepare_dataset(local_source(corpus_dir), tmp_path / "both", TINY_PROFILE, log=lambda msg: None)
    held, val = full["splits"]["heldout"], full["splits"]["val"]
    assert val["tokens"] + held["tokens"] == m["splits"]["val"]["tokens"]
    assert val["docs"] + held["docs"] == m["splits"]["val"]["docs"]
